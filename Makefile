# make test     lint + unit tests + notebook validation (creates/refreshes .venv)
# make studies  run every study notebook at its defaults into runs/ and build the report
# make bench    performance benchmarks (ratios measured side by side)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
export MPLBACKEND := agg

.PHONY: venv test lint unit notebooks studies report bench clean

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
ifneq ($(NOTEBOOKS),)
	$(PY) -m pytest --nbval-lax --sanitize-with notebooks/sanitize.cfg -p no:cacheprovider $(NOTEBOOKS)
else
	@echo "no study notebooks yet"
endif

test: lint
	$(PY) -m pytest tests $(if $(NOTEBOOKS),--nbval-lax --sanitize-with notebooks/sanitize.cfg $(NOTEBOOKS))

studies: venv
	$(VENV)/bin/lcw-analysis run all --workers 2 --out runs
	$(VENV)/bin/lcw-analysis report --out runs

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
