# Two entry points (README quick start): `make demo` and `make test`.
# Each creates its own virtual environment (lockgate with its test and explain extras), so a fresh machine needs only Python 3.11+ and a C compiler.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install install-test bench clean

$(VENV)/.installed: pyproject.toml setup.py $(shell find proto src -name '*.proto' -o -name '*.pyx' 2>/dev/null)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -e '.[test,explain]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lockgate demo --dir demo-repo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/lockgate/_proto
	find src -name '*.so' -delete
