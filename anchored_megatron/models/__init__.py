"""Building Megatron GPT models (student, reference, snapshot) and their layer specs."""
