"""The runtime on a real exported bundle: the embeddable ``Upscaler`` and the ``esrdf-run`` CLI.

The bundle is the session's shared export of a seeded random-init ``tiny`` checkpoint (tests/tiny_bundle.py;
no trained weights exist offline): the API's and the CLI's behaviour does not depend on the weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from concurrency import assert_threads_match_serial
from PIL import Image

from esrdf.config import SamplingOptions
from esrdf.runtime import Upscaler
from esrdf.runtime.bundle import load_bundle
from esrdf.runtime.cli import main
from esrdf.runtime.images import PARTIAL_SUFFIX, load_image, to_model_range
from esrdf.runtime.tolerances import END_TO_END_FP32

torch = pytest.importorskip("torch")

STEPS = 3


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared tiny bundle (tests/tiny_bundle.py: LR tile 8, batch 2, fp32 + fp16).

    ESRDF_TEST_BUNDLE names one exported elsewhere the same way, for machines without the export tools
    (the GPU machine has no polygraphy).
    """
    prebuilt = os.environ.get("ESRDF_TEST_BUNDLE")
    if prebuilt:
        return Path(prebuilt)
    pytest.importorskip(
        "polygraphy", reason="exporting the test bundle needs polygraphy; set ESRDF_TEST_BUNDLE"
    )
    from tiny_bundle import tiny_bundle as shared_tiny_bundle

    return shared_tiny_bundle(tmp_path_factory.getbasetemp())


