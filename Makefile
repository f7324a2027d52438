# Two set-up commands for a fresh machine: `make demo` (the main job) and `make test` (the suite; `make test-all` adds
# the few tests marked slow). Both create .venv if it is missing and install what they need.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= jobs/configs/tiny.yaml
PROMPT ?= def main(
LINTED := raylm jobs benchmarks tests

.PHONY: demo test test-all test-fast check install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: default corpus -> tokenizer -> shards -> train tiny (pp=2) on a local Ray -> weights -> a sample.
demo: install
	$(BIN)/raylm prepare $(CONFIG)
	$(BIN)/raylm train $(CONFIG) run.name=demo --overwrite
	$(BIN)/raylm generate runs/demo --prompt '$(PROMPT)' --max-new-tokens 80

# The whole suite but the tests marked slow (the longest fault, sweep and multi-node drills: README "Tests and benchmarks").
test: install
	$(MAKE) --no-print-directory check
	$(BIN)/python -m pytest -q --durations=25 -m "not slow" tests/unit tests/distributed tests/ray tests/gpu

test-all: install
	$(MAKE) --no-print-directory check
	$(BIN)/python -m pytest -q tests/unit tests/distributed tests/ray tests/gpu

# The edit loop: lint, the unit tier and the distributed (gloo) tier but its whole training runs; no Ray.
test-fast: install
	$(MAKE) --no-print-directory check
	$(BIN)/python -m pytest -q -m "not runs" tests/unit tests/distributed

# Lint (ruff: security, pyflakes, pycodestyle, isort, bugbear, pyupgrade, simplify), format, import floors, types;
# the same checks as .pre-commit-config.yaml.
check: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf runs data .pytest_cache
