# Every target creates the virtualenv it needs; only python3.11 must exist.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: up test test-quick lint bench fuzz clean

$(BIN)/cachesvc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,load]'
	touch $@

## make up: install, then run the whole stack on one machine (Ctrl-C stops it)
up: $(BIN)/cachesvc
	$(BIN)/cachesvc up

## make test: install, then run the linter, the type checker (mypy --strict on
## cachesvc, node_agent, tests, loadtest, sim and bench, see pyproject.toml) and the whole test suite
test: $(BIN)/cachesvc
	$(BIN)/ruff check cachesvc node_agent tests bench loadtest sim
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

## make test-quick: the linter and every test not marked slow (under a minute here);
## the slow ones start processes or run for seconds: `make test` runs them (CI does)
test-quick: $(BIN)/cachesvc
	$(BIN)/ruff check cachesvc node_agent tests bench loadtest sim
	$(BIN)/python -m pytest -m "not slow"

## make fuzz: the long fuzz of unpacking and of the index parser, in rounds until
## FUZZ_MINUTES (default 30) are up or a round fails (niced; failures are kept in .hypothesis/ and replayed first)
FUZZ_MINUTES ?= 30
fuzz: $(BIN)/cachesvc
	end=$$(( $$(date +%s) + 60 * $(FUZZ_MINUTES) )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
		round=$$((round + 1)); echo "== fuzz round $$round, $$(date)"; \
		HYPOTHESIS_PROFILE=long nice -n 10 $(BIN)/python -m pytest -p no:cacheprovider \
			--hypothesis-show-statistics -q tests/unpack/test_unpack_fuzz.py \
			tests/unpack/test_index_fuzz.py || exit 1; \
	done

lint: $(BIN)/cachesvc
	$(BIN)/ruff check cachesvc node_agent tests bench loadtest sim
	$(BIN)/ruff format --check cachesvc node_agent tests bench loadtest sim

bench: $(BIN)/cachesvc
	$(BIN)/python bench/read_path.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
