"""Shared fixtures: real offline photos (docs/DESIGN.md section 5) and hardware markers.

Evaluation photos come from scikit-image and scikit-learn (held out from training); training photos come
from Debian packages installed by .ci/run. Hardware tiers skip with a reason where the hardware is missing.
ESRDF_TEST_DEVICE=cuda selects the device for gpu-marked tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

TRAINING_PHOTO_DIRS = (
    Path("/usr/share/backgrounds/mate/nature"),
    Path("/usr/share/wallpapers"),
    Path("/usr/share/libjxl-testdata/jxl/flower"),
)


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _cuda_available()
    # find_spec("tensorrt") is fooled by tensorrt-stubs, an importable empty namespace package.
    from esrdf.engines.tensorrt_build import tensorrt_unavailable_reason

    has_trt = tensorrt_unavailable_reason() is None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none found)")
    skip_trt = pytest.mark.skip(reason="needs tensorrt and a CUDA device (tensorrt is not installable here)")
    for item in items:
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(skip_trt)
        elif "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def test_device() -> str:
    return os.environ.get("ESRDF_TEST_DEVICE", "cuda" if _cuda_available() else "cpu")


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _bundled_eval_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = {n: _skimage_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")}
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images, strict=True):
        photos[Path(fname).stem] = np.ascontiguousarray(img)
    return photos


@pytest.fixture(scope="session")
def eval_photos() -> dict[str, np.ndarray]:
    """Held-out real photos as HxWx3 uint8: scikit-image's and scikit-learn's bundled images.

    A GPU machine without those packages reads the copy that ``benchmarks/gpu_check.sh`` saved on a CPU
    machine (``ESRDF_TEST_PHOTOS``, an .npz)."""
    try:
        return _bundled_eval_photos()
    except ImportError as exc:
        cached = os.environ.get("ESRDF_TEST_PHOTOS")
        if not cached:
            pytest.skip(f"no held-out photos: {exc}; set ESRDF_TEST_PHOTOS to a photos.npz")
        with np.load(cached) as npz:
            return {name: npz[name] for name in npz.files}


@pytest.fixture(scope="session")
def photos(eval_photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return eval_photos


@pytest.fixture(scope="session")
def astronaut(eval_photos: dict[str, np.ndarray]) -> np.ndarray:
    return eval_photos["astronaut"]


@pytest.fixture(scope="session")
def training_photos() -> list[Path]:
    """Real training photos installed from Debian packages (mate-backgrounds, plasma wallpapers, libjxl)."""
    found: list[Path] = []
    for root in TRAINING_PHOTO_DIRS:
        if root.is_dir():
            found += sorted(
                p
                for p in root.rglob("*")
                if p.suffix.lower() in {".jpg", ".png"}
                and "screenshot" not in p.name
                and "flower.png." not in p.name
            )
    if not found:
        pytest.skip(
            "training photos missing: apt-get install mate-backgrounds plasma-workspace-wallpapers "
            "libjxl-testdata (.ci/run does this)"
        )
    return found
