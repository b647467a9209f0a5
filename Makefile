# Two entry points a fresh machine needs: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[optuna,deploy]'
	touch $@

install: $(VENV)/.installed

demo: install          ## one local TDSM run on the embedded default, logged to ./mlflow.db
	$(PY) -m service.run tdsm

test: install          ## the whole suite, slow integration tests included (what CI runs)
	$(PY) -m pytest

test-fast: install     ## unit and component tests only
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) -m service.bench tdsm

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
