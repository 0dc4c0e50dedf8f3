# Archipelago's entry points. On a fresh machine:  make demo  |  make test
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py)
# The CPU wheel of torch 2.13.0 lies here on these machines; without it pip fetches a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: setup proto redis demo test lint bench clean

setup: $(STAMP) $(GENERATED)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Archipelago needs Python 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(FIND_LINKS) torch==2.13.0
	$(BIN)/pip install --quiet $(FIND_LINKS) -e '.[dev]'
	touch $@

# Generated modules are built from the .proto files, never edited.
$(GENERATED) &: $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

proto: $(GENERATED)

demo: setup
	$(BIN)/archipelago demo

test: setup redis lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The store tests run against a real Redis server; as root on Debian it is installed here.
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (Debian package) for the tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "the tests need redis-server: install it (e.g. apt-get install redis-server)"; exit 1; \
	  fi; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) proto/*_pb2.py proto/*_pb2.pyi proto/*_pb2_grpc.py .pytest_cache .mypy_cache .ruff_cache *.egg-info
