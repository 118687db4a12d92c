"""Anchored Learning on Megatron-Core."""

__version__ = "0.1.0"
