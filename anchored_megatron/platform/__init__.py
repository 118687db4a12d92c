"""Where the code runs: CPU/gloo support for Megatron-Core, distributed start-up, devices."""

from anchored_megatron.platform.distributed import RuntimeInfo, initialize, seed_everything, shutdown

__all__ = ["RuntimeInfo", "initialize", "seed_everything", "shutdown"]
