"""The one exception type of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, unsafe or unreadable by this Megatron-Core;
    the message names the checkpoint (and file) and says what to do. The commands and the trainer
    catch this type; the few subclasses exist only where a caller tells one case apart."""
