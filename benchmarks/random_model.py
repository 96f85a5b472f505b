"""Seeded random-weight models for benchmarks and tests: latency and parity do not depend on trained weights.

Two parts of a freshly built predictor would leave branches of its graph without signal: the model
zero-initialises its head (so that before training the coarse image is plain bicubic), and its stem's
BatchNorm starts at the identity statistics. Both are moved off those values here, so a benchmark or a
parity test exercises the whole graph. The U-Net keeps its own initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from esrdf.checkpoint import save_checkpoint
from esrdf.config import ModelConfig
from esrdf.models.build import build_predictor, build_unet

HEAD_STD = 0.02


def random_models(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(predictor, unet) of ``cfg`` in eval mode, drawn from torch's global RNG seeded with ``seed``."""
    torch.manual_seed(seed)
    predictor = build_predictor(cfg)
    nn.init.normal_(predictor.final_conv.weight, std=HEAD_STD)
    bn = predictor.bsconv.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)  # type: ignore[union-attr]
        bn.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    return predictor.eval(), build_unet(cfg).eval()


def random_checkpoint(path: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """``random_models(cfg, seed)`` saved as a checkpoint directory at ``path``."""
    return save_checkpoint(path, cfg, *random_models(cfg, seed))
