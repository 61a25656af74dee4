# Two entry points for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

.PHONY: setup demo test ui clean

$(VENV)/.installed: pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	# Dagster's asset-selection parser needs antlr4 4.13, while omegaconf (torchgeo -> lightly ->
	# hydra-core, never imported by us) pins 4.9: install the runtime Dagster needs over it.
	$(VENV)/bin/pip install -q --no-deps 'antlr4-python3-runtime==4.13.2'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m majortom_assets.demo

ui: setup
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.dagster_home} $(VENV)/bin/dagster dev -h 127.0.0.1 -w workspace.yaml

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) data .dagster_home
