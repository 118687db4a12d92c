"""The trainer: forward step, pipeline schedule glue, optimizer, checkpoints, logging."""
