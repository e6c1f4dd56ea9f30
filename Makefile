# `make serve` and `make test` set everything up on a fresh machine (Python 3.11 + pip) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test test-quick install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Ray Serve (the `ray` extra) for tests/deploy/test_ray_serve.py; `make test` only, so `make serve` stays light
$(VENV)/.ray: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(PY) -m app

test: $(VENV)/.ray
	$(PY) -m pytest

test-quick: $(VENV)/.installed  # all but the tests marked slow (a real local Ray cluster)
	$(PY) -m pytest -m "not slow"

bench: $(VENV)/.installed
	$(PY) -m benchmarks.load

clean:
	rm -rf $(VENV) .pytest_cache runs
