# Two commands on a fresh machine: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-bundled.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-bundled.txt
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m medusa_jax.backends.cpu || echo "note: no CPU decode kernel; decoding uses XLA's dots"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	bash experiments/demo.sh

clean:
	rm -rf $(VENV) runs
