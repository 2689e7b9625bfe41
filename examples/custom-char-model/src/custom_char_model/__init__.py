"""custom-char-model: fine-tune custom with a frozen part that stays frozen."""
