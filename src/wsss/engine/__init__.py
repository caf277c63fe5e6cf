"""Training engine: trainer, checkpoints, distributed helpers, optimizer and schedule."""
