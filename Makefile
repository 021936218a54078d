# Crucible — the two quick-start commands:
#   make demo   train a tiny SD1.5-architecture LoRA on the bundled dataset, sweep its checkpoints, write a strip
#   make test   run the whole test suite (unit + end-to-end on the CPU + a real ComfyUI server stage)
# Both create .venv themselves and install what they need. torch is installed only when none is importable.
# Dependencies: requirements.txt (loose, true lower bounds) + requirements-test.txt, installed with the exact versions
# in constraints.txt. The bounds are checked by:
#   make test-min     a separate .venv-min with the LOWEST versions requirements.txt allows (>= read as ==)
#   make test-latest  a separate .venv-latest with the NEWEST versions, no constraints
#   make lock         rewrite constraints.txt from a fresh install of the newest versions (then run make test)

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# e.g. make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_INDEX ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.crucible-installed
REQUIREMENTS := -r requirements.txt -r requirements-test.txt
MIN_VENV ?= .venv-min
LATEST_VENV ?= .venv-latest

.PHONY: setup demo test test-unit test-comfyui test-min test-latest lock latest-venv bench clean

# $(call new_venv,DIR): a venv with torch. The torch of $(PY) is reused when it has one (ComfyUI's own, say);
# otherwise $(TORCH_SPEC) is installed into the venv. DIR/torch-constraint.txt then pins that torch, so that no later
# install (test-latest upgrades everything) swaps it for another build.
define new_venv
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed for $(PY)"; $(PY) -m venv --system-site-packages $(1); \
	else \
	  $(PY) -m venv $(1); \
	fi
	$(1)/bin/python -m pip install -q --upgrade pip
	@$(1)/bin/python -c "import torch" 2>/dev/null || \
	  $(1)/bin/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(1)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(1)/torch-constraint.txt
endef

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt constraints.txt pyproject.toml
	$(call new_venv,$(VENV))
	$(BIN)/python -m pip install -q $(REQUIREMENTS) -c constraints.txt -c $(VENV)/torch-constraint.txt
	@touch $@

demo: setup
	$(BIN)/python -m trainer demo --out demo_output

test-unit: setup
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test: test-unit test-comfyui

test-comfyui: setup
	@if [ -x .ci/comfyui_stage.sh ]; then bash .ci/comfyui_stage.sh; else echo "no ComfyUI stage yet"; fi

# The lowest versions requirements.txt allows (each ">=" read as "=="); the test tools resolve around them.
$(MIN_VENV)/.crucible-installed: requirements.txt requirements-test.txt
	rm -rf $(MIN_VENV)
	$(call new_venv,$(MIN_VENV))
	sed -E 's/>=/==/' requirements.txt > $(MIN_VENV)/min-constraints.txt
	$(MIN_VENV)/bin/python -m pip install -q $(REQUIREMENTS) -c $(MIN_VENV)/min-constraints.txt \
	  -c $(MIN_VENV)/torch-constraint.txt
	@touch $@

test-min: $(MIN_VENV)/.crucible-installed
	@$(MIN_VENV)/bin/python -m pip freeze --local | grep -iE '^(diffusers|peft|transformers|accelerate|safetensors|pillow|numpy|huggingface.hub|tokenizers)=='
	$(MIN_VENV)/bin/python -m pytest -q -n 2 $(PYTEST_ARGS)

# The newest versions, no constraints: re-resolved on every call.
$(LATEST_VENV)/bin/python:
	$(call new_venv,$(LATEST_VENV))

latest-venv: $(LATEST_VENV)/bin/python
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager $(REQUIREMENTS) \
	  -c $(LATEST_VENV)/torch-constraint.txt

test-latest: latest-venv
	@$(LATEST_VENV)/bin/python -m pip freeze --local | grep -iE '^(diffusers|peft|transformers|accelerate|safetensors|pillow|numpy|huggingface.hub|tokenizers)=='
	$(LATEST_VENV)/bin/python -m pytest -q -n 2 $(PYTEST_ARGS)

# constraints.txt := the newest versions (a fresh .venv-latest), torch left out. Run `make test` afterwards.
lock:
	rm -rf $(LATEST_VENV)
	$(MAKE) latest-venv
	{ sed -n '/^#/p' constraints.txt; $(LATEST_VENV)/bin/python -m pip freeze --local --exclude torch | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@git diff --stat -- constraints.txt 2>/dev/null || true

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) $(MIN_VENV) $(LATEST_VENV) demo_output .pytest_cache
