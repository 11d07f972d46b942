# The two commands of the README. Each creates .venv on first use (torch is large: a few minutes) and
# installs exactly the versions in requirements.lock (regenerate it with `make lock`).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
LOCK := requirements.lock
DASHBOARD_PORT ?= 8080
STORAGE ?= sqlite:///results/study.db

.PHONY: study test lint soak reproduce throughput slice lock dashboard cuda-checks clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint $(LOCK) -e '.[dev,dashboard]'
	touch $@

study: $(VENV)/.installed  ## set up, then the quick study (the recipe with and without momentum, depths 1 and 3-5, 2 epochs) + report into results/quick
	$(PY) -m study.depth --preset quick --out results/quick

# One test process per core, plus one (pytest-xdist; each process has its own PostgreSQL databases and temporary
# folders): part of the suite waits on worker processes, a proxy or a heartbeat, and the extra process fills those
# waits (on 2 cores: 5 min 58 s with 3 processes, 6 min 9 s with 2). A free process takes queued tests from a busy
# one, so the long end-to-end tests never wait in line.
PYTEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)" 2>/dev/null || echo 2)
test: lint  ## set up, lint, then run the whole test suite in parallel (benchmarks once, untimed)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal

SOAK_RUNS ?= 5
SOAK_OUT ?= results/soak.csv
soak: $(VENV)/.installed  ## the suite SOAK_RUNS times in a row while a second copy runs beside it (a long run)
	SOAK_RUNS=$(SOAK_RUNS) SOAK_OUT=$(SOAK_OUT) PY=$(PY) tests/soak.sh

lint: $(VENV)/.installed  ## ruff: lint and formatting (what `make test` checks first)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

reproduce: $(VENV)/.installed  ## the source text's recipe across depths (the recipe experiment alone)
	$(PY) -m study.depth --preset full --experiments recipe --out results/recipe

throughput: $(VENV)/.installed  ## training-step throughput sweep into results/throughput.csv
	$(PY) -m mnist_bench.throughput

# A study slice timed packed and unpacked, one after the other: the matched experiment at the text's budget
# (242,762 parameters), depth 4, every rate of its band with every seed, and its horizon check, 2 workers. Appends
# "pack,seconds,machine" rows to SLICE_OUT; the runs' tables go to runs/slice-pack<K>/ (ignored by git).
SLICE_OUT ?= results/slice.csv
SLICE_PACKS ?= 12 1
slice: $(VENV)/.installed  ## time the 242,762-parameter matched slice at depth 4 with --pack 12, then --pack 1 (about 15 min on 2 cores)
	@mkdir -p runs; test -s $(SLICE_OUT) || echo "pack,seconds,cpu,workers,command" > $(SLICE_OUT)
	for k in $(SLICE_PACKS); do \
		rm -rf runs/slice-pack$$k; \
		cmd="$(PY) -m study.depth --preset full --experiments matched --budgets 242762 --depths 4 --workers 2 --pack $$k --no-report --out runs/slice-pack$$k"; \
		start=$$(date +%s.%N); $$cmd > runs/slice-pack$$k.log 2>&1 || { tail -3 runs/slice-pack$$k.log; exit 1; }; end=$$(date +%s.%N); \
		echo "$$k,$$(echo "$$end - $$start" | bc),\"$$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\",2,\"$${cmd#$(PY) }\"" >> $(SLICE_OUT); \
	done
	cat $(SLICE_OUT)
	set -- $(SLICE_PACKS); $(PY) -c "$$SAME_RESULTS" runs/slice-pack$$1 runs/slice-pack$$2

# Whether two study folders hold the same results: every tuning run's validation accuracy and every final run's
# test accuracy and loss, matched by study, trial and seed (the timing columns differ, and are not compared).
export SAME_RESULTS
define SAME_RESULTS
import sys, pandas as pd
a, b = sys.argv[1:3]
def key(folder, table, cols):
    t = pd.read_csv(f"{folder}/{table}")
    return t.sort_values(["study", "trial" if "trial" in t else "seed", "seed" if "seed" in t else "trial"])[cols].to_numpy().tolist()
same = key(a, "trials.csv", ["study", "trial", "val_accuracy"]) == key(b, "trials.csv", ["study", "trial", "val_accuracy"])
same &= key(a, "final.csv", ["study", "seed", "test_accuracy", "test_loss"]) == key(b, "final.csv", ["study", "seed", "test_accuracy", "test_loss"])
print(f"{a} and {b}: {'the same' if same else 'DIFFERENT'} validation and test results")
sys.exit(0 if same else 1)
endef

lock: $(VENV)/.installed  ## re-resolve the whole dependency tree into requirements.lock (Python 3.11, x86_64 Linux)
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras --constraint lock-constraints.txt \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --annotation-style line -o $(LOCK)

dashboard: $(VENV)/.installed  ## browse a study in optuna-dashboard (default: the committed MNIST study)
	$(VENV)/bin/optuna-dashboard $(STORAGE) --host 127.0.0.1 --port $(DASHBOARD_PORT)

# Every check that needs a GPU, in one run (CI has none; there these tests skip). Writes under CUDA_OUT
# the GPU's name, the CUDA tests' log, pytest-benchmark's timings of the training step on CPU and CUDA,
# the throughput sweep on CUDA and a quick study run on CUDA (packed). PY: an interpreter that has the
# dependencies (default: the venv's). Usage: make cuda-checks [PY=python3] [CUDA_OUT=results/cuda]
CUDA_OUT ?= results/cuda
cuda-checks:
	mkdir -p $(CUDA_OUT)
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $(CUDA_OUT)/gpu.csv
	$(PY) -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' | tee -a $(CUDA_OUT)/gpu.csv
	$(PY) -m pytest -p no:cacheprovider -q tests/test_train.py tests/benchmarks 2>&1 | tee $(CUDA_OUT)/tests.log
	$(PY) -m pytest -p no:cacheprovider -q tests/benchmarks --benchmark-enable --benchmark-columns=median,iqr,rounds \
		--benchmark-json=$(CUDA_OUT)/benchmark.json 2>&1 | tee -a $(CUDA_OUT)/tests.log
	$(PY) -m study.depth --preset quick --device cuda --out $(CUDA_OUT)/quick 2>&1 | tee $(CUDA_OUT)/quick.log
	tar -C $(CUDA_OUT) -czf $(CUDA_OUT)/quick.tgz quick && rm -rf $(CUDA_OUT)/quick
	$(PY) -m mnist_bench.throughput --device cuda --out $(CUDA_OUT) --name throughput.csv --threads 1

clean:
	rm -rf $(VENV)
