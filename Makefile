# Two entry points: `make report` and `make test`. Each creates .venv when missing.
# TORCH is the torch requirement; override it elsewhere, e.g. `make test TORCH='torch>=2.4'`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= all
OUT ?= report
BIN := $(VENV)/bin

.PHONY: install test report lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

report: install
	$(BIN)/attnkit report --quick --out $(OUT)

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
