# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_WEIGHTS := $(abspath ../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors)
# Offline machines use the shared DINOv2 ViT-S/14 file when it exists; with internet timm downloads it.
export WSSS_WEIGHTS ?= $(if $(wildcard $(SHARED_WEIGHTS)),$(SHARED_WEIGHTS),)
export HF_HUB_OFFLINE ?= 1

.PHONY: venv demo test test-slow bench faults lint clean

# The 5 GB environment is created only when missing; the package is reinstalled when pyproject.toml changes.
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,crf]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m wsss.demo

# the fast suite (under 3 minutes on a 2-core CPU); the end-to-end runs marked slow are a second step
test: venv
	$(BIN)/python -m pytest -m "not slow" tests

test-slow: venv
	$(BIN)/python -m pytest -m slow tests

bench: venv
	$(BIN)/wsss bench step --config configs/toco/bench_deit-s.yaml

# kill tiny training runs at random steps and inside writes, resume them, compare with an uninterrupted run
faults: venv
	$(BIN)/python scripts/fault_injection.py --trials 8

# style (ruff) and types (mypy, configured in pyproject.toml: clean on src/wsss)
lint: venv
	$(BIN)/ruff check src tests scripts examples
	$(BIN)/ruff format --check src tests scripts examples
	$(BIN)/mypy

clean:
	rm -rf runs data/demo
