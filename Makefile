# `make test` and `make demo` work from a fresh clone: each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-all demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[torch,test,demo]'
	$(BIN)/python -m pccl.algorithms.codec_jit  # compile the codec kernels once into their cache
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' 

demo: $(STAMP)
	$(BIN)/pccl demo

bench: $(STAMP)
	$(BIN)/pccl bench --peers 2 3 4

clean:
	rm -rf $(VENV) build *.egg-info
