# Two commands for a fresh machine: `make demo` and `make test`.
# Everything else (virtualenv, packages, embedded servers) is installed here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Virtualenvs are filled by uv (installed into .venv by pip, so nothing is needed
# beforehand but Python): a fresh environment in seconds instead of minutes.
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Where `make test` keeps each stage's time and each pytest run's JUnit report; its
# closing lines (scripts/ci_summary.py) fail the run if a stage failed or a pytest run
# executed no test (pytest's exit code 5 included).
CI_DIR ?= build/ci
# How many of test's four lanes run at once: the suite's Celery and LightRAG tests (worker
# processes); the rest of the suite; the other Pythons' environments (each with its
# driver) and core subsets; lint, types, docs and the TLS run.
CI_JOBS ?= 3
# The suite's two halves, of about the same length: the tests that run Celery workers
# and LightRAG, and the rest.
SUITE_WORKER_TESTS ?= tests/celery tests/lightrag
# pytest in `make test`: every tier (-m "" overrides pyproject's "not slow and not
# packaging"), the ten slowest tests, a JUnit report named after the run.
pytest_in_ci = scripts/stage pytest:$(1) $(2) -m pytest --junitxml=$(CI_DIR)/junit/$(1).xml \
               --durations=10 -m "" $(3) $(PYTEST_ARGS)

# Other Python versions, each in its own virtualenv (.venv-3.10, ...), found
# through pyenv or as python3.X on PATH (scripts/find-python).
#   make test         also runs the core subset on CI_PYTHONS; an interpreter that
#                     is missing is skipped with a message, or fails the run when
#                     STRICT_PYTHONS=1 (as .ci/run sets)
#   make test-matrix  runs the whole suite on MATRIX_PYTHONS (all must exist; a
#                     failure on one version does not stop the others)
# The virtualenvs are created with uv, before any of their tests run.
STRICT_PYTHONS ?= 0

# CPython 3.11's tracebacks parse source lines (ast.parse) to draw their ^^^ markers,
# and its parser keeps one recursion counter for all threads: a traceback logged in a
# test's background thread while pytest imports and rewrites a module in the main
# thread can fail that import with "SystemError: AST constructor recursion depth
# mismatch". Tracebacks without column ranges parse nothing.
export PYTHONNODEBUGRANGES := 1
CI_PYTHONS     ?= 3.10 3.13
MATRIX_PYTHONS ?= 3.10 3.11 3.12 3.13
# The core subset: the top-level test modules except the demo's and the docs' examples
# (a fresh interpreter each, about what the docs say: the whole suite runs them), and the
# runner's (how calls and loops end differs between Python versions), without tests
# marked slow or packaging.
CORE_TESTS ?= $(filter-out tests/test_demo.py tests/test_docs_examples.py,$(wildcard tests/test_*.py)) \
              tests/celery/test_runner.py tests/reliability/test_lifecycle.py
# Added on one version: how a process with loops in every state exits (3.13.0-3.13.2
# print an error at exit for a thread that a finaliser made known to threading again).
CORE_EXTRA_3.13 ?= tests/reliability/test_release_matrix.py
CORE_ARGS  ?= -m "not slow and not packaging"
# The fast tier (make test-fast): no server, no child process, nothing slow.
FAST_MARKS ?= not server and not subprocess and not slow and not packaging
# The neo4j driver range: the whole suite runs on the newest driver (.venv), and each
# other Python's environment pins one older driver, so every Python and every driver
# line runs the core subset once: the oldest driver pyproject.toml allows (its lower
# bound) on the oldest Python, 5.28 (the 5.x long-term line) on the newest.
# neo4j-rust-ext follows the driver's version. Each environment first imports neopool
# with warnings as errors.
NEO4J_OLDEST   := $(shell sed -n 's/^ *"neo4j>=\([0-9.]*\)".*/\1/p' pyproject.toml)
NEO4J_FOR_3.10 ?= $(NEO4J_OLDEST)
NEO4J_FOR_3.13 ?= 5.28.1
IMPORT_CHECK   := import neopool, neopool.celery, neopool.integrations.lightrag
# Run once more over TLS by `make test` (NEOPOOL_TEST_TLS=1: every connection the
# neopool_bolt and neopool_proxy fixtures give goes through a TLS-terminating proxy whose
# certificate a throwaway CA signed): the core pool tests, churn (test_registry), fork,
# restart, and the TLS and credential-rotation tests.
TLS_TESTS ?= tests/test_loop_pool.py tests/test_registry.py tests/reliability/test_fork.py \
             tests/reliability/test_restart.py tests/test_tls.py tests/test_credentials.py \
             tests/reliability/test_tls_proxy.py

