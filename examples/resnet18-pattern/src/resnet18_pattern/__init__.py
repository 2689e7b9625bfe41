"""resnet18-pattern: fine-tune resnet18 with a frozen part that stays frozen."""
