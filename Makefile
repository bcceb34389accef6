# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

$(VENV)/.installed: setup.py $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools<81" wheel
	$(BIN)/python -m pip install -q -r requirements/stack.txt
	# mmcv 1.x builds from source and imports pkg_resources in its setup.py
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements/mmcv.txt
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -r requirements/deepspeed.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements/mmselfsup.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m momentum_hook.demo $(ARGS)

test: venv
	$(BIN)/python -m pytest -q tests $(ARGS)

bench: venv
	$(BIN)/python benchmarks/bench_momentum_update.py $(ARGS)

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
