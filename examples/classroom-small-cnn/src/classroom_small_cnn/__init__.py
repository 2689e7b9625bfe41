"""classroom-small-cnn: fine-tune small_cnn with a frozen part that stays frozen (teaching edition)."""
