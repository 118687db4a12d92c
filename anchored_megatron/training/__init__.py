"""The trainer: forward step, pipeline schedule glue, optimizer, resume and save (through ``checkpoint``), logging."""
