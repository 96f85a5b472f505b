"""A tiny random-weight checkpoint and its exported bundle, built once per test session.

Shared by test_export.py, test_parity.py and test_end_to_end.py: exporting costs tens of seconds on the
CPU, so the first test that asks builds under pytest's session base temp dir and later ones reuse it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from esrdf.config import preset

TILE = 8  # LR tile the bundle is exported (and parity-measured) at: 32 x 32 HR for the 4x tiny preset
BATCH = 2


def make_tiny_checkpoint(path: Path, with_unet: bool = True) -> Path:
    """The ``tiny`` preset with seeded random weights, saved as a checkpoint with raw and EMA U-Nets.

    The predictor's head is re-initialised (the model zero-initialises it, which would make the coarse
    image plain bicubic) and its BatchNorm statistics moved off the identity, so every branch of the
    predictor graph carries signal. The EMA U-Net differs from the raw one, so tests can tell which
    weights export used.
    """
    from esrdf.checkpoint import save_checkpoint
    from esrdf.models import build_predictor, build_unet

    torch.manual_seed(0)
    cfg = preset("tiny")
    predictor = build_predictor(cfg)
    nn.init.normal_(predictor.final_conv.weight, std=0.02)
    bn = predictor.bsconv.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)  # type: ignore[union-attr]
        bn.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    unet = build_unet(cfg) if with_unet else None
    unet_ema = build_unet(cfg) if with_unet else None
    return save_checkpoint(path, cfg, predictor.eval(), unet, unet_ema)


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
