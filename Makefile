# The two commands of the README. Each creates .venv on first use (torch is large: a few minutes).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: study test reproduce throughput clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

study: $(VENV)/.installed  ## set up, then run the quick depth study into results/quick
	$(PY) -m study.depth --preset quick --out results/quick

test: $(VENV)/.installed  ## set up, then run the whole test suite (benchmarks once, untimed)
	$(PY) -m pytest

reproduce: $(VENV)/.installed  ## the source text's recipe across depths (the recipe experiment alone)
	$(PY) -m study.depth --preset full --experiments recipe --out results/recipe

throughput: $(VENV)/.installed  ## training-step throughput sweep into results/throughput.csv
	$(PY) -m mnist_bench.throughput

clean:
	rm -rf $(VENV)