def lr_crop(photo: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(photo[y : y + h, x : x + w])


# ---------------------------------------------------------------- the embeddable API
# (runtime vs eager sampler, fp16 vs fp32 and tiled vs untiled are in test_end_to_end.py)


def test_upscaler_numpy_pil_odd_sizes_and_determinism(tiny_bundle, astronaut) -> None:
    upscaler = Upscaler(tiny_bundle)  # tile 8 and batch 2 from the bundle's export settings
    # ... except that OpenVINO (what auto picks on a bf16 CPU) runs 1 tile per call unless told
    batch = 1 if upscaler.choice.backend == "openvino" else 2
    assert (upscaler.tile, upscaler.batch, upscaler.overlap) == (8, batch, 1)
    assert Upscaler(tiny_bundle, "onnxruntime").batch == 2
    small = lr_crop(astronaut, 200, 200, 7, 13)  # smaller than a tile: edge-padded, then cropped
    out = upscaler(small, SamplingOptions(steps=2, seed=1))
    assert out.shape == (28, 52, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(upscaler(small, SamplingOptions(steps=2, seed=1)), out)
    assert not np.array_equal(upscaler(small, SamplingOptions(steps=2, seed=2)), out)
    pil = upscaler(Image.fromarray(small), SamplingOptions(steps=2, seed=1))
    assert isinstance(pil, Image.Image) and pil.size == (52, 28)
    np.testing.assert_array_equal(np.asarray(pil), out)
    with pytest.raises(TypeError, match="HxWx3 uint8"):
        upscaler(small.astype(np.float32))


def test_upscaler_is_safe_across_threads(tiny_bundle, astronaut) -> None:
    upscaler = Upscaler(tiny_bundle, threads=1)
    images = [lr_crop(astronaut, 40 * i, 100, 18, 22) for i in range(4)]
    assert_threads_match_serial(upscaler, images)


def test_unknown_backends_and_devices_are_clear(tiny_bundle) -> None:
    from esrdf.runtime.engine import EngineError

    with pytest.raises(EngineError, match="tensorrt"):
        Upscaler(tiny_bundle, backend="tensorrt")
    with pytest.raises(EngineError, match="unknown backend"):
        Upscaler(tiny_bundle, backend="tvm")


# ---------------------------------------------------------------- esrdf-run


@pytest.fixture
def photo_folder(tmp_path: Path, astronaut: np.ndarray, eval_photos) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(lr_crop(astronaut, 100, 180, 16, 20)).save(folder / "face.png")
    Image.fromarray(lr_crop(eval_photos["coffee"], 100, 200, 13, 17)).save(folder / "coffee.jpg", quality=95)
    Image.fromarray(lr_crop(eval_photos["chelsea"], 120, 160, 20, 16)).convert("L").save(folder / "cat.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG header, then nothing
    (folder / "notes.txt").write_text("not an image, not a failure")
    return folder


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_folder_run_skip_existing_and_overwrite(tiny_bundle, photo_folder, tmp_path) -> None:
    out = tmp_path / "out"
    inputs_before = {p.name: p.read_bytes() for p in photo_folder.iterdir()}
    code, output = run_cli(
        "--engine", str(tiny_bundle), "-i", str(photo_folder), "-o", str(out), "--steps", "2"
    )
    assert code == 1  # one input failed
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "coffee.jpg", "face.png"]
    assert load_image(out / "face.png").shape == (64, 80, 3)
    assert load_image(out / "cat.png").shape == (80, 64, 3)
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "broken.png" in error_lines[0]
    assert "3 upscaled, 0 already done, 1 failed" in output

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, output = run_cli(
        "--engine", str(tiny_bundle), "-i", str(photo_folder), "-o", str(out), "--steps", "2"
    )
    assert code == 1 and "0 upscaled, 3 already done, 1 failed" in output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (photo_folder / "broken.png").unlink()
    code, output = run_cli(
        "--engine", str(tiny_bundle), "-i", str(photo_folder), "-o", str(out), "--steps", "2", "--overwrite"
    )
    assert code == 0 and "3 upscaled, 0 already done, 0 failed" in output
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.iterdir())
    inputs_before.pop("broken.png")
    assert {p.name: p.read_bytes() for p in photo_folder.iterdir()} == inputs_before


def test_input_is_never_overwritten(tiny_bundle, photo_folder) -> None:
    before = {p.name: p.read_bytes() for p in photo_folder.iterdir()}
    code, output = run_cli("--engine", str(tiny_bundle), "-i", str(photo_folder), "-o", str(photo_folder))
    assert code == 2 and "input folder" in output
    face = photo_folder / "face.png"
    code, output = run_cli(
        "--engine", str(tiny_bundle), "-i", str(face), "-o", str(photo_folder), "--overwrite"
    )
    assert code == 2 and "overwrite the input" in output
    assert {p.name: p.read_bytes() for p in photo_folder.iterdir()} == before


def test_single_file_and_too_large(tiny_bundle, photo_folder, tmp_path) -> None:
    code, _ = run_cli(
        "--engine",
        str(tiny_bundle),
        "-i",
        str(photo_folder / "face.png"),
        "-o",
        str(tmp_path / "face_x4.webp"),
        "--steps",
        "1",
        "--sampler",
        "ddim",
        "--eta",
        "1",
    )
    assert code == 0 and load_image(tmp_path / "face_x4.webp").shape == (64, 80, 3)
    code, output = run_cli(
        "--engine",
        str(tiny_bundle),
        "-i",
        str(photo_folder / "face.png"),
        "-o",
        str(tmp_path / "big.png"),
        "--max-pixels",
        "100",
    )
    assert code == 1 and "too large for memory" in output and not (tmp_path / "big.png").exists()


def test_bad_bundle_and_options_fail_once_with_a_clear_message(tiny_bundle, photo_folder, tmp_path) -> None:
    code, output = run_cli("--engine", str(tmp_path), "-i", str(photo_folder), "-o", str(tmp_path / "o"))
    assert code == 1 and "not an ESRDF bundle" in output
    assert not (tmp_path / "o").exists()  # the output folder made by the pre-flight check is removed again
    code, output = run_cli(
        "--engine",
        str(tiny_bundle),
        "-i",
        str(photo_folder),
        "-o",
        str(tmp_path / "o"),
        "--sampler",
        "ddpm",
        "--steps",
        "5",
    )
    assert code == 1 and "ddpm samples all" in output and output.count("ddpm samples all") == 1


def test_interrupted_folder_run_resumes(tiny_bundle, tmp_path, astronaut) -> None:
    """SIGINT mid-run: finished images stay, no partial file is left, and the same command resumes."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(lr_crop(astronaut, 30 * i, 150, 24, 24)).save(folder / f"img{i}.png")
    args = ["--engine", str(tiny_bundle), "-i", str(folder), "-o", str(out), "--steps", "4", "--threads", "1"]
    cmd = [sys.executable, "-c", "from esrdf.runtime.cli import main; main()", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "first output never appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout
    assert "rerun the same command to resume" in stdout
    done = sorted(p.name for p in out.iterdir())
    assert not any(name.endswith(PARTIAL_SUFFIX) for name in done)
    assert 1 <= len(done) < 8
    for name in done:
        assert load_image(out / name).shape == (96, 96, 3)

    code, output = run_cli(*args)
    assert code == 0 and f"{8 - len(done)} upscaled, {len(done)} already done, 0 failed" in output
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(8)]


def test_bundle_reader_accepts_the_exported_bundle(tiny_bundle) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.precisions() == ["fp32", "fp16"]
    assert bundle.manifest.scale == 4 and bundle.manifest.lr_multiple_of == 1


@pytest.mark.gpu
def test_torch_cuda_backend_matches_onnxruntime_cpu(tiny_bundle, astronaut, test_device) -> None:
    """The driver over a device engine (torch tensors on CUDA) gives the CPU onnxruntime image."""
    lr = to_model_range(lr_crop(astronaut, 90, 170, 30, 36))
    cpu = Upscaler(tiny_bundle, tile=16, batch=2).upscale_array(
        lr, SamplingOptions(steps=STEPS, eta=0.5, seed=4)
    )
    gpu = Upscaler(tiny_bundle, backend="torch", device=test_device, tile=16, batch=2)
    out = gpu.upscale_array(lr, SamplingOptions(steps=STEPS, eta=0.5, seed=4))
    assert np.abs(out - cpu).max() / 2 <= END_TO_END_FP32.max_abs
