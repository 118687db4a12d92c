from setuptools import find_packages, setup

setup(
    name="anchored_megatron",
    version="0.1.0",
    description="Anchored Learning (trust-region fine-tuning against forgetting) on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["anchored_megatron", "anchored_megatron.*"]),
    install_requires=[
        # 0.16.1 - 0.19.x (platform/mcore_compat/ holds every difference). 0.17+ declare
        # Python >= 3.12, so pip picks 0.16.1 on 3.11 and the newest 0.19.x on 3.12+.
        "megatron-core>=0.16.1,<0.20",
        # megatron-core 0.18+ imports triton at import time without declaring it; CUDA builds of
        # torch bring it, the CPU build does not.
        "triton; python_version >= '3.12' and sys_platform == 'linux'",
        # Install the CPU or CUDA build of torch yourself first (the Makefile does);
        # a bare requirement would let pip pull a multi-GB CUDA build.
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "pyyaml",
        "psutil",
        "tqdm",
        "xxhash",  # checkpoint manifest checksums (XXH3-128)
        "tokenizers",
        "jinja2",
        "pyarrow",
        "einops",  # Megatron-FSDP imports it
    ],
    extras_require={
        "hf": ["transformers>=4.45", "safetensors"],
        # `make real-model`: transformers reads the GGUF file of the registry's SmolLM2 with these two.
        "real": ["transformers>=4.45", "safetensors", "gguf", "accelerate"],
        "plots": ["matplotlib"],
        # bench/peer_bench.py's TRL columns (SFTTrainer, GKDTrainer); without it they are left out, said so.
        "peer": ["trl==1.16.0"],
        "test": ["pytest", "pytest-timeout", "transformers>=4.45", "safetensors", "matplotlib", "gguf", "accelerate"],
        # apex has no wheel: build it from source (see docs/gpu.md).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "anchored-sft=anchored_megatron.cli:train_main",
            "anchored-convert=anchored_megatron.convert.cli:main",
            "anchored-train-tokenizer=anchored_megatron.data.train_tokenizer:main",
            "anchored-checkpoint=anchored_megatron.checkpoint.cli:main",
            "anchored-merge=anchored_megatron.convert.merge:main",
        ],
    },
)
