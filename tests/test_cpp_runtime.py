"""The C++ runtime (runtime/cpp) against the Python runtime: build it, run its ctest suite, compare outputs.

One session-scoped CMake build (with address + undefined-behaviour sanitizers, ``ESRDF_SANITIZE=ON``) and
one copy of the shared tiny bundle with AOTInductor packages (``esrdf.export.aoti``) serve every test here.
The build has the OpenVINO backend where the ``openvino`` wheel is installed (its CMake config ships in the
wheel) and the aoti backend from this venv's torch. The Python side writes reference data (numpy noise
fields, step plans, and real photos upscaled by ``esrdf.runtime.Upscaler`` on onnxruntime with the same
seed) that ctest's ``parity`` test compares every compiled-in CPU backend against: the fp32 ones (aoti,
openvino) with docs/DESIGN.md section 4's bar (``END_TO_END_FP32``: max abs <= 1e-3 on [0, 1] images), and
openvino:bf16, where the CPU has bf16, with the reduced-precision end-to-end PSNR bar.

Skips, with the reason, where cmake, a C++ compiler or a system library (libpng, OpenSSL, nlohmann-json) is
missing: ``make system-deps`` installs them. ``ESRDF_CPP_SANITIZE=0`` builds without sanitizers;
``ESRDF_CPP_BUILD_DIR=path`` keeps the build there for incremental rebuilds across sessions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tiny_bundle import tiny_bundle

from esrdf.config import SamplingOptions
from esrdf.runtime.images import from_model_range, to_model_range
from esrdf.runtime.noise import noise_field
from esrdf.runtime.sampling import plan_steps
from esrdf.runtime.tolerances import END_TO_END_BF16, END_TO_END_FP32

CPP_DIR = Path(__file__).resolve().parents[1] / "runtime" / "cpp"
MISSING_DEPENDENCY = "esrdf: missing dependency"
BUILD_TIMEOUT_S = 900
# (name, photo, rows, cols, sampler, steps, eta, prior, seed): a crop tiled with a clamped last tile from
# the paper's prior; one smaller than a tile (edge-padded past its own size) sampled with all T DDPM steps
# from the bundle's prior; and one that gives nothing (steps 0, None: the bundle's sampling defaults).
UPSCALE_CASES = (
    ("astronaut_13x21_ddim4", "astronaut", slice(180, 193), slice(200, 221), "ddim", 4, 0.5, "paper", 11),
    ("coffee_5x3_ddpm", "coffee", slice(150, 155), slice(300, 303), "ddpm", 0, 0.0, None, 2**40 + 3),
    ("chelsea_9x11_defaults", "chelsea", slice(100, 109), slice(200, 211), None, 0, None, None, 5),
)
NOISE_CASES = ((7, 0, 0, 0, 256, 256), (2**63 + 5, 201, 1000, 37, 48, 40))
PLAN_CASES = (
    ("ddim", 4, 0.5, "matched"),
    ("ddim", 50, 0.0, "paper"),
    ("ddim", 200, 1.0, "matched"),
    ("ddpm", 0, 0.0, "paper"),
)
# The sampling section the test bundle's manifest gets (not the built-in rule, so "bundle default" shows)
BUNDLE_DEFAULTS = SamplingOptions("ddim", 3, 0.5, prior="matched")
# bf16 end to end against fp32 with the same noise (the one table's END_TO_END_BF16)
END_TO_END_BF16_PSNR_DB = END_TO_END_BF16.min_psnr_db


def _openvino_cmake_dir() -> Path | None:
    """The openvino wheel's CMake config (OpenVINOConfig.cmake), found without importing openvino."""
    import importlib.util

    spec = importlib.util.find_spec("openvino")
    if spec is None or spec.origin is None:
        return None
    cmake_dir = Path(spec.origin).parent / "cmake"
    return cmake_dir if (cmake_dir / "OpenVINOConfig.cmake").is_file() else None


def _toolchain_missing() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake not found (apt-get install cmake; `make system-deps` installs the C++ toolchain)"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler found (apt-get install g++; `make system-deps`)"
    return None


