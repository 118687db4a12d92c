"""What ``run_on_ranks``' fork server imports once, so that ranks do not each pay for it.

Imports only: nothing here may start threads, touch CUDA or create process groups, since every
rank is forked from the process that ran this. The warning filters go first because these
imports are where Megatron-Core prints its deprecation notices.
"""

from anchored_megatron.platform import warnings_filter

warnings_filter.install()

import torch  # noqa: E402,F401
import megatron.core.dist_checkpointing  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401
