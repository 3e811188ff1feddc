"""Training: data loading, model assembly, the loop, checkpoints, evaluation."""
