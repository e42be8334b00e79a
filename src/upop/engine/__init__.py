"""The training engine: one loop for base training, search and retraining, DDP helpers."""
