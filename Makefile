# ard_kernels: `make test` and `make bench` set up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the CPU build of torch and a Triton whose interpreter runs the kernels there.
TORCH_CPU := torch==2.13.0
TRITON_CPU := triton==3.7.1
STAMP := $(VENV)/.ard_kernels-installed
# The GPU machines run triton 3.6: a second venv compiles every kernel with it for sm_90 (no GPU
# needed), so code that only newer Tritons accept is caught here (tests/test_aot_compile.py).
COMPAT_VENV ?= .venv-triton36
COMPAT_STAMP := $(COMPAT_VENV)/.installed

.PHONY: test bench lint wheel clean install compat

install: $(STAMP)

$(STAMP): requirements-dev.txt setup.py pyproject.toml Makefile
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "Reusing this Python's CUDA build of torch (--system-site-packages)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PIP) install -q $(TORCH_CPU) $(TRITON_CPU); \
	fi
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

$(COMPAT_STAMP):
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(TORCH_CPU) triton==3.6.0 numpy
	@touch $@

compat: $(COMPAT_STAMP)

test: $(STAMP) $(COMPAT_STAMP)
	ARD_KERNELS_REQUIRE_TEST_DEPS=1 ARD_KERNELS_TRITON36_PYTHON=$(abspath $(COMPAT_VENV))/bin/python \
		$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check ard_kernels tests benchmarks setup.py

wheel: $(STAMP)
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	@ls -l dist/*.whl

clean:
	rm -rf build dist *.egg-info results ard_kernels/*.so $(COMPAT_VENV)
