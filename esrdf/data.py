"""Training data: random HR crops from a folder of photos, with LR made by bicubic downsampling.

The degradation is the paper's (Section 5.1: FFHQ 32->128, DIV2K/Urban100 40->160): LR = bicubic(HR, 1/s).
It is PIL's ``Image.resize(..., Image.Resampling.BICUBIC)`` on the uint8 HR crop. PIL widens the cubic kernel
by the downscale factor, so this downsampling is antialiased, like MATLAB's ``imresize`` and unlike
``torch.nn.functional.interpolate(mode="bicubic", antialias=False)``.

Every photo is decoded once, converted to 8-bit RGB and cached in memory (optionally shrunk so its longer
side is at most ``max_side``), so a training step only slices arrays and resizes small crops. Sample ``i`` is
a pure function of ``(seed, i)`` (image, crop position, flips), and step ``k`` of a run always reads the
same sample indices (:class:`StepBatchSampler`), so a resumed run sees exactly the data of an uninterrupted
one, and each data-parallel rank reads its own distinct slice of every global batch.

Image modes: grayscale and palette images become RGB; images with transparency (RGBA, LA, PA, palette or
RGB with a transparent colour) are composited on WHITE; 16-bit and 32-bit integer images (``I;16*``, ``I``)
are scaled to 8 bits, float images (``F``) are read as [0, 1] when they fit, else as [0, 255]. EXIF
orientation is applied. Files with an image extension that do not decode are skipped: a warning line names
how many and the first few, and :attr:`ImageFolderDataset.skipped` lists them all. Images smaller than the
crop are skipped as well (listed the same way) rather than reflect-padded: mirrored borders would teach the
network seams that real photos do not have.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pnm",
        ".pam",
        ".gif",
        ".tga",
    }
)

# Offline training photos (docs/DESIGN.md section 5), installed by apt; never committed.
MATE_NATURE_DIR = Path("/usr/share/backgrounds/mate/nature")
PLASMA_WALLPAPER_DIR = Path("/usr/share/wallpapers")
LIBJXL_FLOWER = Path("/usr/share/libjxl-testdata/jxl/flower/flower.png")
TRAINING_PHOTO_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers", "libjxl-testdata")


class DataError(ValueError):
    """A data folder that yields no usable training image, or invalid crop/scale settings."""


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str


def offline_training_photos(
    mate_dir: Path = MATE_NATURE_DIR, wallpaper_dir: Path = PLASMA_WALLPAPER_DIR, flower: Path = LIBJXL_FLOWER
) -> list[Path]:
    """The offline training set: MATE nature photos, the largest ``contents/images/*`` of each Plasma
    wallpaper (other sizes are the same picture; screenshots and dark variants are left out) and libjxl's
    flower.png. Returns what is installed, sorted; empty when none of the packages is."""
    photos = (
        sorted(p for p in mate_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if mate_dir.is_dir()
        else []
    )
    if wallpaper_dir.is_dir():
        for images in sorted(wallpaper_dir.glob("*/contents/images")):
            # The smaller sizes are often symlinks to the largest file: resolve, then keep the most pixels.
            candidates = {p.resolve() for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
            if candidates:
                photos.append(max(candidates, key=lambda p: (_pixel_count(p), p.name)))
    if flower.is_file():
        photos.append(flower)
    return photos


def _pixel_count(path: Path) -> int:
    """Width * height from the file header (PIL opens lazily), 0 when it does not open."""
    try:
        with Image.open(path) as img:
            return int(img.width * img.height)
    except (OSError, ValueError):
        return 0


def list_image_files(source: Path | Sequence[Path]) -> list[Path]:
    """Image files (by extension) under a folder, recursively and sorted, or the given list of files."""
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist or is not a folder")
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        found = [Path(p) for p in source]
    # Wallpaper packages link several names to one file; count each picture once.
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8 (H, W), scaled rather than clipped."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(arr * scale) + 0.5, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white (see the module docstring)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: Path, max_side: int | None = None) -> np.ndarray:
    """Decode one image file to an (H, W, 3) uint8 array, EXIF-rotated, optionally shrunk (bicubic) so
    its longer side is at most ``max_side``. Raises OSError/ValueError for files that do not decode."""
    with Image.open(path) as opened:
        if max_side is not None and opened.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 size when the result still exceeds max_side: several
            # times faster on multi-megapixel photos, and DCT scaling is itself an antialiased downscale.
            ratio = max_side / max(opened.size)
            opened.draft("RGB", (round(opened.width * ratio), round(opened.height * ratio)))
        img = ImageOps.exif_transpose(opened)
        img.load()
    img = to_rgb(img)
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _decode_or_reason(path: Path, max_side: int | None, cache_dir: Path | None = None) -> np.ndarray | str:
    try:
        if cache_dir is not None:
            return load_rgb_cached(path, max_side, cache_dir)
        return load_rgb(path, max_side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises all of these for truncated, corrupt or unsupported files.
        return f"{type(exc).__name__}: {exc}"


DECODE_CACHE_VERSION = 1  # bump when load_rgb's output for the same file changes


def load_rgb_cached(path: Path, max_side: int | None, cache_dir: Path) -> np.ndarray:
    """:func:`load_rgb`, kept as a raw ``.npy`` under ``cache_dir`` after the first decode.

    Decoding and shrinking the 43 offline photos takes 17-31 s at every start of a run on the 2-core CPU
    dev machine; reading them back takes well under a second. The key covers the resolved path, its size
    and mtime, ``max_side`` and the cache version, so a changed photo is decoded again. Entries are written
    to a temporary name and renamed (never half-written) and read without pickle.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    raw = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{max_side}|{DECODE_CACHE_VERSION}"
    entry = Path(cache_dir) / f"{hashlib.sha256(raw.encode()).hexdigest()[:32]}.npy"
    if entry.is_file():
        with contextlib.suppress(OSError, ValueError):  # a damaged entry is decoded again
            cached = np.load(entry, allow_pickle=False)
            if cached.dtype == np.uint8 and cached.ndim == 3 and cached.shape[2] == 3:
                return cached
    image = load_rgb(resolved, max_side)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, image, allow_pickle=False)
    os.replace(tmp, entry)
    return image


def bicubic_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H/s, W/s, 3) uint8 with PIL's antialiased bicubic (the paper's degradation)."""
    h, w = hr.shape[:2]
    small = Image.fromarray(hr).resize((w // scale, h // scale), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    # np.array copies: arrays that view PIL buffers are read-only, and torch wants writable memory.
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random (lr, hr) training pairs from a folder (or list) of photos; an unbounded, seeded stream.

    ``dataset[i]`` returns ``lr`` (3, crop/s, crop/s) and ``hr`` (3, crop, crop), float32 in [-1, 1]. Index
    ``i`` fixes everything random about the sample, so any index is reproducible on its own (no iterator
    state). The dataset has no length: drive it with :class:`StepBatchSampler`. With ``cache_dir`` decoded
    photos are kept there (:func:`load_rgb_cached`); the arrays, hence the samples, are the same.
    """

    def __init__(
        self,
        source: Path | Sequence[Path],
        crop: int,
        scale: int,
        *,
        seed: int = 0,
        max_side: int | None = None,
        flips: bool = True,
        decode_threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if crop <= 0 or scale <= 0 or crop % scale:
            raise DataError(f"crop {crop} must be a positive multiple of the scale {scale}")
        if max_side is not None and max_side < crop:
            raise DataError(f"max_side {max_side} is smaller than the crop {crop}")
        self.crop, self.scale, self.seed, self.flips = crop, scale, seed, flips
        files = list_image_files(source)
        threads = decode_threads or min(8, os.cpu_count() or 1)
        # PIL releases the GIL while decoding, so threads overlap the decode of several large photos.
        with ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(lambda p: _decode_or_reason(p, max_side, cache_dir), files))
        self.paths: list[Path] = []
        self.images: list[np.ndarray] = []
        self.skipped: list[SkippedImage] = []
        for path, result in zip(files, decoded, strict=True):
            if isinstance(result, str):
                self.skipped.append(SkippedImage(path, result))
            elif min(result.shape[:2]) < crop:
                self.skipped.append(
                    SkippedImage(
                        path, f"{result.shape[1]}x{result.shape[0]} is smaller than the {crop}x{crop} crop"
                    )
                )
            else:
                self.paths.append(path)
                self.images.append(result)
        self._report(source, len(files))

    def _report(self, source: Path | Sequence[Path], total: int) -> None:
        where = source if isinstance(source, str | os.PathLike) else f"{total} given files"
        if self.skipped:
            shown = "; ".join(f"{s.path.name} ({s.reason})" for s in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            warnings.warn(
                f"skipped {len(self.skipped)} of {total} image file(s) in {where}: {shown}{more}",
                stacklevel=3,
            )
        if not self.images:
            raise DataError(
                f"no usable training image in {where} ({total} image file(s) found, "
                f"{len(self.skipped)} skipped)"
            )

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def fingerprint(self) -> list[str]:
        """Names and sizes of the images in use; the data order depends on them, so resume compares it."""
        return [
            f"{p.name}:{img.shape[1]}x{img.shape[0]}" for p, img in zip(self.paths, self.images, strict=True)
        ]

    def hr_crop(self, index: int) -> np.ndarray:
        """The (crop, crop, 3) uint8 HR crop of sample ``index``: image, place, flips from (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        img = self.images[int(rng.integers(len(self.images)))]
        y = int(rng.integers(img.shape[0] - self.crop + 1))
        x = int(rng.integers(img.shape[1] - self.crop + 1))
        patch = img[y : y + self.crop, x : x + self.crop]
        hflip, vflip = rng.random(2) < 0.5
        if self.flips and hflip:
            patch = patch[:, ::-1]
        if self.flips and vflip:
            patch = patch[::-1]
        return np.ascontiguousarray(patch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr = self.hr_crop(index)
        return to_tensor(bicubic_downsample(hr, self.scale)), to_tensor(hr)


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Sample indices of optimizer steps ``start_step .. end_step - 1`` for one data-parallel rank.

    Step ``k`` uses global indices ``k * batch .. (k + 1) * batch - 1``; rank ``r`` of ``world_size`` takes
    the ``r``-th contiguous slice of ``batch / world_size``. The global batch of a step is thus the same for
    any world size and any resume point.
    """

    def __init__(
        self, batch: int, start_step: int, end_step: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch % world_size:
            raise DataError(f"batch {batch} is not divisible by the {world_size} data-parallel processes")
        self.batch, self.start_step, self.end_step = batch, start_step, end_step
        self.per_rank = batch // world_size
        self.rank = rank

    def indices(self, step: int) -> list[int]:
        first = step * self.batch + self.rank * self.per_rank
        return list(range(first, first + self.per_rank))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)
