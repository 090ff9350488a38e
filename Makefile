# Two set-up commands: `make demo` and `make test`. Both create .venv from scratch when it is missing
# or older than pyproject.toml. torch is installed first, pinned, so pip takes the CPU wheel instead of
# resolving a multi-GB CUDA build through a dependency.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= test,verl,tabpfn

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the unit layer only (no end-to-end runs, no verl): under a minute, for the edit-test loop
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not verl" --ignore=tests/v05_rl/verl

demo: $(STAMP)
	$(VENV)/bin/v05 demo

bench: $(STAMP)
	$(VENV)/bin/v05 bench estimator

clean:
	rm -rf $(VENV) build *.egg-info
