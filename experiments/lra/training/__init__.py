"""The training script's parts: config, processes, batches, checkpoints, metrics, the loop."""
