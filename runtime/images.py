"""Image files in and out of the runtime: PIL and numpy only (no torch).

Loading accepts what users actually have: grayscale, RGBA/LA (alpha dropped: the colour is upscaled as
stored), palette, CMYK, 16-bit (scaled, not clipped, to 8 bits) and EXIF-rotated photos, all to HxWx3 uint8.
Anything unreadable is one ``ImageError`` line naming the file. A pixel-count guard turns "too large for
memory" into a clear message before decoding. Saving is atomic (``esrdf.atomic.atomic_path``): a temp file
next to the target, then a rename, so an interrupted run never leaves a partial image under the final name.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from esrdf.atomic import atomic_path

# Default LR pixel budget. The blend canvas costs 16 bytes per HR pixel (float32 sum over 3 channels plus a
# float32 weight), i.e. 16 * scale**2 bytes per input pixel: 2**24 input pixels at x4 is about 4.3 GB.
DEFAULT_MAX_PIXELS = 2**24
PARTIAL_SUFFIX = ".esrdf-partial"


class ImageError(ValueError):
    """An input that cannot be processed; ``str()`` is one line naming the file and the reason."""


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: image too large for memory (over {max_pixels:,} pixels)") from None
    except OSError as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageError(
            f"{path}: image too large for memory ({width}x{height} = {width * height:,} pixels, "
            f"limit {max_pixels:,}); split it or raise the limit"
        )
    return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8."""
    if img.mode.startswith("I"):
        # 16-bit (I;16*) and 32-bit int grayscale hold 0..65535: scale to 8 bits; PIL's convert would clip.
        gray = np.asarray(img, dtype=np.float64)
        gray8 = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray8[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA", "P"):
        img = img.convert("RGBA")  # resolves palettes and palette transparency before dropping alpha
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as HxWx3 uint8, upright per its EXIF orientation; ``ImageError`` on any failure."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        with img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            array = _to_rgb_array(upright)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data surfaces at load()
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    if array.size == 0:
        raise ImageError(f"{path}: image has no pixels")
    return np.ascontiguousarray(array)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL image (any mode) -> HxWx3 uint8, with the same conversions as ``load_image``."""
    return np.ascontiguousarray(_to_rgb_array(ImageOps.exif_transpose(img)))


def output_format(path: str | os.PathLike[str]) -> str:
    """The PIL format that writes ``path``'s extension; ``ImageError`` if none does."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"{path}: cannot write images with extension {ext!r} (try .png)")
    return fmt


def save_image(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write HxWx3 uint8 atomically: temp file in the same directory, then rename over ``path``."""
    path = Path(path)
    fmt = output_format(path)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8, got {rgb.dtype} {rgb.shape}")
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(path, suffix=PARTIAL_SUFFIX) as tmp:
        Image.fromarray(rgb).save(tmp, format=fmt, **options)


def remove_stale_partials(target: str | os.PathLike[str]) -> int:
    """Delete temp files a killed run (SIGKILL skips cleanup) left for ``target``; returns how many."""
    target = Path(target)
    stale = list(target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def to_model_range(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> (3, H, W) float32 in [-1, 1] (the graphs' value range)."""
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(127.5) - np.float32(
        1.0
    )


def from_model_range(chw: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> HxWx3 uint8, clipped and rounded to nearest."""
    scaled = (np.clip(chw, -1.0, 1.0) + 1.0) * 127.5
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint8).transpose(1, 2, 0))
