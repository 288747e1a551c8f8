# Two entry points for a fresh clone: `make run` and `make test`.
# Both create .venv on first use and reinstall only when a requirements file changes.
# TORCH picks the torch build: the default is the CPU build; on a CUDA machine run
# `make run TORCH=torch` (see README).

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m core.train --preset tiny --prompts assets/prompts/tiny.txt --out runs/tiny-demo \
		--overwrite --batch-size 64 --buffer-size 256 --lr 1e-3

test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q
