"""Real-image inputs for parity measured by the runtime itself (on first use, on this machine).

A reduced-precision engine (OpenVINO bf16, ``esrdf.engines.openvino_parity``) is judged on what a user
gives it: LR tiles cut from the photo shipped with the package (``esrdf/default_model/sample/``), not on
random arrays, whose statistics differ from images' (a bar met on noise says little about photos).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esrdf.runtime.images import load_image, to_model_range

SAMPLE_PHOTO = "chelsea.png"


def sample_photo_path() -> Path:
    from esrdf.default_model import default_bundle_dir  # standard library only: no torch

    return default_bundle_dir().parent / "sample" / SAMPLE_PHOTO


def sample_photo() -> np.ndarray:
    """The shipped sample photo as (3, H, W) float32 in [-1, 1]."""
    return to_model_range(load_image(sample_photo_path()))


def photo_tiles(tile: int, count: int) -> np.ndarray:
    """``count`` distinct ``tile`` x ``tile`` LR tiles of the photo, (count, 3, tile, tile), [-1, 1].

    Taken along the photo's diagonal, so they cover different content (fur, background, eyes); a tile
    larger than the photo is reflect-padded up.
    """
    photo = sample_photo()
    _c, h, w = photo.shape
    if tile > min(h, w):
        pad = tile - min(h, w)
        photo = np.pad(photo, ((0, 0), (0, pad), (0, pad)), mode="reflect")
        _c, h, w = photo.shape
    starts = np.linspace(0.0, 1.0, count) if count > 1 else np.array([0.5])
    tiles = [photo[:, int(f * (h - tile)) :][:, :tile, int(f * (w - tile)) :][:, :, :tile] for f in starts]
    return np.ascontiguousarray(np.stack(tiles), dtype=np.float32)
