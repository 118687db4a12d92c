# Both targets do their own set-up on a fresh machine: a .venv, the CPU build of torch
# (never a CUDA build pulled in as a side effect), then the package with its extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[test,hf,plots]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m anchored_megatron.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed" tests

clean:
	rm -rf $(VENV) build *.egg-info
