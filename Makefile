# One entry point for users and CI: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MLX backend on Linux: cpu or cuda (exactly one; to switch, delete $(VENV) first). Ignored on macOS (Metal).
BACKEND ?= cpu

.PHONY: setup demo lint test test-fast test-e2e-mlx-short bench clean

setup: $(VENV)/.installed

# Reinstall only when the dependency pins change; constraints.txt is the lock.
# pip prints each package as it goes: the first install takes minutes (MLX, Prefect, ...).
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "make setup [1/3]: creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "make setup [2/3]: upgrading pip"
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	@echo "make setup [3/3]: installing finetune and its pinned dependencies (a few minutes the first time)"
	$(BIN)/python -m pip install --progress-bar on -c constraints.txt -e '.[test,$(BACKEND)]'
	touch $@
	@echo "make setup: done; source $(VENV)/bin/activate to put finetune and prefect on your PATH"

demo: setup
	$(BIN)/finetune demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m 'not slow'

# The real-model end-to-end test alone: SmolLM2 fine-tuned through the flow answers better than its base.
test-e2e-mlx-short: setup
	$(BIN)/python -m pytest tests/test_real_model.py

clean:
	rm -rf .finetune finetune-store .pytest_cache
