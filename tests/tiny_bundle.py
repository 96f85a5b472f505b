"""A tiny random-weight checkpoint and its exported bundle, built once per test session.

Shared by test_export.py, test_parity.py and test_end_to_end.py: exporting costs tens of seconds on the
CPU, so the first test that asks builds under pytest's session base temp dir and later ones reuse it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from esrdf.bench.random_model import random_models
from esrdf.config import preset

TILE = 8  # LR tile the bundle is exported (and parity-measured) at: 32 x 32 HR for the 4x tiny preset
BATCH = 2


def make_tiny_checkpoint(path: Path, with_unet: bool = True) -> Path:
    """The ``tiny`` preset with seeded random weights, saved as a checkpoint with raw and EMA U-Nets.

    The benchmarks' seeded random models (``esrdf.bench.random_model``: predictor head and BatchNorm
    statistics moved off their initial values, so every branch of the predictor graph carries signal),
    plus an EMA U-Net that differs from the raw one, so tests can tell which weights export used.
    """
    from esrdf.checkpoint import save_checkpoint
    from esrdf.models import build_unet

    cfg = preset("tiny")
    predictor, unet = random_models(cfg)
    if not with_unet:
        return save_checkpoint(path, cfg, predictor)
    return save_checkpoint(path, cfg, predictor, unet, build_unet(cfg))


@functools.cache
def tiny_checkpoint(base: Path) -> Path:
    return make_tiny_checkpoint(base / "tiny-ckpt")


@functools.cache
def tiny_bundle(base: Path) -> Path:
    """fp32 + fp16 bundle of ``tiny_checkpoint``, with polygraphy eager I/O files in ``eager_io_dir``."""
    from esrdf.export.bundle_writer import export_bundle

    return export_bundle(
        tiny_checkpoint(base),
        base / "tiny-bundle",
        precision="both",
        tile=TILE,
        batch=BATCH,
        progress=False,
        save_eager_io=eager_io_dir(base),
    )


def eager_io_dir(base: Path) -> Path:
    return base / "tiny-eager-io"
