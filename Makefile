# Keyroute: `make run` serves the site, `make test` runs the whole suite.
# Both set everything up first; `make setup` alone does the installs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# Two workers halve the suite's time; PYTEST_ARGS="-n 0 -k admin" runs a slice serially.
PYTEST_ARGS ?= -n 2
# Tools that import the settings but need no real secret and no local .env.
TOOL_ENV := ENV_FILE=/dev/null SECRET_KEY=tooling-only-not-a-secret

.PHONY: setup browser run serve test lint migrations clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Debian's Chromium for the browser tests (tests/browser), installed only when missing.
# Playwright drives it; it never downloads a browser of its own. Root, or sudo when not.
CHROMIUM := /usr/bin/chromium
SUDO = $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)

browser:
	@test -x $(CHROMIUM) || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	}

# Written once: a fresh SECRET_KEY and encryption key for this machine. Never committed.
.env: | setup
	$(PY) -c 'import secrets; from cryptography.fernet import Fernet; \
	print("# Written by make run for local development; never commit it."); \
	print("DEBUG=true"); \
	print("SECRET_KEY=" + secrets.token_urlsafe(50)); \
	print("CREDENTIALS_ENCRYPTION_KEYS=" + Fernet.generate_key().decode())' > $@
	@echo "Wrote .env with a new SECRET_KEY and CREDENTIALS_ENCRYPTION_KEYS: back it up."

# Development: uvicorn (ASGI, like production, so chat answers stream) reloading on change.
run: setup .env
	$(PY) manage.py migrate --no-input
	$(PY) manage.py ensure_admin
	@echo "Keyroute on http://$(HOST):$(PORT)/ (admin: http://$(HOST):$(PORT)/admin/)"
	$(PY) -m uvicorn platform_site.asgi:application --host $(HOST) --port $(PORT) \
	  --reload --reload-dir platform_site --reload-dir credentials --reload-dir llm

# Production: see README "Production". Settings come from the environment (or .env).
# Several workers share sessions and changes through Redis: one worker without it.
WORKERS ?= $(if $(filter redis%,$(CACHE_URL)),2,1)
# Each worker keeps its metrics in files there, and /metrics adds them up. The last run's
# files are removed before uvicorn starts: their counts would be added in.
METRICS_DIR := $(or $(PROMETHEUS_MULTIPROC_DIR),/tmp/keyroute-metrics-$(PORT))
serve: export WEB_CONCURRENCY = $(WORKERS)
serve: setup
	$(PY) manage.py check --deploy
	$(PY) manage.py migrate --no-input
	$(PY) manage.py collectstatic --no-input --verbosity 0
	mkdir -p -m 700 "$(METRICS_DIR)" && rm -f "$(METRICS_DIR)"/*.db
	PROMETHEUS_MULTIPROC_DIR="$(METRICS_DIR)" \
	$(PY) -m uvicorn platform_site.asgi:application --host $(HOST) --port $(PORT) \
	  --workers $(WORKERS) --loop uvloop --http httptools --no-access-log --proxy-headers

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(TOOL_ENV) $(PY) -m mypy .

migrations: setup
	$(TOOL_ENV) $(PY) manage.py makemigrations --check --dry-run --skip-checks

clean:
	rm -rf $(VENV) staticfiles
