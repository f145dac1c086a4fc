# The two README commands: `make test` and `make demo`. Both install into .venv when needed;
# the install is skipped while setup.py, constraints.txt and the installer are unchanged.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install test demo lint format clean gpu-check

install: $(STAMP)

$(STAMP): setup.py constraints.txt .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $(STAMP)

# The suite in two pytest processes side by side (tests/run_parts.py); TEST_PARTS=1: in one.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tests/run_parts.py

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

# The offline GPU acceptance run (README "GPU acceptance run"): installs nothing from the network and
# never runs the installer; the Python that already has torch and triton (.venv's if there is one).
# make gpu-check [OUT=gpu-check-out] [WHEELS=dir-of-wheels] [STEP_ARGS="key=value ..."] [GPU_PYTHON=python3]
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
OUT ?= gpu-check-out
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT) $(if $(WHEELS),--wheels $(WHEELS)) $(STEP_ARGS)