.PHONY: demo test test-fast lint typecheck docs check-format unit unit-tls bench test-matrix \
        clean ci-suite ci-suite-workers ci-suite-rest ci-checks ci-versions envs cores import-check
.PRECIOUS: .venv-%/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(UV) pip install --quiet --python $(PY) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neopool demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The docs site, warnings as errors (skipped with a message while there is no mkdocs.yml).
docs: $(STAMP)
	@if [ -f mkdocs.yml ]; then \
	    NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict; \
	else \
	    echo "*** mkdocs.yml not found: the docs site is not built"; \
	fi

# The server-free tier: no server, no child process; seconds, not minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -m "$(FAST_MARKS)" $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

unit-tls: $(STAMP)
	NEOPOOL_TEST_TLS=1 $(PY) -m pytest $(TLS_TESTS) $(PYTEST_ARGS)

# Everything, in four lanes, CI_JOBS at a time, then one summary: each stage's
# time, each pytest run's counts, and a failure if anything failed or tested nothing.
test: $(STAMP)
	@rm -rf $(CI_DIR)
	@status=0; \
	$(MAKE) --no-print-directory --keep-going -j$(CI_JOBS) --output-sync=target \
	    ci-suite-workers ci-suite-rest ci-versions ci-checks || status=$$?; \
	$(PY) scripts/ci_summary.py $(CI_DIR) || status=1; \
	exit $$status

# Lanes 1 and 2: the whole suite, every tier, in two halves.
ci-suite: ci-suite-workers ci-suite-rest

ci-suite-workers: $(STAMP)
	@$(call pytest_in_ci,suite-workers,$(PY),$(SUITE_WORKER_TESTS))

ci-suite-rest: $(STAMP)
	@$(call pytest_in_ci,suite-rest,$(PY),$(addprefix --ignore=,$(SUITE_WORKER_TESTS)))

# Lane 4: lint, types, docs, then the TLS run.
ci-checks: $(STAMP)
	@scripts/stage lint $(MAKE) --no-print-directory lint
	@scripts/stage typecheck $(MAKE) --no-print-directory typecheck
	@scripts/stage docs $(MAKE) --no-print-directory docs
	@$(MAKE) --no-print-directory import-check
	@NEOPOOL_TEST_TLS=1 $(call pytest_in_ci,tls,$(PY),$(TLS_TESTS))

# Lane 3: the other Pythons' environments (each with its driver), then their core
# subsets, two at a time.
ci-versions: $(STAMP)
	@scripts/stage environments $(MAKE) --no-print-directory -j2 envs
	@$(MAKE) --no-print-directory --keep-going -j2 cores

envs: $(addprefix venv-,$(CI_PYTHONS))

cores: $(addprefix core-,$(CI_PYTHONS))

import-check: $(STAMP)
	@echo "--- neo4j $$($(PY) -c 'import neo4j; print(neo4j.__version__)') (.venv): $(IMPORT_CHECK)"
	@$(PY) -W error -c "$(IMPORT_CHECK)"

test-matrix:
	$(MAKE) --no-print-directory -j2 $(addprefix .venv-,$(addsuffix /.installed,$(MATRIX_PYTHONS)))
	$(MAKE) --no-print-directory --keep-going $(addprefix suite-,$(MATRIX_PYTHONS))

.venv-%/.installed: $(STAMP) pyproject.toml
	@py="$$(scripts/find-python $*)" && echo "Python $*: $$py" && \
	    $(UV) venv --quiet --clear --python "$$py" .venv-$*
	$(UV) pip install --quiet --python .venv-$*/bin/python -e '.[dev]' \
	    $(if $(NEO4J_FOR_$*),'neo4j==$(NEO4J_FOR_$*)')
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
	    echo "--- core subset on Python $* (neo4j $$(.venv-$*/bin/python -c 'import neo4j; print(neo4j.__version__)')): $(CORE_TESTS) $(CORE_EXTRA_$*)"; \
	    .venv-$*/bin/python -W error -c "$(IMPORT_CHECK)" || exit 1; \
	    $(call pytest_in_ci,core-$*,.venv-$*/bin/python,$(CORE_TESTS) $(CORE_EXTRA_$*) $(CORE_ARGS)); \
	fi

suite-%: .venv-%/.installed
	.venv-$*/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .venv-* build dist site .pytest_cache .mypy_cache .ruff_cache
