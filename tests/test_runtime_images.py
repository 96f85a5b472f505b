"""Image loading and saving for the runtime: every input kind made from real photo crops."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from esrdf.runtime.images import (
    PARTIAL_SUFFIX,
    ImageError,
    from_model_range,
    load_image,
    pil_to_array,
    remove_stale_partials,
    save_image,
    to_model_range,
)


@pytest.fixture(scope="module")
def crop(astronaut: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(astronaut[120:168, 180:244])  # 48 x 64, face and suit


def test_rgb_png_and_jpeg(tmp_path: Path, crop: np.ndarray) -> None:
    Image.fromarray(crop).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), crop)
    Image.fromarray(crop).save(tmp_path / "a.jpg", quality=95)
    jpg = load_image(tmp_path / "a.jpg")
    assert jpg.shape == crop.shape and jpg.dtype == np.uint8
    assert np.abs(jpg.astype(int) - crop).mean() < 4


def test_grayscale_rgba_palette_cmyk(tmp_path: Path, crop: np.ndarray) -> None:
    gray = np.asarray(Image.fromarray(crop).convert("L"))
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_image(tmp_path / "l.png"), np.stack([gray] * 3, axis=-1))

    alpha = np.linspace(0, 255, crop.shape[1], dtype=np.uint8)[None, :].repeat(crop.shape[0], 0)
    Image.fromarray(np.dstack([crop, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), crop)  # alpha dropped, colour kept

    Image.fromarray(np.dstack([gray, alpha])).save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), np.stack([gray] * 3, axis=-1))

    palette = Image.fromarray(crop).quantize(64)
    palette.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))

    Image.fromarray(crop).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == crop.shape and np.abs(cmyk.astype(int) - crop).mean() < 6


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, crop: np.ndarray) -> None:
    gray16 = np.asarray(Image.fromarray(crop).convert("L"), dtype=np.uint16) * 257 + 100
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    loaded = load_image(tmp_path / "g16.png")
    expected = np.rint(gray16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(loaded, np.stack([expected] * 3, axis=-1))
    assert loaded.max() > 200  # a clipping conversion would saturate almost everything at 255


def _png_rgb16(path: Path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2, filter 0 rows."""
    h, w, _ = rgb16.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16_bit_rgb(tmp_path: Path, crop: np.ndarray) -> None:
    rgb16 = crop.astype(np.uint16) * 257 + 77
    _png_rgb16(tmp_path / "rgb16.png", rgb16)
    loaded = load_image(tmp_path / "rgb16.png")
    assert np.abs(loaded.astype(int) - np.rint(rgb16 / 257.0)).max() <= 1


def test_exif_orientation_is_applied(tmp_path: Path, crop: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(crop).save(tmp_path / "rot.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "rot.png"), np.rot90(crop, k=-1))


def _one_line_error(path: Path, match: str, **kwargs) -> None:
    with pytest.raises(ImageError, match=match) as info:
        load_image(path, **kwargs)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_inputs_give_one_clear_line(tmp_path: Path, crop: np.ndarray) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    _one_line_error(tmp_path / "empty.png", "empty file")

    (tmp_path / "notes.png").write_text("these are not pixels\n")
    _one_line_error(tmp_path / "notes.png", "not a recognised image format")

    Image.fromarray(crop).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "truncated.png", "corrupt or truncated")

    Image.fromarray(crop).save(tmp_path / "full.jpg")
    jpeg = bytearray((tmp_path / "full.jpg").read_bytes())
    (tmp_path / "cut.jpg").write_bytes(bytes(jpeg[: len(jpeg) // 3]))
    _one_line_error(tmp_path / "cut.jpg", "corrupt or truncated")

    _one_line_error(tmp_path / "missing.png", "no such file")


def test_too_large_is_refused_before_decoding(tmp_path: Path, crop: np.ndarray) -> None:
    Image.fromarray(crop).save(tmp_path / "a.png")
    _one_line_error(
        tmp_path / "a.png", r"too large for memory \(64x48 = 3,072 pixels, limit 3,000\)", max_pixels=3000
    )
    assert load_image(tmp_path / "a.png", max_pixels=3072).shape == (48, 64, 3)


def test_pil_input_matches_file_input(crop: np.ndarray) -> None:
    np.testing.assert_array_equal(pil_to_array(Image.fromarray(crop).convert("RGBA")), crop)


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize("name", ["out.png", "out.JPG", "out.webp", "out.tif", "out.bmp"])
def test_save_round_trip(tmp_path: Path, crop: np.ndarray, name: str) -> None:
    save_image(tmp_path / name, crop)
    loaded = load_image(tmp_path / name)
    lossy = name.lower().endswith((".jpg", ".webp"))
    assert np.abs(loaded.astype(int) - crop).mean() < (4 if lossy else 1e-9)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_save_rejects_unknown_extension(tmp_path: Path, crop: np.ndarray) -> None:
    with pytest.raises(ImageError, match="cannot write images with extension '.xyz'"):
        save_image(tmp_path / "out.xyz", crop)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_no_partial_and_keeps_old_file(
    tmp_path: Path, crop: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.png"
    save_image(target, crop)
    before = target.read_bytes()
    original_save = Image.Image.save

    def save_then_interrupt(self, fp, *args, **kwargs):  # fault injection: die mid-write
        original_save(self, fp, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_image(target, crop[::-1])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_stale_partials_are_removed(tmp_path: Path, crop: np.ndarray) -> None:
    (tmp_path / f".out.png.abc123{PARTIAL_SUFFIX}").write_bytes(b"half")
    (tmp_path / f".other.png.abc123{PARTIAL_SUFFIX}").write_bytes(b"half")
    assert remove_stale_partials(tmp_path / "out.png") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.png.abc123{PARTIAL_SUFFIX}"]


def test_model_range_round_trip(crop: np.ndarray) -> None:
    chw = to_model_range(crop)
    assert chw.shape == (3, 48, 64) and chw.dtype == np.float32
    assert chw.min() >= -1 and chw.max() <= 1
    np.testing.assert_array_equal(from_model_range(chw), crop)
    np.testing.assert_array_equal(from_model_range(chw * 3), from_model_range(np.clip(chw * 3, -1, 1)))
