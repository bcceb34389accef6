# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
# `make lint`, `make test-fast` and `make test-wheel` are for maintainers
# (docs/development.md).
PYTHON ?= python3
VENV ?= .venv
# Which torch: requirements/torch.txt (the tested stack) or, for
# `make test-torch-latest`, requirements/torch-latest.txt.
TORCH ?= requirements/torch.txt
BIN := $(VENV)/bin
# Every install is constrained to that torch, so that no later package
# (mmcv, DeepSpeed, ...) re-resolves it.
PIP := PIP_CONSTRAINT=$(TORCH) $(BIN)/python -m pip
# DeepSpeed's JIT-compiled ops (its CPU shared-memory op) live in the venv,
# not in ~/.cache: a new venv builds them once, in `make venv`.
EXTENSIONS := TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions

.PHONY: venv demo demo-scaling test test-fast test-torch-latest test-wheel \
	test-mmpretrain lint format bench clean

$(VENV)/.installed: pyproject.toml \
	$(filter-out requirements/lint.txt requirements/mmpretrain%,\
	    $(wildcard requirements/*.txt))
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools<81" wheel
	$(PIP) install -q -r $(TORCH) -r requirements/stack.txt
	# mmcv 1.x builds from source and imports pkg_resources in its setup.py
	$(PIP) install -q --no-build-isolation -r requirements/mmcv.txt
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -r requirements/deepspeed.txt
	# DeepSpeed compiles its CPU shared-memory op at its first init_distributed
	# (about a minute on 2 cores); build it now, into the venv, not at the
	# first test launch.
	DS_ACCELERATOR=cpu $(EXTENSIONS) $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; \
	    assert build_shm_op() is not None, 'deepspeed_shm_comm did not build'"
	$(PIP) install -q --no-deps -r requirements/mmselfsup.txt
	# setuptools warns on every editable install that folders named like the
	# package may shadow it; this checkout is the package.
	PYTHONWARNINGS="ignore:Editable installation" \
	    $(PIP) install -q --no-build-isolation --no-deps -e .
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

# The EMA scaling rule on the demo: BYOL at B and 4B, 3 seeds (docs/scaling.md).
demo-scaling: venv
	$(QUIET_PYTHON) -m momentum_hook.demo.scaling $(ARGS)

test: venv
	$(QUIET_PYTHON) -m pytest -q tests $(ARGS)

# The quick loop: every test that starts no second process and is not marked
# slow (the markers are declared in pyproject.toml).
test-fast: venv
	$(QUIET_PYTHON) -m pytest -q tests -m "not distributed and not slow" $(ARGS)

# The same suite with the newest torch on the index, in .venv-torch-latest.
test-torch-latest:
	$(MAKE) test VENV=.venv-torch-latest TORCH=requirements/torch-latest.txt

# The wheel as a user gets it: built from this checkout, installed (not
# editable) into a fresh venv with its own dependencies only (torch from
# $(TORCH), numpy) and pytest, imported from outside the checkout, and the
# suite run against the installed package. Tests that need mmcv, MMEngine,
# DeepSpeed or MMSelfSup skip there. MMEngine is then added so that the
# drop-in, which needs a runner framework, imports too.
WHEEL_VENV ?= .venv-wheel
WHEEL_PIP := $(WHEEL_VENV)/bin/python -m pip
WHEEL_PYTHON := cd /tmp && $(abspath $(WHEEL_VENV))/bin/python
test-wheel:
	rm -rf $(WHEEL_VENV) build dist
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_PIP) install -q --upgrade pip
	$(WHEEL_PIP) wheel -q --no-deps -w dist .
	$(WHEEL_PIP) install -q -c $(TORCH) torch pytest dist/momentum_hook-*.whl
	$(WHEEL_PYTHON) -c "import momentum_hook, sys; \
	    assert 'site-packages' in momentum_hook.__file__, momentum_hook.__file__"
	$(WHEEL_PYTHON) -c "import momentum_hook_dropin" 2>&1 | \
	    grep -q "neither mmcv 1.x nor MMEngine is installed"
	MOMENTUM_HOOK_FROM_WHEEL=1 $(WHEEL_VENV)/bin/pytest -q -p no:cacheprovider \
	    tests $(ARGS)
	$(WHEEL_PIP) install -q -c $(TORCH) "$$(ls dist/momentum_hook-*.whl)[mmengine]"
	$(WHEEL_PYTHON) -c "import momentum_hook_dropin as d; \
	    assert 'mmengine_hook' in str(d.REPLACED), d.REPLACED"

# ruff (lint and the format check) and mypy (against the torch of .venv),
# their versions from requirements/lint.txt in a small venv of their own;
# seconds once .venv exists. `make format` formats the tree and sorts the
# imports.
LINT_VENV ?= .venv-lint
$(LINT_VENV)/.installed: requirements/lint.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q -r requirements/lint.txt
	touch $@

lint: venv $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/mypy --python-executable $(BIN)/python

format: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff format .
	$(LINT_VENV)/bin/ruff check --select I --fix .

# mmpretrain 1.x (tests/mmpretrain_1x/) in a venv of its own: it needs mmcv
# 2.x, which cannot share .venv with mmcv 1.x (requirements/mmpretrain*.txt).
MMPRETRAIN_VENV := .venv-mmpretrain
MMPRETRAIN_PIP := PIP_CONSTRAINT=$(TORCH) $(MMPRETRAIN_VENV)/bin/python -m pip
MMPRETRAIN_EXTENSIONS := TORCH_EXTENSIONS_DIR=$(abspath $(MMPRETRAIN_VENV))/torch_extensions

$(MMPRETRAIN_VENV)/.installed: pyproject.toml $(TORCH) requirements/stack.txt \
	requirements/mmpretrain.txt requirements/mmpretrain-deps.txt \
	requirements/deepspeed.txt
	$(PYTHON) -m venv $(MMPRETRAIN_VENV)
	$(MMPRETRAIN_PIP) install -q --upgrade pip "setuptools<81" wheel
	$(MMPRETRAIN_PIP) install -q -r $(TORCH) -r requirements/stack.txt
	$(MMPRETRAIN_PIP) install -q --no-build-isolation -r requirements/mmpretrain-deps.txt
	$(MMPRETRAIN_PIP) install -q --no-deps -r requirements/mmpretrain.txt
	# DeepSpeed for the ZeRO-3 test, as in .venv (no compiled ops but the
	# CPU shared-memory one, built now).
	DS_BUILD_OPS=0 $(MMPRETRAIN_PIP) install -q --no-build-isolation -r requirements/deepspeed.txt
	DS_ACCELERATOR=cpu $(MMPRETRAIN_EXTENSIONS) $(MMPRETRAIN_VENV)/bin/python -c \
	    "from deepspeed.comm.torch import build_shm_op; \
	    assert build_shm_op() is not None, 'deepspeed_shm_comm did not build'"
	PYTHONWARNINGS="ignore:Editable installation" \
	    $(MMPRETRAIN_PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test-mmpretrain: $(MMPRETRAIN_VENV)/.installed
	$(MMPRETRAIN_EXTENSIONS) $(MMPRETRAIN_VENV)/bin/python -m pytest -q tests/mmpretrain_1x $(ARGS)

bench: venv
	$(QUIET_PYTHON) benchmarks/bench_momentum_update.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-torch-latest $(WHEEL_VENV) $(LINT_VENV) \
	    $(MMPRETRAIN_VENV) build dist work_dirs .pytest_cache
