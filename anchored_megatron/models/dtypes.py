"""The torch dtype of each precision name a config or command takes (``params_dtype``, ``--dtype``)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
