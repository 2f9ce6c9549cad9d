# Two commands on a fresh machine: `make demo` and `make test` (each installs what is missing first).
PY ?= python3
STAMP := .rentalml/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

# torch first, pinned to the CPU wheel available on these machines: a looser range pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

demo: install
	$(PY) -m rentalml.demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/training_throughput.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/offline_quality.py

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf .rentalml .pytest_cache .ruff_cache
