"""Images keep what they are through ``Upscaler`` and ``esrdf-run``: gray, alpha, 16-bit, tiny.

The shipped default model (a real bundle) on crops of real photos; one or two sampler steps, since what is
checked is the kind and the bookkeeping, except in the tiny-image quality test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from esrdf.config import SamplingOptions
from esrdf.default_model import RECOMMENDED_SAMPLING, default_bundle_dir
from esrdf.runtime import Upscaler
from esrdf.runtime.cli import main
from esrdf.runtime.images import PARTIAL_SUFFIX

FAST = SamplingOptions(steps=1, eta=1.0, seed=0)


@pytest.fixture(scope="module")
def upscaler() -> Upscaler:
    return Upscaler(default_bundle_dir(), threads=1)


@pytest.fixture(scope="module")
def face(eval_photos: dict[str, np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(eval_photos["astronaut"][90:114, 170:202])  # 24 x 32, face and hair


@pytest.fixture(scope="module")
def face_gray(face: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(face).convert("L"))


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--steps", "1"])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def no_partials(folder: Path) -> bool:
    return not any(p.name.endswith(PARTIAL_SUFFIX) or p.name.startswith(".") for p in folder.iterdir())


def shrink(array: np.ndarray, factor: int) -> np.ndarray:
    """Box-average down by ``factor`` (floats), to compare an upscaled plane with its source."""
    h, w = array.shape[0] // factor, array.shape[1] // factor
    return array[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


# ---------------------------------------------------------------- the Python API


def test_gray_arrays_and_images_come_back_gray(upscaler, face_gray) -> None:
    out = upscaler(face_gray, FAST)
    assert out.shape == (96, 128) and out.dtype == np.uint8
    pil = upscaler(Image.fromarray(face_gray), FAST)
    assert pil.mode == "L" and pil.size == (128, 96)
    np.testing.assert_array_equal(np.asarray(pil), out)
    # It is the gray photo upscaled: box-averaged back down it is close to the input.
    assert np.abs(shrink(out.astype(np.float64), 4) - face_gray).mean() < 8


def test_16_bit_stays_16_bit_through_the_float_path(upscaler, face_gray) -> None:
    gray16 = face_gray.astype(np.uint16) * 257 + np.uint16(128)  # 16-bit values between the 8-bit levels
    out16 = upscaler(gray16, FAST)
    assert out16.dtype == np.uint16 and out16.shape == (96, 128)
    assert np.mean(out16 % 257 != 0) > 0.5  # not quantised to 8 bits on the way
    out8 = upscaler(face_gray, FAST).astype(np.float64)
    assert np.abs(out16 / 257.0 - out8).mean() < 1.5  # the same picture
    pil = upscaler(Image.fromarray(gray16), FAST)
    assert pil.mode == "I;16" and np.array_equal(np.asarray(pil), out16)


def test_alpha_is_kept_and_upscaled_apart_from_the_colour(upscaler, face, face_gray) -> None:
    alpha = np.where(face_gray > 110, 255, 40).astype(np.uint8)  # a matte from the photo itself
    rgba = np.dstack([face, alpha])
    out = upscaler(rgba, FAST)
    assert out.shape == (96, 128, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., :3], upscaler(face, FAST))  # alpha does not touch the colour
    assert np.abs(shrink(out[..., 3].astype(np.float64), 4) - alpha).mean() < 12  # bicubic of the matte
    la = upscaler(Image.fromarray(np.dstack([face_gray, alpha]), "LA"), FAST)
    assert la.mode == "LA" and la.size == (128, 96)
    pil = upscaler(Image.fromarray(rgba, "RGBA"), FAST)
    assert pil.mode == "RGBA" and np.array_equal(np.asarray(pil), out)


def test_float_arrays_are_refused_naming_the_accepted_kinds(upscaler, face) -> None:
    with pytest.raises(TypeError, match=r"uint8 or uint16 arrays, or PIL images; got float32"):
        upscaler(face.astype(np.float32))
    with pytest.raises(TypeError, match=r"got uint8 \(24, 32, 2\)"):
        upscaler(np.dstack([face[..., 0], face[..., 1]]))


# ---------------------------------------------------------------- esrdf-run


@pytest.fixture
def kinds_folder(tmp_path: Path, face: np.ndarray, face_gray: np.ndarray) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    alpha = np.where(face_gray > 110, 255, 40).astype(np.uint8)
    Image.fromarray(face_gray).save(folder / "gray.png")
    Image.fromarray(face_gray.astype(np.uint16) * 257 + np.uint16(100)).save(folder / "gray16.png")
    Image.fromarray(np.dstack([face_gray, alpha]), "LA").save(folder / "gray_alpha.png")
    Image.fromarray(np.dstack([face, alpha]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(face).quantize(32).save(folder / "palette.png", transparency=0)
    Image.fromarray(face).save(folder / "rgb.jpg", quality=95)
    return folder


def test_the_cli_writes_each_kind_as_it_came(kinds_folder, tmp_path) -> None:
    out = tmp_path / "out"
    code, output = run_cli("-i", str(kinds_folder), "-o", str(out))
    assert code == 0 and "6 upscaled" in output
    modes = {p.name: Image.open(p).mode for p in out.iterdir()}
    assert modes == {
        "gray.png": "L",
        "gray16.png": "I;16",
        "gray_alpha.png": "LA",
        "rgba.png": "RGBA",
        "palette.png": "RGBA",  # palette transparency becomes alpha
        "rgb.jpg": "RGB",
    }
    assert all(Image.open(p).size == (128, 96) for p in out.iterdir()) and no_partials(out)
    sixteen = np.asarray(Image.open(out / "gray16.png"))
    assert np.mean(sixteen % 257 != 0) > 0.5


def test_output_bits_8_and_16(kinds_folder, tmp_path) -> None:
    code, _ = run_cli(
        "-i", str(kinds_folder / "gray16.png"), "-o", str(tmp_path / "g8.png"), "--output-bits", "8"
    )
    assert code == 0 and Image.open(tmp_path / "g8.png").mode == "L"
    code, _ = run_cli(
        "-i", str(kinds_folder / "gray.png"), "-o", str(tmp_path / "g16.tif"), "--output-bits", "16"
    )
    assert code == 0 and Image.open(tmp_path / "g16.tif").mode == "I;16"
    code, _ = run_cli(
        "-i", str(kinds_folder / "rgba.png"), "-o", str(tmp_path / "c.png"), "--output-bits", "16"
    )
    assert code == 0 and Image.open(tmp_path / "c.png").mode == "RGBA"  # colour stays 8-bit (Pillow)


# ---------------------------------------------------------------- tiny images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.mark.slow
def test_tiny_images_score_at_least_bicubic(upscaler, eval_photos) -> None:
    """Real photo crops of 4x4 to 16x16 LR pixels (bicubic-downscaled HR crops), at the model's sampling."""
    model, bicubic = [], []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo = eval_photos[name]
        for n in (4, 8, 16):
            hr = np.ascontiguousarray(photo[150 : 150 + 4 * n, 200 : 200 + 4 * n])
            lr = np.asarray(Image.fromarray(hr).resize((n, n), Image.Resampling.BICUBIC))
            up = np.asarray(Image.fromarray(lr).resize((4 * n, 4 * n), Image.Resampling.BICUBIC))
            out = upscaler(lr, RECOMMENDED_SAMPLING)  # edge-padded to one 64x64 LR tile, then cropped
            assert out.shape == hr.shape
            model.append(psnr(out, hr))
            bicubic.append(psnr(up, hr))
    assert np.mean(model) >= np.mean(bicubic), (np.mean(model), np.mean(bicubic))
    one = upscaler(eval_photos["chelsea"][200:201, 200:201], RECOMMENDED_SAMPLING)
    assert one.shape == (4, 4, 3)
