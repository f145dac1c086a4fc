# The two README commands: `make test` and `make demo`. Both install into .venv when needed;
# the install is skipped while setup.py, constraints.txt and the installer are unchanged.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install test demo lint format clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash configs/demo.sh $(VENV)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .demo
