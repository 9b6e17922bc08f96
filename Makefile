# Two commands for a fresh machine: `make demo` and `make test`.
# Everything else (virtualenv, packages, embedded servers) is installed here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# Other Python versions, each in its own virtualenv (.venv-3.10, ...), found
# through pyenv or as python3.X on PATH (scripts/find-python).
#   make test         also runs the core subset on CI_PYTHONS; an interpreter that
#                     is missing is skipped with a message, or fails the run when
#                     STRICT_PYTHONS=1 (as .ci/run sets)
#   make test-matrix  runs the whole suite on MATRIX_PYTHONS (all must exist; a
#                     failure on one version does not stop the others)
# The virtualenvs are created two at a time, before any of their tests run.
STRICT_PYTHONS ?= 0

# CPython 3.11's tracebacks parse source lines (ast.parse) to draw their ^^^ markers,
# and its parser keeps one recursion counter for all threads: a traceback logged in a
# test's background thread while pytest imports and rewrites a module in the main
# thread can fail that import with "SystemError: AST constructor recursion depth
# mismatch". Tracebacks without column ranges parse nothing.
export PYTHONNODEBUGRANGES := 1
CI_PYTHONS     ?= 3.10 3.13
MATRIX_PYTHONS ?= 3.10 3.11 3.12 3.13
# The core subset: the top-level test modules except the demo's, and the runner's
# (how calls and loops end differs between Python versions), without tests marked
# slow or packaging.
CORE_TESTS ?= $(filter-out tests/test_demo.py,$(wildcard tests/test_*.py)) \
              tests/celery/test_runner.py tests/reliability/test_lifecycle.py
# Added on one version: how a process with loops in every state exits (3.13.0-3.13.2
# print an error at exit for a thread that a finaliser made known to threading again).
CORE_EXTRA_3.13 ?= tests/reliability/test_release_matrix.py
CORE_ARGS  ?= -m "not slow and not packaging"
# Run once more over TLS by `make test` (NEOPOOL_TEST_TLS=1: every connection the
# neopool_bolt and neopool_proxy fixtures give goes through a TLS-terminating proxy whose
# certificate a throwaway CA signed): the core pool tests, churn (test_registry), fork,
# restart, and the TLS and credential-rotation tests.
TLS_TESTS ?= tests/test_loop_pool.py tests/test_registry.py tests/reliability/test_fork.py \
             tests/reliability/test_restart.py tests/test_tls.py tests/test_credentials.py \
             tests/reliability/test_tls_proxy.py

.PHONY: demo test lint typecheck check-format unit unit-tls bench test-matrix clean
.PRECIOUS: .venv-%/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neopool demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

unit-tls: $(STAMP)
	NEOPOOL_TEST_TLS=1 $(PY) -m pytest $(TLS_TESTS) $(PYTEST_ARGS)

test: lint typecheck unit unit-tls
	$(MAKE) --no-print-directory -j2 $(addprefix venv-,$(CI_PYTHONS))
	$(MAKE) --no-print-directory $(addprefix core-,$(CI_PYTHONS))

test-matrix:
	$(MAKE) --no-print-directory -j2 $(addprefix .venv-,$(addsuffix /.installed,$(MATRIX_PYTHONS)))
	$(MAKE) --no-print-directory --keep-going $(addprefix suite-,$(MATRIX_PYTHONS))

.venv-%/.installed: pyproject.toml
	@py="$$(scripts/find-python $*)" && echo "Python $*: $$py" && "$$py" -m venv --clear .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

# venv-3.10: .venv-3.10, if Python 3.10 can be found (or STRICT_PYTHONS=1: must be).
venv-%:
	@if [ "$(STRICT_PYTHONS)" = 1 ] || scripts/find-python $* >/dev/null 2>&1; then \
	    $(MAKE) --no-print-directory .venv-$*/.installed; \
	else \
	    echo "*** Python $* not found: skipping it (pyenv install $*, or STRICT_PYTHONS=1 to fail)"; \
	fi

# core-3.10: the core subset on Python 3.10; suite-3.10: the whole suite.
core-%:
	@$(MAKE) --no-print-directory venv-$*
	@if [ -f .venv-$*/.installed ]; then \
	    echo "--- core subset on Python $*: $(CORE_TESTS) $(CORE_EXTRA_$*)"; \
	    .venv-$*/bin/python -m pytest $(CORE_TESTS) $(CORE_EXTRA_$*) $(CORE_ARGS) $(PYTEST_ARGS); \
	fi

suite-%: .venv-%/.installed
	.venv-$*/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .venv-* build dist .pytest_cache .mypy_cache .ruff_cache
