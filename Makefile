# Two entry points: `make demo` runs the main job on the embedded default,
# `make test` runs the test suite (CI: .ci/run). Both create .venv on a fresh machine.
# `make test-fast` leaves out the tests marked slow: a loop of about 2 minutes on 2 cores.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The compilers `entityclip plan` uses (libtpu for TPUs, the CUDA plugin for GPUs), installed
# BESIDE the environment, in .venv/libtpu and .venv/jax-cuda, where only `entityclip plan` looks:
# importable, libtpu would make every other command take this machine for a TPU VM.
LIBTPU := libtpu==0.0.42.1
CUDA_PLUGIN := jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
PLAN_STAMP := $(VENV)/.plan-installed

.PHONY: demo test test-fast venv browser plan-deps clean

$(STAMP): requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

$(PLAN_STAMP): $(STAMP) Makefile
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/libtpu $(LIBTPU)
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/jax-cuda $(CUDA_PLUGIN)
	touch $(PLAN_STAMP)

plan-deps: $(PLAN_STAMP)

venv: $(STAMP) $(PLAN_STAMP)

demo: $(STAMP)
	$(BIN)/entityclip demo --workdir demo_out

# Headless Chromium for the browser tests (tests/test_pages_browser.py), from Debian, when missing and we are
# root (CI is). Without it those tests skip with one line, except under CI (env CI set), where they fail.
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
			&& command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
			|| echo "could not install chromium: the browser tests skip (and fail under CI)"; \
	fi

# pytest on every core (pytest-xdist; one file per worker, so a file's fixtures are built once), then
# the tests marked `serial` alone: their JAX processes wait on each other's collectives and
# heartbeats. pytest exits 5 when it collects no tests: not a failure here.
PYTEST := $(BIN)/python -m pytest -q
define pytest_status
rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; [ $$rc -eq 0 ] || status=$$rc
endef

test: $(STAMP) $(PLAN_STAMP) browser
	status=0; \
	$(PYTEST) -m "not serial" -n auto --dist loadfile tests; $(pytest_status); \
	$(PYTEST) -m serial tests; $(pytest_status); \
	exit $$status

test-fast: $(STAMP) $(PLAN_STAMP)
	status=0; $(PYTEST) -m "not slow" -n auto --dist loadfile tests; $(pytest_status); exit $$status

clean:
	rm -rf $(VENV) demo_out
