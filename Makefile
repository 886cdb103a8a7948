# Two entry points that do all set-up themselves on a fresh machine:
#   make demo   -> venv + the lean install (no torch) + the whole pipeline on the offline demo data
#   make test   -> venv + the dev, ray and clip extras + lint + the test suite (what .ci/run runs)
# One venv serves both; each install has its own stamp, so `make demo` never pulls in torch and
# `make test` after `make demo` only adds the extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LEAN := $(VENV)/.dedup-lean
FULL := $(VENV)/.dedup-dev-ray-clip

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(LEAN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# The tests exercise CLIP (with tiny models they build), Ray and the notebook.
$(FULL): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,ray,clip]'
	touch $@ $(LEAN)

install: $(LEAN)

demo: $(LEAN)
	$(BIN)/dedup demo --out demo_out

lint: $(FULL)
	$(BIN)/ruff check dedup tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_out
