"""Training: one loop (`core.Loop`) that fine-tuning and the built-in model's stages drive."""
