# `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create (or reuse) the virtual environment .venv and install molrmog into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]' -c constraints.txt
	@# Byte-compile once, on every core, instead of pip's one-core pass. Without .pyc files every Python process
	@# (each test's subprocess, each worker, each Ray worker) compiles torch, diffusers and ray again wherever
	@# PYTHONDONTWRITEBYTECODE is set (this machine sets it). A file that does not compile (a Python 2 example in a
	@# dependency) is only imported from source, so compileall's status is not the install's. Skipped: what no
	@# molrmog process imports (pip, setuptools, networkx, transformers' model zoo, test
	@# folders): 11,800 files instead of 17,500, 23 s instead of 32 s on 2 cores.
	$(BIN)/python -m compileall -qq -j 0 \
		-x '/(pip|setuptools|networkx)/|/transformers/models/|/tests?/' \
		$(VENV)/lib molrmog || true
	touch $(STAMP)

demo: $(STAMP)
	@# digits: dedicated VAEs + MoG / Gaussian / U-Net experts, the unified-VAE ablation, the offline featurizer,
	@# FID / KID / class score / similarity metrics and the comparison table; a stopped demo resumes, never restarts
	$(BIN)/molrmog compare --dataset digits --out runs/demo --workers 2
	$(BIN)/molrmog synth --out runs/demo/synth --no-progress
	@echo "table: runs/demo/comparison.md; samples: runs/demo/comparison_samples.png; synthetic check: runs/demo/synth/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check molrmog tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mixture.py
	$(BIN)/python benchmarks/bench_experts.py
	$(BIN)/python benchmarks/bench_parallel.py

clean:
	rm -rf $(VENV) runs .pytest_cache
