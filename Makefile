# The two set-up commands from the README: `make serve` and `make test`.
# Each creates .venv if missing and installs what it needs. torch is pinned to the CPU build
# that lies on these machines' disk; a plain `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test serve lint typecheck clean protos

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Triton kernels run on the CPU through Triton's interpreter in the normal suite.
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

serve: venv
	$(VENV)/bin/deft serve --model tiny-sdxl

# Regenerate the gRPC stubs (clients/python/deft_client/proto) from protos/deft/v1/*.proto.
protos: venv
	$(PY) protos/generate.py

# mypy cannot follow the editable install's package-dir mapping (server/ installs as deft_server), so it
# reads the server and client packages through a folder of links named like their import names.
MYPY_SRC := .mypy-src

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check deft_runtime tests
	mkdir -p $(MYPY_SRC)
	ln -sfn ../server $(MYPY_SRC)/deft_server
	ln -sfn ../clients/python/deft_client $(MYPY_SRC)/deft_client
	MYPYPATH=$(MYPY_SRC) $(VENV)/bin/mypy -p deft_runtime -p deft_server -p deft_client -p benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(MYPY_SRC)
