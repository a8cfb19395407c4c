# Two commands: `make demo` renders examples/inputs on the embedded local stack;
# `make test` installs everything and runs the test suite against real servers and workers.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo lint bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: 2.13.0 is the local CPU build; an unpinned torch would pull GBs of CUDA.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[local,dev]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects nothing; that is a failure of the suite, not a pass.
test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/farm render examples/inputs -o demo-output --size 128 --steps 20 \
		--prompt "a watercolor painting"
	@echo "outputs: $(CURDIR)/demo-output"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) demo-output .farm *.egg-info
