# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create/update .venv idempotently: torch==2.13.0 first (a CPU wheel lies on this machine's disk;
# an unpinned torch would pull a multi-GB CUDA build), then the project in editable mode with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qllava finetune recipes/tiny_demo.toml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs data/tiny_shapes checkpoints/tiny
