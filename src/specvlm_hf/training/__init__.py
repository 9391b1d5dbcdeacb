"""Training a draft: online distillation losses, the data collator, the `Trainer` subclass."""
