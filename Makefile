# Two entry points for a fresh machine with Python 3.11 (see README.md):
#   make demo   set up .venv and run the demo pipeline on the built-in phantom (CPU)
#   make test   set up .venv and run lint checks, the test suite and the SLURM cluster test
#               (what CI runs; the cluster test skips itself unless root on Debian)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup demo test lint pytest cluster-test report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when a pin file changes.
$(VENV)/.installed: $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/snakemake --cores $(CORES)

report: setup
	$(BIN)/snakemake --report results/report.html

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

pytest: setup
	$(BIN)/pytest

# Installs and starts a throw-away one-node SLURM cluster (root on Debian only; skips
# itself otherwise), runs the tiny config through profiles/slurm and stops it again.
cluster-test: setup
	bash tests/cluster/run_slurm_test.sh

test: lint pytest cluster-test

clean:
	rm -rf results logs .snakemake
