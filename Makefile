# `make test` and `make demo` set up .venv on first use (CPU torch first, so no CUDA wheels are pulled).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(VENV)/bin/trl-agent-distill demo --config recipes/toy_demo.yaml

clean:
	rm -rf $(VENV) outputs
