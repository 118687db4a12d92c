"""Where the code runs: CPU/gloo support for Megatron-Core, distributed start-up, local launches, devices."""

from anchored_megatron.platform.distributed import RuntimeInfo, initialize, seed_everything, shutdown
from anchored_megatron.platform.launch import RankFailure, run_on_ranks

__all__ = ["RankFailure", "RuntimeInfo", "initialize", "run_on_ranks", "seed_everything", "shutdown"]
