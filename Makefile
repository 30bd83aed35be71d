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

# Browser tests need Chromium (Debian's package); installed when missing and we may.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (browser tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: browser tests will be skipped"; fi; \
	fi

# Every test, the slow end-to-end, cluster and browser ones included.
test: $(BIN)/.installed system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) sbsearch-runs mlflow.db mlartifacts
