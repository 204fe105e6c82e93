"""Pieces of the training script: config, distributed setup, sampling, checkpoints, metrics, the loop."""
