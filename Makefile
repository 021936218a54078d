# Crucible — the two quick-start commands:
#   make demo   train a tiny SD1.5-architecture LoRA on the bundled dataset, sweep its checkpoints, write a strip
#   make test   run the whole test suite (unit + end-to-end on the CPU + a real ComfyUI server stage)
# Both create .venv themselves and install what they need. torch is installed only when none is importable.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# e.g. make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.crucible-installed

.PHONY: setup demo test test-unit test-comfyui bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed for $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	else \
	  $(PY) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q pytest pytest-xdist hypothesis websocket-client tensorboard prodigyopt dadaptation lion-pytorch tomli
	@touch $@

demo: setup
	$(BIN)/python -m trainer demo --out demo_output

test-unit: setup
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test: test-unit test-comfyui

test-comfyui: setup
	@if [ -x .ci/comfyui_stage.sh ]; then bash .ci/comfyui_stage.sh; else echo "no ComfyUI stage yet"; fi

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) demo_output .pytest_cache
