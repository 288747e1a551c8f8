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

.PHONY: run test

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

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
