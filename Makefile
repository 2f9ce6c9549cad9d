# Two commands on a fresh machine: `make demo` and `make test` (each installs what is missing first).
# Everything installs into the project virtualenv $(VENV) (default .venv), never into the interpreter found on
# PATH: a stock Debian/Ubuntu Python is "externally managed" and refuses a bare `pip install`.
# Activate it for the CLI: `. .venv/bin/activate` (then `rentalml --help`), or call `.venv/bin/rentalml`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rentalml-installed

.PHONY: install demo test bench lint clean images cluster-local

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel available on these machines: a looser range pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(PY) -m rentalml.demo

# -n 3: three workers (most of the time is spent waiting on servers and subprocesses). --dist loadfile: a file's
# tests (and its module fixtures) stay on one worker; tests/conftest.py adds one unit, the two tests reading one
# shared pipeline run. --no-loadscope-reorder keeps conftest's longest-first order (xdist would otherwise start
# the files with the most tests first, and the long one-test files last); --durations: where the test time goes
# (docs/architecture.md "Test time")
TEST_WORKERS ?= 3
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# the serving half of the cluster on this machine, from the rendered dev overlay (docs/operations.md):
# moto S3, MLflow, two kfp.local runs (publish + canary deploy), KServe's storage initializer, Triton, the transformer
cluster-local: install
	$(PY) -m rentalml.cli pipeline local-cluster --json .rentalml/local-cluster.json

# the three images of the manifests, with rootful podman and no registry (docker/build.sh; installs podman,
# buildah, debootstrap and runc if missing); GPU=1 adds ghcr.io/rentalml/rentalml-gpu (several GB of CUDA wheels)
GPU ?= 0
images:
	GPU=$(GPU) docker/build.sh

bench: install
	$(PY) benchmarks/training_throughput.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/offline_quality.py

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf .rentalml .pytest_cache .ruff_cache
