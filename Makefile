# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed's JIT-compiled ops (its CPU shared-memory op) live in the venv, not in ~/.cache, so that a
# new venv builds them once in `make venv` and `make clean` removes them.
EXTENSIONS := TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions

.PHONY: venv demo test bench clean

$(VENV)/.installed: setup.py $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools<81" wheel
	$(BIN)/python -m pip install -q -r requirements/stack.txt
	# mmcv 1.x builds from source and imports pkg_resources in its setup.py
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements/mmcv.txt
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -r requirements/deepspeed.txt
	# DeepSpeed compiles its CPU shared-memory op at its first init_distributed
	# (about a minute on 2 cores); build it now, into the venv, not at the
	# first test launch.
	DS_ACCELERATOR=cpu $(EXTENSIONS) $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; \
	    assert build_shm_op() is not None, 'deepspeed_shm_comm did not build'"
	$(BIN)/python -m pip install -q --no-deps -r requirements/mmselfsup.txt
	# setuptools warns on every editable install that folders named like the
	# package may shadow it; this checkout is the package.
	PYTHONWARNINGS="ignore:Editable installation" \
	    $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Two lines at every start that are not ours, hidden for these entry points
# only: mmcv 1.x's v2.0 notice (a UserWarning) and torch's "No CUDA runtime is
# found" (its cpp_extension logger, on machines with nvcc but no GPU). Other
# warnings and torch logs still show.
QUIET := $(EXTENSIONS) TORCH_LOGS=-torch.utils.cpp_extension
QUIET_PYTHON := $(QUIET) $(BIN)/python -W "ignore:On January 1:UserWarning"

demo: venv
	$(QUIET_PYTHON) -m momentum_hook.demo $(ARGS)

test: venv
	$(QUIET_PYTHON) -m pytest -q tests $(ARGS)

bench: venv
	$(QUIET_PYTHON) benchmarks/bench_momentum_update.py $(ARGS)

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
