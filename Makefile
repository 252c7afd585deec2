# Two commands on a fresh machine (Python 3.11 + pip):
#   make up     install aha and run it
#   make test   install aha with the test tools and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev up test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel (on GPU machines any CUDA build >= 2.4 works)
	$(BIN)/pip install torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -e '.[dev]'

up: install
	$(BIN)/aha nats

test: install-dev
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python benchmarks/bus.py
