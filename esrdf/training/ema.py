"""Exponential moving average of the U-Net weights (the weights export and inference use).

Not ``torch.optim.swa_utils.AveragedModel``: that has no start step (the authors copy the weights until
step 5000, ``config/sr_ddpm_32_128.json``), and its state dict nests keys under ``module.`` while a
checkpoint stores ``unet_ema.*`` with exactly the U-Net's own keys.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta after each optimizer step past ``start_step``;
    until then theta_ema is a copy of theta. Buffers and integer tensors are copied, never averaged.

    The step is passed in by the caller rather than counted here, so a resumed run needs no EMA state
    beyond the averaged weights themselves.
    """

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0) -> None:
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.start_step = start_step

    @torch.no_grad()
    def update(self, source: nn.Module, step: int) -> None:
        """Fold ``source``'s weights in after optimizer step ``step`` (1-based: steps completed)."""
        params = dict(source.named_parameters())
        src_state = source.state_dict()
        for name, ema_tensor in self.module.state_dict().items():
            new = src_state[name]
            if step <= self.start_step or name not in params or not ema_tensor.is_floating_point():
                ema_tensor.copy_(new)
            else:
                ema_tensor.lerp_(new.to(ema_tensor.dtype), 1.0 - self.decay)
