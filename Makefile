# Two commands do all the set-up on a fresh machine (Debian, Python 3.11, no GPU):
#   make run    creates .venv and runs the embedded default end to end (snakemake --cores 2 all)
#   make test   creates .venv if needed and runs the test suite
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: setup run test figures report clean-results

# uv installs the ~100 packages in about 45 s where pip takes about 2 minutes. It byte-compiles them as
# pip does (--compile-bytecode): with PYTHONDONTWRITEBYTECODE set, as on the CI machines, nothing else
# writes .pyc files and every job would compile torch and transformers again (import 15.8 s, not 6.7 s,
# in each of the workflow's ~80 processes). uv ignores pip's config,
# and on PyPI torch==2.13.0 for Linux is the CUDA build, so uv is used only when the on-disk wheel
# directory that holds the CPU torch is known (PIP_FIND_LINKS or pip's global.find-links); otherwise pip,
# with its own configuration, as before.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(FIND_LINKS)" ]; then \
	  $(VENV)/bin/pip install --quiet --disable-pip-version-check uv && \
	  $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python --find-links "$(FIND_LINKS)" -e '.[dev,mauve]'; \
	else \
	  $(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,mauve]'; \
	fi
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
