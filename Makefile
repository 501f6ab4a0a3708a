# The two set-up commands from the README: `make serve` and `make test`.
# Each creates .venv if missing and installs what it needs. torch is pinned to the CPU build
# that lies on these machines' disk; a plain `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC ?= pip==26.3
# The exact versions tested (every dependency but torch, which TORCH_SPEC pins): `make lock` refreshes it.
LOCK := requirements.lock

.PHONY: venv test serve lint typecheck clean protos lock

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP_SPEC)"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

# Re-resolve every dependency to the newest versions pyproject.toml allows, in a throwaway venv, and
# write them to $(LOCK). Run it, then `make test`, and commit the lock with the change that needed it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(PIP_SPEC)"
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	{ echo "# pip constraints: the versions \`make test\` was run with (\`make lock\` regenerates; torch: TORCH_SPEC)"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^torch=='; } > $(LOCK)
	rm -rf .venv-lock

# Triton kernels run on the CPU through Triton's interpreter in the normal suite.
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

serve: venv
	$(VENV)/bin/deft serve --model shapes-sdxl

# Regenerate the gRPC stubs (clients/python/deft_client/proto) from protos/deft/v1/*.proto.
protos: venv
	$(PY) protos/generate.py

# mypy cannot follow the editable install's package-dir mapping (server/ installs as deft_server, cli/ as
# deft_cli), so it reads those packages through a folder of links named like their import names.
MYPY_SRC := .mypy-src

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check deft_files deft_runtime cli tests
	mkdir -p $(MYPY_SRC)
	ln -sfn ../server $(MYPY_SRC)/deft_server
	ln -sfn ../clients/python/deft_client $(MYPY_SRC)/deft_client
	ln -sfn ../cli $(MYPY_SRC)/deft_cli
	MYPYPATH=$(MYPY_SRC) $(VENV)/bin/mypy -p deft_files -p deft_runtime -p deft_server -p deft_client -p deft_cli -p benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(MYPY_SRC)
