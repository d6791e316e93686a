# Two entry points for a fresh machine: `make demo` (the whole pipeline, miniature) and `make test`.
# Each creates the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# `make demo SEED=1`: every random draw of the miniature (data, sentences, both trainings) follows from it.
SEED ?= 0
# The development and CI machines keep this torch build on disk; override on a cluster.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 || python3 -m venv --clear $(VENV)  # none yet, or left without pip
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

.PHONY: install lint test demo
install: $(VENV)/.installed

# ruff comes with the test extra; its rules are in pyproject.toml.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# One pytest-xdist worker per core, each with one torch thread (tests/conftest.py): the suite's tensors are too small
# for a second thread to help, so this halves its time on a 2-core machine. `pytest tests/x.py` runs serially.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses 8

demo: $(VENV)/.installed
	$(PY) -m lvm.demo --seed $(SEED)
