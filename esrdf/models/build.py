"""Build the two networks of a ``ModelConfig`` and count their parameters."""

from __future__ import annotations

from torch import nn

from esrdf.config import ModelConfig
from esrdf.models.predictor import Predictor
from esrdf.models.unet import UNet


def build_predictor(cfg: ModelConfig) -> Predictor:
    """The main-path CNN P of ``cfg`` (paper Section 4.2), freshly initialised."""
    return Predictor(cfg.predictor)


def build_unet(cfg: ModelConfig) -> UNet:
    """The residual denoiser eps_theta of ``cfg`` (paper Section 3, Eq. 5-7), freshly initialised."""
    return UNet(cfg.unet)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (trainable or not); works on meta-device modules too."""
    return sum(p.numel() for p in module.parameters())
