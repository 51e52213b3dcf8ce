# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv and
# installs what it needs from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_DATA := data/cooking
DEMO      := artifacts/demo
PORT ?= 8000

.PHONY: demo test lint bench-peers bench-http bench-encoders bench-annif bench-fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# serving + builder
$(VENV)/.demo-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[build]'
	touch $@

# everything the tests exercise, the MiniLM export (CPU torch) included
$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[build,dev,export]'
	touch $@ $(VENV)/.demo-deps

## demo: the shipped cooking questions -> bundle (with a tuned threshold) -> eval -> predict -> serve on :$(PORT) (a page to try it at /)
demo: $(VENV)/.demo-deps
	$(BIN)/xmc build $(DEMO_DATA)/train.jsonl --out $(DEMO) --name cooking --force --tune-threshold
	$(BIN)/xmc eval $(DEMO) $(DEMO_DATA)/test.jsonl
	$(BIN)/xmc predict $(DEMO) "how long to boil an egg" \
	  "can I freeze bread dough overnight" --top-k 3
	@echo "serving $(DEMO) on http://127.0.0.1:$(PORT) (try it at /, API docs at /docs); Ctrl-C stops"
	$(BIN)/xmc serve $(DEMO) --port $(PORT)

## test: the whole suite (the same command CI runs): ruff, mypy (models, service, xmc), pytest
test: lint
	$(BIN)/pytest -q

lint: $(VENV)/.test-deps
	$(BIN)/ruff check models service xmc tests benchmarks
	$(BIN)/mypy

bench-peers: $(VENV)/.test-deps
	$(BIN)/pip install -q -e '.[bench]'
	test -x benchmarks/.venv-pecos/bin/python || bash benchmarks/pecos_env.sh
	$(BIN)/python -m benchmarks.peers ../shared/data/cooking_stackexchange \
	  ../shared/data/reuters21578_modapte ../shared/data/delicious_mulan_bow

## bench-http: load test of `xmc serve` (2 workers) on a cooking bundle; uses wrk when installed
bench-http: $(VENV)/.test-deps
	$(BIN)/xmc build ../shared/data/cooking_stackexchange/train.jsonl --out artifacts/cooking --force
	$(BIN)/python -m benchmarks.http artifacts/cooking

## bench-encoders: MiniLM export (fp32, int8) speed, and TF-IDF vs fused accuracy on cooking
bench-encoders: $(VENV)/.test-deps
	$(BIN)/python -m benchmarks.encoders --out artifacts/encoders
	$(BIN)/python -m benchmarks.fusion ../shared/data/cooking_stackexchange --int8

## bench-fuzz: schemathesis over every operation of the served spec (over 1,000 cases, --checks all), open and with API keys
bench-fuzz: $(VENV)/.test-deps
	$(BIN)/xmc build $(DEMO_DATA)/train.jsonl --out artifacts/fuzz/cooking/1 --name cooking --force --tune-threshold
	$(BIN)/python -m benchmarks.fuzz artifacts/fuzz
	$(BIN)/python -m benchmarks.fuzz artifacts/fuzz --keys

## bench-annif: Annif 1.4.3 (its own venv) and xmc-serve side by side through Annif's REST API
bench-annif: $(VENV)/.test-deps
	test -x benchmarks/.venv-annif/bin/annif || bash benchmarks/annif_env.sh
	$(BIN)/python -m benchmarks.annif ../shared/data/cooking_stackexchange --seconds 6

clean:
	rm -rf artifacts .numba_cache .pytest_cache
