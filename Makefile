# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean lint

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fedbus needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel, so pip never pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[ml,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m fedbus.bus.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff on every package, mypy on the packages typed so far. mypy cannot follow the editable install's
# folder-to-package mapping (bus/ is fedbus.bus), so a link tree under build/ spells the package names.
LINT_PATHS := bus agents aggregator trainer edge_sdk serving tests bench
MYPY_PACKAGES := bus edge_sdk
MYPY_SRC := build/mypy-src

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	@mkdir -p $(MYPY_SRC)/fedbus
	@for p in $(MYPY_PACKAGES); do ln -sfn ../../../$$p $(MYPY_SRC)/fedbus/$$p; done
	$(VENV)/bin/mypy $(addprefix -p fedbus.,$(MYPY_PACKAGES))

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