def _run(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


class CppBuild:
    """A CMake build of runtime/cpp running in the background; ``wait()`` returns its directory."""

    def __init__(self, build: Path) -> None:
        import torch

        self.build = build
        sanitize = "OFF" if os.environ.get("ESRDF_CPP_SANITIZE") == "0" else "ON"
        openvino = _openvino_cmake_dir()
        self.has_openvino = openvino is not None
        configure = _run(
            [
                "cmake",
                "-S",
                str(CPP_DIR),
                "-B",
                str(build),
                f"-DESRDF_SANITIZE={sanitize}",
                # -O0 -g: sanitizer builds of nlohmann-json at -O2 take minutes per file on 2 cores
                "-DCMAKE_BUILD_TYPE=Debug",
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                *([f"-DOpenVINO_DIR={openvino}"] if openvino else []),
            ],
            timeout=120,
        )
        output = configure.stdout + configure.stderr
        if configure.returncode != 0:
            missing = [line for line in output.splitlines() if MISSING_DEPENDENCY in line]
            if missing:
                pytest.skip(missing[0].strip(" -"))
            pytest.fail(f"cmake configure failed:\n{output[-4000:]}")
        jobs = str(max(1, min(os.cpu_count() or 1, 4)))
        self.log = build / "build.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(  # runs while the AOTInductor packages compile
                ["cmake", "--build", str(build), "-j", jobs], stdout=log, stderr=subprocess.STDOUT
            )

    def wait(self) -> Path:
        try:
            rc = self.process.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"C++ build took over {BUILD_TIMEOUT_S} s")
        if rc != 0:
            pytest.fail(f"C++ build failed:\n{self.log.read_text()[-6000:]}")
        return self.build


@pytest.fixture(scope="session")
def cpp_build_started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CppBuild]:
    """Configure runtime/cpp and start building it; skip where the toolchain or a library is missing."""
    reason = _toolchain_missing()
    if reason:
        pytest.skip(reason)
    persistent = os.environ.get("ESRDF_CPP_BUILD_DIR")  # reuse an incremental build across sessions
    build = CppBuild(Path(persistent) if persistent else tmp_path_factory.mktemp("cpp-build"))
    yield build
    if build.process.poll() is None:  # the session ended before anything waited for it
        build.process.kill()
        build.process.wait()


@pytest.fixture(scope="session")
def cpp_build(cpp_build_started: CppBuild, aoti_bundle: Path) -> Path:
    """The finished build (the bundle's packages were compiled meanwhile)."""
    return cpp_build_started.wait()


@pytest.fixture(scope="session")
def aoti_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared tiny bundle (others must not see aoti/), with AOTInductor packages."""
    from esrdf.export.aoti import add_aoti_packages
    from esrdf.runtime.bundle import load_bundle, sampling_entry, write_manifest

    bundle = tmp_path_factory.mktemp("cpp") / "tiny-aoti-bundle"
    shutil.copytree(tiny_bundle(tmp_path_factory.getbasetemp()), bundle)
    add_aoti_packages(bundle)
    manifest = load_bundle(bundle).manifest
    write_manifest(bundle, replace(manifest, sampling=sampling_entry(manifest.schedule, BUNDLE_DEFAULTS)))
    return bundle


def _python_upscale(bundle: Path, rgb: np.ndarray, options: SamplingOptions) -> np.ndarray:
    from esrdf.runtime import Upscaler

    upscaler = Upscaler(bundle, backend="onnxruntime", device="cpu", precision="fp32", threads=1)
    return upscaler.upscale_array(to_model_range(rgb), options)


def _write_cases(data: Path, bundle: Path, photos: dict[str, np.ndarray]) -> dict[str, Any]:
    """Reference data for ctest's parity test: raw little-endian arrays plus cases.json."""
    from esrdf.runtime.bundle import load_bundle

    cases: dict[str, Any] = {
        "bundle": str(bundle),
        "max_abs_01": END_TO_END_FP32.max_abs,
        "bf16_min_psnr_db": END_TO_END_BF16_PSNR_DB,
    }
    cases["noise"] = []
    for i, (seed, step, y0, x0, h, w) in enumerate(NOISE_CASES):
        noise_field(seed, step, y0, x0, h, w, 3).tofile(data / f"noise{i}.f32")
        keys = ("seed", "step", "y0", "x0", "height", "width")
        cases["noise"].append(
            {
                **dict(zip(keys, (seed, step, y0, x0, h, w), strict=True)),
                "channels": 3,
                "file": f"noise{i}.f32",
            }
        )
    alphas_cumprod = load_bundle(bundle).manifest.schedule.array()
    cases["plans"] = []
    for i, (sampler, steps, eta, prior) in enumerate(PLAN_CASES):
        plan = plan_steps(alphas_cumprod, sampler, steps or None, eta, prior)
        plan.t.tofile(data / f"plan{i}_t.f32")
        plan.coefs.tofile(data / f"plan{i}_coefs.f32")
        cases["plans"].append(
            {
                "sampler": sampler,
                "steps": steps,
                "eta": eta,
                "prior": prior,
                "init_noise_std": plan.init_noise_std,
                "t_file": f"plan{i}_t.f32",
                "coefs_file": f"plan{i}_coefs.f32",
            }
        )
    cases["upscale"] = []
    for name, photo, rows, cols, sampler, steps, eta, prior, seed in UPSCALE_CASES:
        rgb = np.ascontiguousarray(photos[photo][rows, cols])
        rgb.tofile(data / f"{name}.u8")
        options = SamplingOptions(sampler, steps or None, eta, seed, prior)
        _python_upscale(bundle, rgb, options).astype(np.float32).tofile(data / f"{name}.py.f32")
        cases["upscale"].append(
            {
                "name": name,
                "input": f"{name}.u8",
                "height": rgb.shape[0],
                "width": rgb.shape[1],
                "sampler": sampler,
                "steps": steps,
                "eta": eta,
                "prior": prior,
                "seed": seed,
                "expected": f"{name}.py.f32",
                "output": f"{name}.cpp.f32",
                "output_u8": f"{name}.cpp.u8",
            }
        )
    (data / "cases.json").write_text(json.dumps(cases, indent=2))
    return cases


