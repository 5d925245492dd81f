# Fresh machine: `make demo` or `make test`; both set themselves up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out
TORCH_INDEX ?=

.PHONY: install demo test test-fast bench bench-recipes bench-io lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the version the project is tested with.
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU build where PyPI's
	# torch would be the CUDA one (Linux)
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/shortgpt-export download-default
	touch $(STAMP)

# The headline use: a pruned Q4_K_M GGUF of the default model, then one chat answer from
# it beside the original's (both in llama.cpp).
demo: install
	$(BIN)/shortgpt-export --to gguf --q4_k_m --out $(DEMO_OUT) --force
	$(BIN)/python examples/chat_demo.py $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q --durations=30

# The suite without the tests that need the default model (the slow ones; see README).
test-fast: install
	$(BIN)/python -m pytest -q -m "not default_model"

bench: install
	$(BIN)/python benchmarks/run.py

bench-recipes: install
	$(BIN)/python benchmarks/run.py recipes

bench-io: install
	$(BIN)/python benchmarks/run.py io

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
