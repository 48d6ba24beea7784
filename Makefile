# Two commands do all the set-up on a fresh machine (Debian, Python 3.11, no GPU):
#   make run    creates .venv and runs the embedded default end to end (snakemake --cores 2 all)
#   make test   creates .venv if needed and runs the test suite
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup run test figures report clean-results

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,mauve]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) all

test: $(STAMP)
	$(VENV)/bin/pytest -q

figures: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) figures tables

report: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --report results/report.html all

clean-results:
	rm -rf results/*/ .snakemake
