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
# Then the example pipeline plugin (examples/farm-variants), which the tests render.
PLUGIN := examples/farm-variants
$(STAMP): pyproject.toml $(PLUGIN)/pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[local,dev]"
	$(PY) -m pip install -q --no-deps -e $(PLUGIN)
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects nothing; that is a failure of the suite, not a pass.
# --durations: the slowest tests in every CI log, where the suite's time goes.
# --basetemp of its own: every pytest start sets /tmp/pytest-of-USER to mode 0700, which would
# cut the embedded Postgres (it runs as an unprivileged user) off from a run beside it.
test: install
	tmp=$$(mktemp -d); \
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 --basetemp=$$tmp/pytest $(PYTEST_ARGS); \
	status=$$?; rm -rf $$tmp; exit $$status

# The default strength (0.75) into demo-output/, 0.3 and 1.0 beside it, then one contact sheet;
# then the example plugin's DAG (one branch per filter, joined into a sheet) per input;
# then, on a farm `farm up` starts, one narrated video and one upscale (examples/multimodal.py).
DEMO_PROMPT := "a watercolor painting"
demo: install
	$(VENV)/bin/farm render examples/inputs -o demo-output --prompt $(DEMO_PROMPT)
	$(VENV)/bin/farm render examples/inputs -o demo-output/strength-0.3 --strength 0.3 \
		--prompt $(DEMO_PROMPT)
	$(VENV)/bin/farm render examples/inputs -o demo-output/strength-1.0 --strength 1.0 \
		--prompt $(DEMO_PROMPT)
	$(PY) examples/contact_sheet.py demo-output/contact-sheet.png examples/inputs \
		"strength 0.3=demo-output/strength-0.3" "strength 0.75=demo-output" \
		"strength 1.0=demo-output/strength-1.0"
	$(VENV)/bin/farm render examples/inputs -o demo-output/variants --pipeline variants \
		--param filters=blur,edges,emboss,posterize --param columns=2
	$(VENV)/bin/farm up
	$(PY) examples/multimodal.py demo-output; status=$$?; $(VENV)/bin/farm down; exit $$status
	@echo "outputs: $(CURDIR)/demo-output (contact sheet: demo-output/contact-sheet.png;"
	@echo "  a DAG of filtered variants per input, from the example plugin: demo-output/variants;"
	@echo "  a narrated video: demo-output/narrated.mp4; a 2x upscale: demo-output/landscape-x2.png)"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) demo-output .farm *.egg-info