@pytest.fixture(scope="session")
def ctest_run(
    cpp_build: Path,
    aoti_bundle: Path,
    eval_photos: dict[str, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    """ctest over the whole suite, with the bundle and the Python reference data in its environment."""
    data = tmp_path_factory.mktemp("cpp-parity")
    cases = _write_cases(data, aoti_bundle, eval_photos)
    d = BUNDLE_DEFAULTS  # test_c_api checks that "bundle default" arguments run these
    env = {
        **os.environ,
        "ESRDF_TEST_BUNDLE": str(aoti_bundle),
        "ESRDF_TEST_DATA": str(data),
        "ESRDF_TEST_DEFAULTS": f"{d.steps} {d.sampler} {d.eta} {d.prior}",
        "OMP_NUM_THREADS": "1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
    result = _run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], timeout=600, env=env)
    return result, data, cases


@pytest.mark.slow
def test_ctest_suite_passes_under_sanitizers(
    ctest_run: tuple[subprocess.CompletedProcess[str], Path, Any],
) -> None:
    """noise, sampling, tiling, manifest (tamper), bundle (tamper/stale), parity and the C API, all run."""
    result, _, _ = ctest_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "100% tests passed" in output and "Skipped" not in output, output[-4000:]
    for sanitizer_report in ("AddressSanitizer", "runtime error:", "LeakSanitizer"):
        assert sanitizer_report not in output


@pytest.mark.slow
def test_noise_and_step_plans_are_bit_exact(ctest_run: tuple[Any, Path, dict[str, Any]]) -> None:
    _, data, _ = ctest_run
    results = json.loads((data / "results.json").read_text())
    assert all(r["differing"] == 0 for r in results["noise"]), results["noise"]
    assert all(r["bit_exact"] for r in results["plans"]), results["plans"]


def _expected_backends() -> set[str]:
    """The CPU backends the build must have: aoti (this venv's torch) and openvino where its wheel is."""
    return {"aoti", "openvino", "openvino:bf16"} if _openvino_cmake_dir() else {"aoti"}


@pytest.mark.slow
def test_every_cpu_backend_ran_and_openvino_is_the_default(ctest_run: tuple[Any, Path, Any]) -> None:
    _, data, _ = ctest_run
    results = json.loads((data / "results.json").read_text())
    assert set(results["backends"]) == _expected_backends()
    assert results["default_backend"] == ("openvino" if _openvino_cmake_dir() else "aoti")
    bf16 = results["backends"].get("openvino:bf16", {})
    # bf16 is refused only where OpenVINO's CPU plugin lacks it, and says so
    assert "upscale" in bf16 or "no bf16" in bf16.get("skipped", "no bf16")


def _fp32_cases(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (backend, case, figures)
        for backend, r in results["backends"].items()
        if not backend.endswith("bf16")
        for case, figures in r["upscale"].items()
    ]


@pytest.mark.slow
def test_cpp_upscale_matches_python_runtime(ctest_run: tuple[Any, Path, dict[str, Any]]) -> None:
    """Same photo, same seed (so the same noise field): C++ (aoti, openvino fp32) vs Python (onnxruntime)."""
    _, data, cases = ctest_run
    results = json.loads((data / "results.json").read_text())
    bar = END_TO_END_FP32.max_abs
    assert bar is not None
    by_name = {c["name"]: c for c in cases["upscale"]}
    checked = _fp32_cases(results)
    assert len(checked) == len(cases["upscale"]) * len(_expected_backends() - {"openvino:bf16"})
    for backend, name, figures in checked:
        case = by_name[name]
        py = np.fromfile(data / case["expected"], dtype=np.float32)
        cpp = np.fromfile(data / figures["output"], dtype=np.float32)
        assert cpp.shape == py.shape
        max_abs = float(np.abs(cpp - py).max()) / 2.0  # [-1, 1] -> [0, 1]
        assert max_abs <= bar, f"{backend} {name}: max abs {max_abs:.2e} on [0, 1] (bar {bar})"
        assert np.abs(py).max() > 0.2  # a real image came through, not a blank canvas
        h, w = case["height"], case["width"]
        scale = round((py.size / (3 * h * w)) ** 0.5)
        py_u8 = from_model_range(py.reshape(3, h * scale, w * scale))
        cpp_u8 = np.fromfile(data / figures["output_u8"], dtype=np.uint8).reshape(py_u8.shape)
        assert np.abs(cpp_u8.astype(int) - py_u8.astype(int)).max() <= 1, f"{backend} {name}"


@pytest.mark.slow
def test_cpp_openvino_bf16_meets_the_psnr_bar(ctest_run: tuple[Any, Path, dict[str, Any]]) -> None:
    """openvino:bf16 end to end against Python's fp32 runtime with the same noise, PSNR on [0, 1] images."""
    _, data, cases = ctest_run
    results = json.loads((data / "results.json").read_text())
    bf16 = results.get("backends", {}).get("openvino:bf16")
    if bf16 is None or "upscale" not in bf16:
        pytest.skip(bf16["skipped"] if bf16 else "built without OpenVINO (pip install openvino)")
    assert END_TO_END_BF16_PSNR_DB is not None
    for case in cases["upscale"]:
        py = np.fromfile(data / case["expected"], dtype=np.float32).astype(np.float64) / 2.0
        cpp = np.fromfile(data / bf16["upscale"][case["name"]]["output"], dtype=np.float32) / 2.0
        assert np.isfinite(cpp).all()
        psnr = 10.0 * np.log10(1.0 / np.mean((cpp - py) ** 2))
        assert psnr >= END_TO_END_BF16_PSNR_DB, f"{case['name']}: {psnr:.1f} dB"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["", "aoti"])
