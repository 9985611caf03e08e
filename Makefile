# Two entry points (README quick start): `make demo` and `make test`.
# Each creates its own virtual environment, so a fresh machine needs only Python 3.11+ and a C compiler.
# `make demo` installs lockgate alone (the server, its CLI and the demo); `make test` adds the
# test extra (pytest, tritonclient, psycopg, ...), a superset, so one venv serves both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := pyproject.toml setup.py $(shell find proto src -name '*.proto' -o -name '*.pyx' 2>/dev/null)

.PHONY: demo test install install-demo install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

$(VENV)/.installed-demo: $(SOURCES) | $(VENV)/bin/python
	$(PIP) install -e '.[http]'
	touch $@

$(VENV)/.installed-test: $(SOURCES) | $(VENV)/bin/python
	$(PIP) install -e '.[test,http,explain]'
	touch $@ $(VENV)/.installed-demo

# Developer setup: the test extra too.
install: install-test

install-demo: $(VENV)/.installed-demo

install-test: $(VENV)/.installed-test

demo: install-demo
	$(VENV)/bin/lockgate demo --dir demo-repo

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/lockgate/_proto demo-repo
	find src -name '*.so' -delete
