# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stamp-install
TEST_STAMP := $(VENV)/.stamp-test

.PHONY: install test demo longrun bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps moshi==0.2.13
	touch $@

install: $(STAMP)

test: $(TEST_STAMP)
	bash scripts/install-system-test-deps.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Offline demo: a tiny random-weight model (generated into the cache on first use) answers
# the sample question about the sample picture through the real pipeline, in file mode.
demo: $(STAMP)
	$(VENV)/bin/moshivis-mlx --demo

# An hour of audio (45,000 steps) through file mode on the tiny model; reports RSS growth.
longrun: $(STAMP)
	$(PY) scripts/longrun.py --steps 45000

# The quick benchmark configuration (tiny random model); full size: see the README.
bench: $(STAMP)
	mkdir -p out
	$(VENV)/bin/moshivis-bench --config tiny --steps 500 --json out/bench-tiny.json --plot out/bench-tiny.png

lint: $(TEST_STAMP)
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check moshivis_mlx weights_convert cli tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
