# make test     lint + unit tests + notebook validation (creates/refreshes .venv)
# make studies  run every study notebook at its defaults into runs/ and build the report
# make bench    performance benchmarks (ratios measured side by side)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/lcw-analysis
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
NBVAL  := $(if $(NOTEBOOKS),--nbval-lax --sanitize-with notebooks/sanitize.cfg $(NOTEBOOKS))
export MPLBACKEND := agg

.PHONY: venv test lint unit notebooks studies bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check .

unit: venv
	$(PY) -m pytest tests

notebooks: venv
	$(PY) -m pytest -p no:cacheprovider $(or $(NBVAL),--version)

test: lint
	$(PY) -m pytest tests $(NBVAL)

studies: venv
	$(CLI) run all --workers 2 --out runs; status=$$?; \
	$(CLI) collect --out runs && $(CLI) report --out runs && exit $$status

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
