# ard_kernels: `make test` and `make bench` set up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the CPU build of torch and a Triton whose interpreter runs the kernels there.
TORCH_CPU := torch==2.13.0
TRITON_CPU := triton==3.7.1
STAMP := $(VENV)/.ard_kernels-installed
# The GPU machines run torch 2.11.0+cu130 and triton 3.6.0, not this CPU stack: a second venv holds
# that stack (the CUDA torch wheel imports without a GPU), so what breaks only there is caught here:
# every kernel compiled by triton 3.6 for sm_90 (tests/test_aot_compile.py), the CUDA extension built
# against the CUDA torch, and the `-m cuda` tests collected (tests/test_gpu_stack.py). It gets only
# packages the GPU machines' image has too (no diffusers), so a test module that needs more fails here.
# setuptools as torch 2.11 pins it (<82; a Python 3.12 environment, the GPU machines', has no older
# one bundled): recent enough to build wheels without the `wheel` package.
TORCH_GPU := torch==2.11.0
TRITON_GPU := triton==3.6.0
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_STAMP := $(GPU_STACK_VENV)/.installed

.PHONY: test bench lint wheel clean install gpu-stack

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

$(GPU_STACK_STAMP): Makefile
	$(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/python -m pip install -q $(TORCH_GPU) $(TRITON_GPU) numpy ninja pybind11 \
		pytest pytest-benchmark hypothesis safetensors tqdm
	$(GPU_STACK_VENV)/bin/python -m pip install -q --upgrade "setuptools<82"
	@touch $@

gpu-stack: $(GPU_STACK_STAMP)

test: $(STAMP) $(GPU_STACK_STAMP)
	ARD_KERNELS_REQUIRE_TEST_DEPS=1 ARD_KERNELS_GPU_STACK_PYTHON=$(abspath $(GPU_STACK_VENV))/bin/python \
		$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check ard_kernels tests benchmarks setup.py

# A wheel for the torch of WHEEL_PYTHON (default this venv's), the extension compiled in where nvcc
# exists: its version's local tag names that torch (+pt213cpu here; WHEEL_PYTHON=.venv-gpu-stack/bin/python
# gives +pt211cu130, the GPU machines' torch) and it requires that torch minor.
WHEEL_PYTHON ?= $(PY)
wheel: $(STAMP)
	PATH=$(abspath $(dir $(WHEEL_PYTHON))):$$PATH $(WHEEL_PYTHON) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@ls -l dist/*.whl

clean:
	rm -rf build dist *.egg-info results ard_kernels/*.so $(GPU_STACK_VENV)
