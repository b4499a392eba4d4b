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
	@# digits, dedicated VAEs, MoG + Gaussian + U-Net latent experts; an existing run is resumed, never overwritten
	if [ -f runs/demo/config.json ]; then $(BIN)/molrmog train --resume runs/demo; \
	else $(BIN)/molrmog train --dataset digits --experts mog,gaussian,unet --vae dedicated --out runs/demo; fi
	$(BIN)/molrmog synth --out runs/demo/synth --no-progress
	@echo "report: runs/demo/report.md; samples: runs/demo/samples_*.png; synthetic check: runs/demo/synth/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check molrmog tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mixture.py

clean:
	rm -rf $(VENV) runs .pytest_cache
