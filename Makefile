# Everything a fresh machine needs, from the project's own files.
#   make setup   .venv with pinned packages (alfworld builds jericho and fast-downward: ~5 min once)
#   make data    the default step JSONL for all three environments (data/generated/)
#   make test    the test suite (tiny random model, real environments)
PY := .venv/bin/python
SEED ?= 0

.PHONY: setup data test demo clean

setup: .venv/.done

.venv/.done: requirements.txt requirements-nodeps.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

data: setup
	$(PY) make_data.py --env all --seed $(SEED) --out data/generated

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf data/generated cache out
