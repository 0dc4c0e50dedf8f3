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

.PHONY: setup proto test-deps demo test lint bench clean

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

test: setup test-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What the test tiers run against, from Debian's packages (as root they are installed here,
# in one apt run): a real Redis for the store tests, Chromium for the dashboard's browser
# tests, a Docker engine and debootstrap (the locally built base image) for the container
# tests. Without root, a missing Redis stops the run; the browser and Docker tiers skip
# and say why.
TEST_PACKAGES := redis-server:redis-server chromium:chromium dockerd:docker.io debootstrap:debootstrap
test-deps:
	@missing=""; for pair in $(TEST_PACKAGES); do \
	  command -v "$${pair%%:*}" >/dev/null || [ -x "/usr/sbin/$${pair%%:*}" ] || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing for the tests (Debian packages):$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "the tests need:$$missing (e.g. apt-get install$$missing)"; \
	    command -v redis-server >/dev/null || exit 1; \
	  fi; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) proto/*_pb2.py proto/*_pb2.pyi proto/*_pb2_grpc.py .pytest_cache .mypy_cache .ruff_cache *.egg-info
