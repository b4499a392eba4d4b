# `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create (or reuse) the virtual environment .venv and install molrmog into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/molrmog synth --out runs/demo/synth
	$(BIN)/molrmog experiment estimation --quick --out runs/demo/estimation
	$(BIN)/molrmog experiment convergence --quick --out runs/demo/convergence
	$(BIN)/molrmog experiment phase-transition --quick --out runs/demo/phase-transition

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check molrmog tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mixture.py

clean:
	rm -rf $(VENV) runs .pytest_cache
