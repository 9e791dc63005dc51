# The two set-up-and-go commands (see README): `make demo` runs the main job, `make test` the tests.
# Both work from a fresh clone with only the system Python: they create .venv, install the
# dependencies at the versions of constraints.txt and build the extension (CPU + CUDA objects when
# nvcc is present) into it. The install step runs again only when what it depends on changed
# (stamps in .venv/); a rebuild recompiles only the changed sources (objects kept in build/).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP_INSTALL = -m pip install -q --disable-pip-version-check
PIP := $(VPY) $(PIP_INSTALL)
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=
# What the extension is built from: a change to any of these re-runs the install step.
EXT_INPUTS := setup.py pyproject.toml transfusion_fast/_compat.py \
	$(sort $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh))
# Settings of the build that live in the environment: a change re-runs the install step too.
BUILD_KEY := no_cuda=$(TRANSFUSION_FAST_NO_CUDA) arch=$(TORCH_CUDA_ARCH_LIST) cuda=$(CUDA_HOME) cxx=$(CXX)

.PHONY: install test bench demo ext clean test-compat clean-compat FORCE

$(VENV)/.deps: requirements.txt requirements-test.txt $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(PIP) -c $(CONSTRAINTS) "setuptools>=64" wheel -r requirements.txt -r requirements-test.txt
	touch $@

$(VENV)/.build-key: FORCE | $(VENV)/.deps
	@echo '$(BUILD_KEY)' | cmp -s - $@ || echo '$(BUILD_KEY)' > $@

# A missing extension (deleted by hand) forces the install step as well.
ifeq ($(wildcard transfusion_fast/_C*.so),)
$(VENV)/.installed: FORCE
endif
$(VENV)/.installed: $(VENV)/.deps $(VENV)/.build-key $(EXT_INPUTS)
	$(PIP) --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

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

# The test suite against another torch release of the supported range, in a virtual environment
# of its own (.venv-torch-$(TORCH), with that torch, the Triton it requires and the other pins of
# constraints.txt), on a copy of the working tree (.venv-torch-$(TORCH)/src, objects kept there):
#   make test-compat TORCH=2.11.0
COMPAT := .venv-torch-$(TORCH)
test-compat:
	@test -n "$(TORCH)" || { echo "usage: make test-compat TORCH=2.11.0" >&2; exit 2; }
	test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	grep -v -i -E '^((torch|triton|setuptools)==|(nvidia|cuda)-)' $(CONSTRAINTS) > $(COMPAT)/constraints.txt
	$(COMPAT)/bin/python $(PIP_INSTALL) -c $(COMPAT)/constraints.txt "torch==$(TORCH)" \
		"setuptools>=64" wheel -r requirements.txt -r requirements-test.txt
	mkdir -p $(COMPAT)/src
	find $(COMPAT)/src -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -co --exclude-standard | while read -r f; do [ -e "$$f" ] && echo "$$f"; done \
		| tar -cf - -T - | tar -xf - -C $(COMPAT)/src
	cd $(COMPAT)/src && ../bin/python $(PIP_INSTALL) --no-build-isolation --no-deps -e .
	cd $(COMPAT)/src && ../bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	cd $(COMPAT)/src && ../bin/python -m pytest tests bench -q -rs -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) transfusion_fast/*.so *.egg-info

clean-compat:
	rm -rf .venv-torch-*

FORCE:
