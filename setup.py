from setuptools import find_packages, setup

setup(
    name="anchored_megatron",
    version="0.1.0",
    description="Anchored Learning (trust-region fine-tuning against forgetting) on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["anchored_megatron", "anchored_megatron.*"]),
    install_requires=[
        "megatron-core==0.16.1",
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
    ],
    extras_require={
        "hf": ["transformers>=4.45", "safetensors"],
        "plots": ["matplotlib"],
        "test": ["pytest", "pytest-timeout", "transformers>=4.45", "safetensors", "matplotlib"],
        # apex has no wheel: build it from source (see docs/gpu.md).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "anchored-sft=anchored_megatron.cli:train_main",
            "anchored-convert=anchored_megatron.convert.cli:main",
            "anchored-train-tokenizer=anchored_megatron.data.train_tokenizer:main",
            "anchored-checkpoint=anchored_megatron.training.checkpoint_cli:main",
        ],
    },
)
