# Everything a fresh machine needs, from the project's own files.
#   make setup   .venv with pinned packages (alfworld builds jericho and fast-downward: ~5 min once)
#   make data    the default step JSONL for all four environments (data/generated/)
#   make test    the test suite (tiny random model, real environments; 2 pytest workers; CI runs this)
#   make demo    the whole study, small, on the embedded SmolLM2-135M (16 min on 2 CPU cores from a fresh clone, measured)
#   make study   the study on ALFWorld, sized for 2 hours on 2 CPU cores (study.sh; resumes after a kill)
#   make study-real ALFWORLD_DATA=DIR   the study per environment (ENVS="alfworld scienceworld bfcl bfcl_mt"; real ALFWorld games),
#                training seeds 0 1 2, then studies/claims/ across them (ALFWorld about 6.5 h)
#   make test-slow   end-to-end tests on the real embedded model (minutes)
#   make bench-deps  TRL, only for bench/train_speed.py
#   make gpu-check   the CUDA path end to end on a random-weight Qwen3-style model (bench/gpu_check.py)
PY := .venv/bin/python
SEED ?= 0
ENVS ?= alfworld scienceworld bfcl bfcl_mt
STUDIES_REAL := studies/study_real studies/study_sciworld studies/study_bfcl studies/study_bfcl_mt  # one per environment: the claims table's columns

.PHONY: setup data test test-slow demo study study-real alfworld-data-given sweep bench-deps gpu-check clean

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
	$(PY) -m pytest -q -n 2 --dist worksteal tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

demo: setup
	SEED=$(SEED) bash demo.sh

study: setup
	SEED=$(SEED) bash study.sh

# One study per environment, one after another (each resumes), then the claims table across every one committed.
study-real: alfworld-data-given setup
	for env in $(ENVS); do SEED=$(SEED) ENV=$$env ALFWORLD_DATA="$(ALFWORLD_DATA)" bash study.sh || exit 1; done
	$(PY) report.py --combine $$(for d in $(STUDIES_REAL); do [ ! -f $$d/claims.csv ] || echo $$d; done) --combine-out studies/claims

alfworld-data-given:
	@case " $(ENVS) " in *" alfworld "*) test -n "$(ALFWORLD_DATA)" || { echo "error: make study-real needs ALFWORLD_DATA=DIR, a folder holding json_2.1.1/train and json_2.1.1/valid_seen (or ENVS without alfworld)" >&2; exit 2; };; esac

sweep: setup
	bash sweep.sh

gpu-check:
	$(PY) bench/gpu_check.py

bench-deps: setup
	$(PY) -m pip install --quiet -r bench/requirements-trl.txt

clean:
	rm -rf data/generated data/demo cache out results
