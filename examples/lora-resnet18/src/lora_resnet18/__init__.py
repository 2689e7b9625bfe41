"""lora-resnet18: fine-tune resnet18 with a frozen part that stays frozen."""
