"""Image files in and out of the runtime: PIL and numpy only (no torch).

Two readers. ``load_picture`` keeps what an image is (``Picture``): grayscale stays grayscale, alpha is kept
(palette transparency becomes alpha), and 16-bit grayscale stays 16-bit; colour is always the model's RGB.
``load_image`` is the plain one (HxWx3 uint8: gray replicated, alpha dropped, 16 bits scaled to 8). Both
read palette, CMYK and EXIF-rotated photos. Pillow decodes 16-bit *colour* PNGs as 8-bit RGB (it has no
16-bit RGB mode), so only grayscale keeps 16 bits.
Anything unreadable is one ``ImageError`` line naming the file. A pixel-count guard turns "too large for
memory" into a clear message before decoding. Saving is atomic (``esrdf.atomic.atomic_path``): a temp file
next to the target, then a rename, so an interrupted run never leaves a partial image under the final name.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from esrdf.atomic import atomic_path

# Default LR pixel budget. The blend canvas costs 16 bytes per HR pixel (float32 sum over 3 channels plus a
# float32 weight), i.e. 16 * scale**2 bytes per input pixel: 2**24 input pixels at x4 is about 4.3 GB.
DEFAULT_MAX_PIXELS = 2**24
PARTIAL_SUFFIX = ".esrdf-partial"
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})  # the writable formats that hold 16-bit grayscale
OUTPUT_BITS = ("auto", "8", "16")
# A gray input's gray output: the mean of the model's three output channels. On 6 gray photos (README
# "What esrdf-run keeps") it scored 0.09 dB PSNR above BT.601 luma on average and above green alone: the
# channels carry partly independent sampling noise, which an equal-weight mean averages down the most.
GRAY_WEIGHTS = np.full(3, 1.0 / 3.0)


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


@dataclass(frozen=True)
class Picture:
    """An image as the runtime upscales it: RGB colour for the model, plus what the file was.

    ``color`` is HxWx3 uint8 or uint16 (a grayscale image's three channels are equal); ``alpha`` is HxW of
    the same dtype, or None. ``gray``: the output is written as grayscale, the mean of the model's RGB
    output channels (the model only knows RGB; see ``GRAY_WEIGHTS``). Alpha is upscaled apart from the
    colour, bicubic, as Real-ESRGAN does.
    """

    color: np.ndarray
    alpha: np.ndarray | None = None
    gray: bool = False

    def __post_init__(self) -> None:
        c, a = self.color, self.alpha
        if c.dtype not in (np.uint8, np.uint16) or c.ndim != 3 or c.shape[2] != 3:
            raise ValueError(f"Picture colour must be HxWx3 uint8 or uint16, got {c.dtype} {c.shape}")
        if a is not None and (a.dtype != c.dtype or a.shape != c.shape[:2]):
            raise ValueError(f"Picture alpha must be {c.shape[:2]} {c.dtype}, got {a.dtype} {a.shape}")

    @property
    def bits(self) -> int:
        return 16 if self.color.dtype == np.uint16 else 8

    @property
    def kind(self) -> str:
        """What it is, in PIL's words: L, LA, RGB, RGBA, I;16."""
        if self.gray:
            return "I;16" if self.bits == 16 else ("LA" if self.alpha is not None else "L")
        return "RGBA" if self.alpha is not None else "RGB"

    def gray_plane(self) -> np.ndarray:
        """HxW gray of the colour (``GRAY_WEIGHTS``), same dtype; exact for a gray input's equal channels."""
        top = 65535 if self.bits == 16 else 255
        return np.clip(np.rint(self.color @ GRAY_WEIGHTS), 0, top).astype(self.color.dtype)


def to_8_bits(array: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by scaling (x / 257, rounded), not clipping; uint8 passes through."""
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def picture_from_pil(img: Image.Image) -> Picture:
    """Any PIL mode -> ``Picture``: L/I;16/I/LA stay gray, alpha and palette transparency kept."""
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit (I;16*) and 32-bit int grayscale hold 0..65535; PIL's convert("L") would clip, not scale.
        gray16 = np.clip(np.asarray(img, dtype=np.float64), 0, 65535).astype(np.uint16)
        return Picture(np.repeat(gray16[..., None], 3, axis=-1), None, gray=True)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("L", "1"):
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        return Picture(np.repeat(gray[..., None], 3, axis=-1), None, gray=True)
    if img.mode in ("LA", "La"):
        la = np.asarray(img.convert("LA"), dtype=np.uint8)
        return Picture(np.repeat(la[..., :1], 3, axis=-1), np.ascontiguousarray(la[..., 1]), gray=True)
    if img.mode in ("RGBA", "RGBa", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return Picture(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]))
    return Picture(np.asarray(img.convert("RGB"), dtype=np.uint8))


def load_picture(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read an image file as a ``Picture``, upright per its EXIF orientation; ``ImageError`` if it fails."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        with img:
            img.load()
            picture = picture_from_pil(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data surfaces at load()
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None
    if picture.color.size == 0:
        raise ImageError(f"{path}: image has no pixels")
    return picture


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


def output_bits(picture: Picture, fmt: str, requested: str = "auto") -> int:
    """Bits per sample to write ``picture`` as ``fmt``: ``requested`` 8 or 16, or ``auto`` (16 for a 16-bit
    input where the format holds it). 16-bit is written for grayscale without alpha only: Pillow has no
    16-bit RGB or gray+alpha mode; other pictures are written with 8 bits."""
    if requested not in OUTPUT_BITS:
        raise ValueError(f"output bits must be one of {OUTPUT_BITS}, got {requested!r}")
    if fmt not in SIXTEEN_BIT_FORMATS or not picture.gray or picture.alpha is not None:
        return 8
    if requested == "auto":
        return picture.bits
    return int(requested)


def picture_to_pil(picture: Picture, bits: int | None = None) -> Image.Image:
    """A ``Picture`` as a PIL image of its kind (L, LA, I;16, RGB or RGBA) at ``bits`` (default: its own)."""
    bits = picture.bits if bits is None else bits
    if picture.gray and picture.alpha is None and bits == 16:
        gray = picture.gray_plane()
        gray16 = gray if gray.dtype == np.uint16 else gray.astype(np.uint16) * np.uint16(257)
        return Image.fromarray(gray16)  # mode I;16
    color = to_8_bits(picture.color)
    alpha = None if picture.alpha is None else to_8_bits(picture.alpha)
    if picture.gray:
        gray = Picture(color).gray_plane()
        return Image.fromarray(gray) if alpha is None else Image.fromarray(np.dstack([gray, alpha]), "LA")
    return Image.fromarray(color) if alpha is None else Image.fromarray(np.dstack([color, alpha]), "RGBA")


def save_picture(path: str | os.PathLike[str], picture: Picture, bits: str = "auto") -> None:
    """Write ``picture`` atomically as its kind (gray, alpha kept), at ``output_bits(...)`` bits."""
    path = Path(path)
    fmt = output_format(path)
    img = picture_to_pil(picture, output_bits(picture, fmt, bits))
    if fmt == "JPEG" and img.mode in ("RGBA", "LA"):
        img = img.convert(img.mode[:-1])  # JPEG holds no alpha
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(path, suffix=PARTIAL_SUFFIX) as tmp:
        img.save(tmp, format=fmt, **options)


def remove_stale_partials(target: str | os.PathLike[str]) -> int:
    """Delete temp files a killed run (SIGKILL skips cleanup) left for ``target``; returns how many."""
    target = Path(target)
    stale = list(target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _half_top(dtype: np.dtype) -> np.float32:
    return np.float32(127.5 if dtype == np.uint8 else 32767.5)


def to_model_range(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 or uint16 -> (3, H, W) float32 in [-1, 1] (the graphs' value range)."""
    half = _half_top(rgb.dtype)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / half - np.float32(1.0)


def from_model_range(chw: np.ndarray, dtype: type[np.unsignedinteger] = np.uint8) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> HxWx3 uint8 (or uint16: 16 bits kept through the float path), clipped
    and rounded to nearest."""
    scaled = (np.clip(chw, -1.0, 1.0) + 1.0) * _half_top(np.dtype(dtype))
    return np.ascontiguousarray(np.rint(scaled).astype(dtype).transpose(1, 2, 0))
