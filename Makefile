# Two commands for a fresh machine: `make demo` and `make test`.
# Everything else (virtualenv, packages, embedded servers) is installed here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# Other Python versions, each in its own virtualenv (.venv-3.10, ...), found
# through pyenv or as python3.X on PATH (scripts/find-python).
#   make test         also runs the core subset on CI_PYTHONS
#   make test-matrix  runs the whole suite on MATRIX_PYTHONS
CI_PYTHONS     ?= 3.10 3.13
MATRIX_PYTHONS ?= 3.10 3.11 3.12 3.13
# The core subset: the top-level test modules (not tests/reliability, tests/celery,
# tests/lightrag), without tests marked slow or packaging.
CORE_TESTS ?= $(wildcard tests/test_*.py)
CORE_ARGS  ?= -m "not slow and not packaging"

.PHONY: demo test lint typecheck check-format unit bench test-matrix clean
.PRECIOUS: .venv-%/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neopool demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck unit $(addprefix core-,$(CI_PYTHONS))

test-matrix: $(addprefix suite-,$(MATRIX_PYTHONS))

.venv-%/.installed: pyproject.toml
	@py="$$(scripts/find-python $*)" && echo "Python $*: $$py" && "$$py" -m venv --clear .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

# core-3.10: the core subset on Python 3.10; suite-3.10: the whole suite.
core-%: .venv-%/.installed
	.venv-$*/bin/python -m pytest $(CORE_TESTS) $(CORE_ARGS) $(PYTEST_ARGS)

suite-%: .venv-%/.installed
	.venv-$*/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .venv-* build dist .pytest_cache .mypy_cache .ruff_cache
