# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stamp-install
TEST_STAMP := $(VENV)/.stamp-test
FAST_STAMP := $(VENV)/.stamp-test-fast
# The inner loop's lane (markers: pyproject.toml, tests/lanes.py).
FAST_LANE := not slow and not system and not torch
# pytest exits 5 when no test ran (nothing collected, or every test deselected): an error.
PYTEST = $(PY) -m pytest -q $(1) $(PYTEST_ARGS) || { rc=$$?; \
	[ $$rc -ne 5 ] || echo "make: no test ran (check PYTEST_ARGS: $(PYTEST_ARGS))" >&2; exit $$rc; }

.PHONY: install test test-fast demo longrun bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# -qq: setuptools' notice that every editable install prints is not a problem of
	@# ours; errors (a failed build, a dependency conflict) still show, and stop make.
	$(PIP) install -qq -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps moshi==0.2.13
	touch $@

# The package's `test` extra (pytest, safetensors to write checkpoints in Kyutai's layout, and
# the evaluation's readers and scorer): no torch, no system tools, nothing needing root.
$(FAST_STAMP): $(STAMP)
	$(PIP) install -qq -e ".[test]"
	touch $@

install: $(STAMP)

# Everything (what CI runs, through .ci/run). Missing system tools: the script says how to
# install them and the tests needing them skip (in CI, with CI set, both fail the run).
test: $(TEST_STAMP)
	bash scripts/install-system-test-deps.sh
	$(call PYTEST,)

# The inner loop: no slow, system or torch tests (about two minutes on 2 cores).
test-fast: $(FAST_STAMP)
	$(call PYTEST,-m "$(FAST_LANE)")

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
