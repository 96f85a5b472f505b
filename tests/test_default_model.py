"""The shipped default model (esrdf/default_model, MODEL_CARD.md): it is there, fits the package budget,
loads strictly, verifies, runs from ``esrdf-run`` without ``--engine``, and its predictor beats bicubic."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from esrdf.default_model import default_bundle_dir, default_checkpoint_dir

MAX_SHIPPED_BYTES = 30 * 1024 * 1024  # issue 6: checkpoint + bundle together


def _hr_crop(photo: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    return np.ascontiguousarray(photo[top : top + size, left : left + size])


def test_shipped_files_fit_the_package_budget() -> None:
    files = [p for d in (default_checkpoint_dir(), default_bundle_dir()) for p in d.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "manifest.json", "predictor.onnx", "step.onnx"} <= names
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES


def test_shipped_bundle_verifies_and_a_corrupted_copy_is_refused(tmp_path: Path) -> None:
    from esrdf.runtime.bundle import BundleError, load_bundle

    bundle = load_bundle(default_bundle_dir(), verify=True)  # checks every graph's sha256
    assert bundle.manifest.scale == 4 and "fp32" in bundle.precisions()
    copy = Path(shutil.copytree(default_bundle_dir(), tmp_path / "bundle"))
    step = copy / "step.onnx"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="step.onnx"):
        load_bundle(copy, verify=True)


def test_shipped_checkpoint_loads_strictly_and_matches_the_bundle() -> None:
    import torch

    from esrdf.checkpoint import load_checkpoint, read_model_tensors
    from esrdf.runtime.bundle import load_bundle

    loaded = load_checkpoint(default_checkpoint_dir())  # strict: every key and shape must match the config
    assert loaded.unet is not None and loaded.config.scale == 4
    stored = read_model_tensors(default_checkpoint_dir())
    assert {k.split(".", 1)[0] for k in stored} == {"predictor", "unet"}  # the EMA U-Net, stored as unet.*
    # Weights are stored in fp16 for size and upcast on load (MODEL_CARD.md).
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    assert all(p.dtype == torch.float32 for p in loaded.predictor.parameters())
    assert load_bundle(default_bundle_dir()).manifest.model() == loaded.config


def test_esrdf_run_without_engine_upscales_a_photo_with_the_default_bundle(
    tmp_path: Path, astronaut: np.ndarray
) -> None:
    from esrdf.data import bicubic_downsample
    from esrdf.metrics import psnr_rgb
    from esrdf.runtime.cli import main

    hr = _hr_crop(astronaut, 96, 40, 180)  # the face: skin, eyes, hair
    source, target = tmp_path / "face.png", tmp_path / "face_x4.png"
    Image.fromarray(bicubic_downsample(hr, 4)).save(source)
    result = CliRunner().invoke(main, ["-i", str(source), "-o", str(target), "--steps", "10"])
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(target).convert("RGB"))
    assert out.shape == hr.shape
    # A 4x upscale of this crop, not noise or a shifted image (the bundle's sampling applies: no --eta given).
    assert psnr_rgb(out, hr) > 22.0


def test_default_predictor_beats_bicubic_on_a_held_out_photo(eval_photos: dict[str, np.ndarray]) -> None:
    import torch

    from esrdf.checkpoint import load_checkpoint
    from esrdf.data import bicubic_downsample, to_tensor
    from esrdf.evaluate import bicubic_upsample, to_uint8
    from esrdf.metrics import psnr_rgb

    hr = _hr_crop(eval_photos["coffee"], 192, 100, 200)  # cup rim, saucer and wood grain
    lr = bicubic_downsample(hr, 4)
    predictor = load_checkpoint(default_checkpoint_dir()).predictor
    with torch.no_grad():
        coarse = to_uint8(predictor(to_tensor(lr)[None]))
    assert psnr_rgb(coarse, hr) > psnr_rgb(bicubic_upsample(lr, 4), hr)


def test_default_model_import_keeps_the_runtime_torch_free() -> None:
    code = (
        "import sys, esrdf.default_model, esrdf.runtime.cli; esrdf.default_model.default_bundle_dir(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
