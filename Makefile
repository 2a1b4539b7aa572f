# formcall: the handful of commands README documents.
#   make dev     run the whole system locally (embedded Postgres, local QStash, fake Vapi) and play the demo
#   make test    install everything into .venv / .venv-sam, then run the whole test suite
#   make build   sam validate --lint && sam build
#   make bench   benchmarks (writes BENCHMARKS.md and docs/*.png)
#   make chaos   the full chaos run and 10,000+ hostile-input cases (figures into BENCHMARKS.md)
#   make audit   pip-audit of the pinned dependencies

SHELL := /bin/bash
VENV := .venv
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam

# Lambda runs python3.12, so everything here does too. pyenv's shim only answers when
# PYENV_VERSION names a version, so also look in pyenv's versions folder directly.
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v "$$p" || echo "$$p"; } && break; done)

.PHONY: dev serve test unit build bench chaos audit clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is required (Lambda's python3.12 runtime): install it, e.g. 'pyenv install 3.12'" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

$(SAM_VENV)/.installed: layers/sam-requirements.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 is required" >&2; exit 1; }
	$(PYTHON312) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --upgrade pip
	$(SAM_VENV)/bin/pip install --quiet -r layers/sam-requirements.txt
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

test: $(VENV)/.installed $(SAM_VENV)/.installed browser-deps
	SAM_CLI=$(abspath $(SAM)) PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/pytest $(ARGS)

unit: $(VENV)/.installed
	$(VENV)/bin/pytest tests/unit $(ARGS)

build: $(SAM_VENV)/.installed $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(SAM) validate --lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(SAM) build

bench: $(VENV)/.installed $(SAM_VENV)/.installed
	SAM_CLI=$(abspath $(SAM)) PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m formcall_dev.bench $(if $(QUICK),--quick) $(ARGS)

chaos: $(VENV)/.installed
	$(VENV)/bin/python -m formcall_dev.chaos --write BENCHMARKS.md $(ARGS)

# Needs PyPI's per-release vulnerability data (pip-audit); run where it is reachable (the
# GitHub workflow). Fails, rather than passes, when the data cannot be read.
audit: $(VENV)/.installed
	FORMCALL_REQUIRE_AUDIT=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/integration/test_secret_hygiene.py -k vulnerabilities

clean:
	rm -rf $(VENV) $(SAM_VENV) .aws-sam .dev
