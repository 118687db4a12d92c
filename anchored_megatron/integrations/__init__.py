"""Drop-in pieces for training loops that are not ours (Megatron-LM's ``pretrain``)."""