def test_example_program_upscales_a_png(
    cpp_build: Path, aoti_bundle: Path, astronaut: np.ndarray, tmp_path: Path, backend: str
) -> None:
    """examples/upscale_png: PNG in, PNG out, equal to the Python runtime's uint8 image within 1 LSB.

    Once with the library's default backend (openvino where built with it) and once with aoti."""
    rgb = np.ascontiguousarray(astronaut[60:70, 240:252])
    Image.fromarray(rgb).save(tmp_path / "in.png")
    result = _run(
        [
            str(cpp_build / "upscale_png"),
            str(aoti_bundle),
            str(tmp_path / "in.png"),
            str(tmp_path / "out.png"),
            "--steps",
            "3",
            "--eta",
            "1.0",
            "--prior",
            "paper",
            "--seed",
            "5",
            "--backend",
            backend,
        ],
        timeout=300,
        # oneTBB's switch that drops RTLD_DEEPBIND, which the sanitizer build refuses (ctest sets it too)
        env={**os.environ, "OMP_NUM_THREADS": "1", "TBB_ENABLE_SANITIZERS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cpp = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    # the sampler is left to the bundle's default, as the example leaves it out
    py = from_model_range(
        _python_upscale(aoti_bundle, rgb, SamplingOptions(steps=3, eta=1.0, seed=5, prior="paper"))
    )
    assert cpp.shape == py.shape == (40, 48, 3)
    assert np.abs(cpp.astype(int) - py.astype(int)).max() <= 1


@pytest.mark.slow
def test_example_program_names_a_tampered_file(
    cpp_build: Path, aoti_bundle: Path, astronaut: np.ndarray, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(aoti_bundle, bundle)
    package = bundle / "aoti" / "predictor.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x5A  # one byte changed
    package.write_bytes(bytes(data))
    Image.fromarray(np.ascontiguousarray(astronaut[:8, :8])).save(tmp_path / "in.png")
    result = _run(
        [
            *(str(cpp_build / "upscale_png"), str(bundle), str(tmp_path / "in.png"), str(tmp_path / "o.png")),
            *("--backend", "aoti"),  # the default (openvino) never reads aoti/
        ],
        timeout=120,
    )
    assert result.returncode == 1
    assert "aoti/predictor.pt2: sha256 does not match" in result.stderr
    assert "ESRDF_ERR_HASH_MISMATCH" in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_export_cli_refuses_aoti_without_torch_weights(tmp_path: Path) -> None:
    """--aoti compiles the bundle's torch weights, so it is refused before any work without them."""
    from click.testing import CliRunner

    from esrdf.export.cli import main

    result = CliRunner().invoke(
        main, ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b"), "--aoti", "--no-torch-weights"]
    )
    assert result.exit_code == 1
    assert "--aoti compiles the bundle's torch weights" in result.output
    assert not (tmp_path / "b").exists()
