# Two entry points a fresh machine needs: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# `make cluster`: a local Ray head on loopback. Its own temp dir keeps `ray.init()` elsewhere on the machine from
# attaching to it and lets `make cluster-stop` stop it alone (`ray stop` kills every Ray process of the machine).
CLUSTER_PORT           ?= 6379
CLUSTER_DASHBOARD_PORT ?= 8265
CLUSTER_TEMP_DIR       ?= /tmp/skeldiff-ray-$(shell id -u)
CLUSTER_ARGS           ?=

.PHONY: install demo test test-fast bench cluster cluster-stop clean

# Wheels only (every dependency has one; a source build would mean a compiler and minutes): pip fails at once instead.
PIP_INSTALL = $(VENV)/bin/pip install --disable-pip-version-check -q --only-binary=:all:

# Two stamps: `make demo` needs only the package itself (.base); `make install` / `make test` add the extras (the
# optuna sampler, the deployment's drivers, pytest, ruff, moto's S3 server).
# The venv is made once: re-running `venv` on an existing one with another `python3` on PATH (a shell without the
# venv, as `make cluster` from the README) rewrote its pyvenv.cfg to that interpreter and broke it.
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PIP_INSTALL) -e '.[optuna,deploy,dev]'
	touch $@

install: $(VENV)/.installed

# The demo's TDSM run: 500 steps instead of the default 1,000, validation every 125 (README "Benchmarks", `make
# demo`: half the TDSM time, unseen top-1 69.4 vs 68.0 % with the default seed); `make demo DEMO_ARGS=` runs the default.
DEMO_ARGS ?= --set train.steps=500 --set train.eval_every=125 --set train.checkpoint_every=125

demo: $(VENV)/.base    ## one local TDSM run on the embedded default, logged to ./mlflow.db
	$(PY) -m service.run tdsm $(DEMO_ARGS)

test: install          ## the linter, then the whole suite, slow integration tests included (what CI runs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: install     ## the linter, then every test not marked slow (unit, component, fast integration)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) -m service.bench tdsm

# A job's entrypoint (`-- python -m ...`) runs with the PATH of `ray start`: put the venv first so `python` is the
# venv's whatever the calling shell has active. Token auth on, with a token generated if none exists (Ray 2.60's
# default for local clusters); jobs log to ./mlflow.db of this checkout unless MLFLOW_TRACKING_URI is set.
cluster: install       ## a local Ray head for `ray job submit` (dashboard http://127.0.0.1:8265)
	mkdir -p $(CLUSTER_TEMP_DIR)
	RAY_AUTH_MODE=token $(VENV)/bin/ray get-auth-token --generate > /dev/null
	export PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_AUTH_MODE=token \
	  MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}"; \
	$(VENV)/bin/ray start --head --node-ip-address=127.0.0.1 --port=$(CLUSTER_PORT) --dashboard-host=127.0.0.1 \
	  --dashboard-port=$(CLUSTER_DASHBOARD_PORT) --temp-dir=$(CLUSTER_TEMP_DIR) $(CLUSTER_ARGS)

cluster-stop:          ## stop the head of `make cluster` (and only it)
	$(PY) -m service.cluster stop $(CLUSTER_TEMP_DIR)

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
