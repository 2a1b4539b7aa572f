# formcall: the handful of commands README documents.
#   make dev     run the whole system locally (embedded Postgres, local QStash, fake Vapi) and play the demo
#   make serve   the same stack, kept running (URLs, dev keys and commands to try; Ctrl-C stops it)
#   make test    install everything into .venv / .venv-sam, then run the whole test suite
#   make unit    the offline unit tests only (seconds)
#   make lint    ruff (lint and format check) over the tree and mypy on shared/ (part of make test)
#   make build   sam validate --lint && sam build
#   make bench   benchmarks (writes BENCHMARKS.md and docs/*.png)
#   make chaos   the full chaos run and 10,000+ hostile-input cases (figures into BENCHMARKS.md)
#   make audit   pip-audit of the pinned dependencies
#   make lock    re-resolve uv.lock after editing a pin, re-export the layer's and SAM's requirements
#   make clean   remove the venvs, the SAM build and the local stack's state (.dev)
#   make .venv-cli/.installed   the operator CLI alone (the cli extra), as the deploy jobs install it

SHELL := /bin/bash
VENV := .venv
SAM_VENV := .venv-sam
# The operator CLI alone (the cli extra): what the deploy job runs `formcall doctor` with.
CLI_VENV := .venv-cli
SAM := $(SAM_VENV)/bin/sam

# Lambda runs python3.12, so everything here does too. pyenv's shim only answers when
# PYENV_VERSION names a version, so also look in pyenv's versions folder directly.
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v "$$p" || echo "$$p"; } && break; done)

# uv installs both venvs from pinned, hashed lists: uv.lock, and layers/sam-requirements.txt
# (compiled from layers/sam-requirements.in). A fresh machine has only pip and Python 3.12, so
# without that uv on PATH make installs it with pip into .uv/ first.
UV_VERSION := 0.13.9
UV ?= $(or $(shell uv --version 2>/dev/null | grep -qx 'uv $(UV_VERSION)\( .*\)\?' && command -v uv),.uv/bin/uv)
# uv would otherwise download a CPython when it finds none: use the 3.12 found above, or fail.
export UV_PYTHON_DOWNLOADS := never
# The layer ships the lock's runtime packages but boto3 and what only it needs: the python3.12
# Lambda runtime has them (tests/integration/test_sam.py checks this list against the lock).
FROM_RUNTIME := boto3 botocore s3transfer python-dateutil six urllib3
LAYER_EXPORT := export --frozen --no-dev --no-emit-project --format requirements-txt \
	$(addprefix --no-emit-package ,$(FROM_RUNTIME))

.PHONY: dev serve test unit lint build bench chaos audit lock clean

.uv/bin/uv:
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is required (Lambda's python3.12 runtime): install it, e.g. 'pyenv install 3.12'" >&2; exit 1; }
	$(PYTHON312) -m venv .uv
	.uv/bin/pip install --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is required (Lambda's python3.12 runtime): install it, e.g. 'pyenv install 3.12'" >&2; exit 1; }
	$(UV) sync --frozen --extra dev --python $(PYTHON312)
	touch $@

$(CLI_VENV)/.installed: pyproject.toml uv.lock | $(UV)
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is required (Lambda's python3.12 runtime): install it, e.g. 'pyenv install 3.12'" >&2; exit 1; }
	UV_PROJECT_ENVIRONMENT=$(CLI_VENV) $(UV) sync --frozen --extra cli --python $(PYTHON312)
	touch $@

$(SAM_VENV)/.installed: layers/sam-requirements.txt | $(UV)
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is required" >&2; exit 1; }
	$(UV) venv --allow-existing --python $(PYTHON312) $(SAM_VENV)
	$(UV) pip sync --python $(SAM_VENV)/bin/python --require-hashes layers/sam-requirements.txt
	touch $@

dev: $(VENV)/.installed
	$(VENV)/bin/formcall dev $(ARGS)

serve: $(VENV)/.installed
	$(VENV)/bin/formcall dev --serve $(ARGS)

# The console's browser tests (tests/browser, `pytest -m browser`) drive Debian's chromium and
# its matching driver: installed from apt where missing, never downloaded from anywhere else.
.PHONY: browser-deps
browser-deps:
	@command -v chromedriver >/dev/null || { apt-get update && apt-get install -y chromium chromium-driver; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Three pytest processes (pytest-xdist), each taking whole files so a file's fixtures (a local
# QStash, a stack) start once: most tests wait on stacks and timers, not on a CPU.
TEST_WORKERS ?= 3
test: $(VENV)/.installed $(SAM_VENV)/.installed browser-deps lint
	SAM_CLI=$(abspath $(SAM)) PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/pytest \
		-n $(TEST_WORKERS) --dist loadfile $(ARGS)

unit: $(VENV)/.installed
	$(VENV)/bin/pytest tests/unit $(ARGS)

build: $(SAM_VENV)/.installed $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(SAM) validate --lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(SAM) build

bench: $(VENV)/.installed $(SAM_VENV)/.installed
	SAM_CLI=$(abspath $(SAM)) PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m formcall_dev.tools.bench $(if $(QUICK),--quick) $(ARGS)

chaos: $(VENV)/.installed
	$(VENV)/bin/python -m formcall_dev.tools.chaos --write BENCHMARKS.md $(ARGS)

# Needs PyPI's per-release vulnerability data (pip-audit); run where it is reachable (the
# GitHub workflow). Fails, rather than passes, when the data cannot be read.
audit: $(VENV)/.installed
	FORMCALL_REQUIRE_AUDIT=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/integration/test_secret_hygiene.py -k vulnerabilities

lock: | $(UV)
	$(UV) lock --python $(PYTHON312)
	$(UV) $(LAYER_EXPORT) --output-file layers/shared/requirements.txt
	$(UV) pip compile --universal --python-version 3.12 --generate-hashes layers/sam-requirements.in \
		--output-file layers/sam-requirements.txt

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CLI_VENV) .uv .aws-sam .dev formcall.egg-info
