PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/relay.toml

.PHONY: run test soak lint typecheck install dev clean bench-ingest bench-longpoll bench-sse bench-sse-idle bench-webhooks bench-scale bench-tap bench-cluster cluster cluster-stop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

run: install
	$(BIN)/relay serve --config $(CONFIG)

lint: dev
	$(BIN)/ruff check relay tests bench examples
	$(BIN)/ruff format --check relay tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

soak: dev
	$(BIN)/python -m pytest -q -m slow --soak

bench-ingest: dev
	$(BIN)/python -m bench.ingest --no-request-log --thread-writer --ceiling --forward

bench-longpoll: dev
	$(BIN)/python -m bench.longpoll

bench-sse: dev
	$(BIN)/python -m bench.sse

bench-sse-idle: dev
	$(BIN)/python -m bench.sse_idle

bench-webhooks: dev
	$(BIN)/python -m bench.webhooks

# EVENTS=20000 for a smaller store; SCALE_ARGS=--smoke for a quick run.
bench-scale: dev
	$(BIN)/python -m bench.scale --events $(or $(EVENTS),1000000) $(SCALE_ARGS)

bench-tap: dev
	$(BIN)/python -m bench.tap

N ?= 3

cluster: install
	scripts/cluster start $(N)

cluster-stop:
	scripts/cluster stop

bench-cluster: dev
	$(BIN)/python -m bench.cluster

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
