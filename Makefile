# The two set-up-and-go commands (see README): `make demo` runs the main job, `make test` the tests.
# Both work from a fresh clone with only the system Python: they create .venv, install the pinned
# dependencies and build the extension (CPU + CUDA objects when nvcc is present) into it.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip install -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install test bench demo ext clean

$(VENV)/.deps: requirements.txt requirements-test.txt
	$(PY) -m venv $(VENV)
	$(PIP) "setuptools>=64" wheel -r requirements.txt -r requirements-test.txt
	touch $@

install: $(VENV)/.deps
	$(PIP) --no-build-isolation --no-deps -e .

test: install
	$(VPY) -m pytest tests bench -q -rs $(PYTEST_ARGS)
	$(VPY) scripts/perf_report.py --check

bench: install
	$(VPY) -m pytest bench/ --benchmark

demo: install
	$(VPY) -m transfusion_fast demo

# Rebuild the extension in place (development; CPU objects only unless WITH_CUDA=1).
ext:
	flock /tmp/transfusion_fast_build.lock env $(if $(WITH_CUDA),,TRANSFUSION_FAST_NO_CUDA=1) \
		MAX_JOBS=2 $(PY) setup.py build_ext --inplace

clean:
	rm -rf build $(VENV) transfusion_fast/*.so *.egg-info
