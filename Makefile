# Set-up, tests and benchmark of ep. `make test` (CPU, no GPU needed) and `make bench` (GPUs) are the two
# entry points of a newcomer; `make test-gpu` / `make bench-gpu` run on a machine that already has CuPy,
# mpi4py and an MPI (no network, nothing installed).

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
CUDA ?= cuda13
# The venv's mpi4py is linked against the MPICH wheel of the `test` extra, so the venv's processes must be
# launched by its own launcher (Hydra): it passes the caller's environment to every rank.
MPIEXEC ?= $(VENV)/bin/mpiexec
# The launcher of a machine's system MPI (Open MPI), used by the targets that run the system python3.
MPIRUN ?= mpirun --allow-run-as-root
GPU_PYTHON ?= python3
BENCH_ARGS ?=
# World sizes of the multi-rank CPU tests (CPU backend: NumPy reference over MPI).
MPI_TEST_SIZES ?= 4 2 1 8
# World sizes of the multi-rank GPU tests; with fewer GPUs than ranks the ranks share GPUs (EP_SHARED_GPU=1:
# correctness only).
GPU_TEST_SIZES ?= 2 4 8

STAMP := $(VENV)/.ep-installed
# Prints the number of visible CUDA devices, 0 when CuPy or the driver is missing.
GPU_COUNT = $(PYTHON) -c 'import cupy; print(cupy.cuda.runtime.getDeviceCount())' 2>/dev/null | tail -n 1 | grep -E '^[0-9]+$$' || echo 0
NO_GPU_MSG = no CUDA GPU visible on this machine; the benchmark needs GPUs

.PHONY: venv test test-gpu bench bench-gpu compile-check clean

venv: $(STAMP)

# NOTE: the stamp lives inside the venv, so deleting the venv also forgets the install; an edited
# pyproject.toml or setup.py reinstalls.
$(STAMP): pyproject.toml setup.py compat/pyproject.toml
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[$(CUDA),test]'
	$(VENV)/bin/pip install -q --no-deps -e ./compat
	@touch $@

test: venv
	$(PYTHON) -m pytest tests/cpu -q
	@set -e; for n in $(MPI_TEST_SIZES); do \
	  echo "env EP_BACKEND=cpu $(MPIEXEC) -n $$n $(PYTHON) -m pytest tests/mpi -q -p no:cacheprovider"; \
	  env EP_BACKEND=cpu $(MPIEXEC) -n $$n $(PYTHON) -m pytest tests/mpi -q -p no:cacheprovider; \
	done

# GPU targets run the machine's python3 (override with PYTHON=... or GPU_PYTHON=...) and install nothing.
# NVLink multicast stays off for every process they start (it can take a shared host's GPUs out of service).
test-gpu bench-gpu: PYTHON = $(GPU_PYTHON)
test-gpu bench-gpu bench: export NCCL_NVLS_ENABLE = 0
GPU_MPIRUN = $(MPIRUN) -x NCCL_NVLS_ENABLE=0 -x PYTHONPATH=$(CURDIR):$(CURDIR)/compat$${PYTHONPATH:+:$$PYTHONPATH}

test-gpu:
	@N=$$($(GPU_COUNT)); \
	if [ "$$N" -lt 1 ]; then echo "make test-gpu: no CUDA GPU visible on this machine" >&2; exit 1; fi; \
	set -e; \
	echo "$(PYTHON) -m pytest tests/gpu -q -m 'not mpi'"; \
	$(PYTHON) -m pytest tests/gpu -q -m "not mpi" -p no:cacheprovider; \
	for W in $(GPU_TEST_SIZES); do \
	  SHARE=""; if [ "$$W" -gt "$$N" ]; then SHARE="-x EP_SHARED_GPU=1 --oversubscribe"; fi; \
	  echo "$(GPU_MPIRUN) $$SHARE -np $$W $(PYTHON) -m pytest tests/gpu -q -m mpi"; \
	  $(GPU_MPIRUN) $$SHARE -np $$W $(PYTHON) -m pytest tests/gpu -q -m mpi -p no:cacheprovider; \
	done; \
	for W in 1 $(GPU_TEST_SIZES); do \
	  SHARE=""; if [ "$$W" -gt "$$N" ]; then SHARE="-x EP_SHARED_GPU=1 --oversubscribe"; fi; \
	  echo "$(GPU_MPIRUN) $$SHARE -x EP_BACKEND=gpu -np $$W $(PYTHON) -m pytest tests/mpi/test_deep_ep.py -q"; \
	  $(GPU_MPIRUN) $$SHARE -x EP_BACKEND=gpu -np $$W $(PYTHON) -m pytest tests/mpi/test_deep_ep.py -q -p no:cacheprovider; \
	done

bench: venv
	@N=$$($(GPU_COUNT)); \
	if [ "$$N" -lt 1 ]; then echo "make bench: $(NO_GPU_MSG)" >&2; exit 1; fi; \
	set -x; \
	$(MPIEXEC) -n $$N -genv NCCL_NVLS_ENABLE 0 $(PYTHON) -m ep.bench $(BENCH_ARGS)

bench-gpu:
	@N=$$($(GPU_COUNT)); \
	if [ "$$N" -lt 1 ]; then echo "make bench-gpu: $(NO_GPU_MSG)" >&2; exit 1; fi; \
	set -x; \
	$(GPU_MPIRUN) -np $$N $(PYTHON) -m ep.bench $(BENCH_ARGS)

# Compiles every kernel variant through NVRTC for both architectures; needs no GPU.
compile-check: venv
	$(PYTHON) -m ep.compile_check --arch sm_90 --arch sm_100

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
