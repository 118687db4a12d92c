"""SFT data: local files -> tokenised, loss-masked, packed sequences -> DP-sharded batches."""

from anchored_megatron.data.collate import collate
from anchored_megatron.config import DataConfig
from anchored_megatron.data.records import DataError
from anchored_megatron.data.sampler import EpochSampler
from anchored_megatron.data.sft_dataset import IGNORE_INDEX, SFTDataset, build_sft_dataset
from anchored_megatron.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "DataError",
    "EpochSampler",
    "SFTDataset",
    "Tokenizer",
    "TokenizerError",
    "build_sft_dataset",
    "collate",
    "load_tokenizer",
]
