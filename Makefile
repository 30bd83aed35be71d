# The two commands of the README. Each sets itself up: a virtual environment in .venv with
# sbsearch and everything its tests need (torch comes from the local wheel cache where there is one).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: quickstart test setup system-deps clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# The quickstart sweep: digits, small CNN, 20 trials, results in sbsearch-runs/quickstart.
quickstart: $(BIN)/.installed
	$(BIN)/sbsearch run search_spaces/quickstart.yaml --out sbsearch-runs/quickstart

# Browser tests need Chromium, and the tests of sweeps that span machines a PostgreSQL server (the tests
# start it themselves on 127.0.0.1): Debian's packages, installed when missing and we may.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (browser and multi-machine tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not installed:$$missing (their tests will be skipped)"; fi; \
	fi

# Every test, the slow end-to-end, cluster and browser ones included.
test: $(BIN)/.installed system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) sbsearch-runs mlflow.db mlartifacts
