"""Training, evaluation and checkpoints: where the model meets the data."""
