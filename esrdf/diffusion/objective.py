"""The residual-diffusion training objective (ESRDF paper Section 3, Eq. 3 and 5-6).

The U-Net learns eps_theta(concat[c, r_t], t) on noised residuals r_t = sqrt(alpha_bar_t) r_0 +
sqrt(1 - alpha_bar_t) eps, where r_0 = hr - P(lr) and c = P(lr). The paper trains with an L1 loss on eps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esrdf.config import Prediction
from esrdf.diffusion.parameterisation import training_target
from esrdf.diffusion.schedule import Schedule


def _gather(values: np.ndarray, t_idx: Tensor, like: Tensor) -> Tensor:
    """values[t] per batch element, as a (B, 1, 1, 1) tensor of ``like``'s dtype (looked up in float64)."""
    table = torch.tensor(values, dtype=torch.float64, device=t_idx.device)  # copies the read-only array
    picked = table[t_idx].to(dtype=like.dtype, device=like.device)
    return picked.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: Schedule, r0: Tensor, t_idx: Tensor, noise: Tensor) -> Tensor:
    """Sample q(r_t | r_0) = N(sqrt(alpha_bar_t) r_0, (1 - alpha_bar_t) I) (paper Eq. 3), one t per element.

    ``t_idx`` is an integer tensor [B] of indices 0..T-1.
    """
    if t_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"t_idx must be an integer index tensor, got {t_idx.dtype}")
    return (
        _gather(schedule.sqrt_alphas_cumprod, t_idx, r0) * r0
        + _gather(schedule.sqrt_one_minus_alphas_cumprod, t_idx, r0) * noise
    )


def diffusion_loss(
    unet: nn.Module | Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    residual: Tensor,
    cond: Tensor,
    loss: Literal["l1", "l2"] = "l1",
    generator: torch.Generator | None = None,
    prediction: Prediction = "eps",
) -> Tensor:
    """The eps-prediction loss (paper Eq. 6): ||eps - eps_theta(concat[cond, r_t], t)||, t ~ U{0..T-1}.

    With ``prediction`` "v" or "x0" the U-Net's target is v or r_0 instead
    (``esrdf.diffusion.parameterisation``); t and eps are drawn the same way.

    L1 as in the paper, or L2 (squared error). Both are means over all elements; the authors' code sums
    (``nn.L1Loss(reduction='sum')``), which only rescales the gradient, and AdamW is invariant to that scale
    apart from its eps. The U-Net receives t as the float32 index, as in the authors' code. t and eps are
    drawn from ``generator`` (on its own device) when given, then moved to the residual's device.
    """
    batch = residual.shape[0]
    draw_device = generator.device if generator is not None else residual.device
    t_idx = torch.randint(0, schedule.timesteps, (batch,), generator=generator, device=draw_device)
    noise = torch.randn(residual.shape, generator=generator, dtype=residual.dtype, device=draw_device)
    t_idx, noise = t_idx.to(residual.device), noise.to(residual.device)
    r_t = q_sample(schedule, residual, t_idx, noise)
    sqrt_ab = _gather(schedule.sqrt_alphas_cumprod, t_idx, residual)
    sqrt_one_minus_ab = _gather(schedule.sqrt_one_minus_alphas_cumprod, t_idx, residual)
    target = training_target(prediction, residual, noise, sqrt_ab, sqrt_one_minus_ab)
    output = unet(torch.cat([cond, r_t], dim=1), t_idx.to(torch.float32))
    if loss == "l1":
        return F.l1_loss(output, target)
    if loss == "l2":
        return F.mse_loss(output, target)
    raise ValueError(f"unknown diffusion loss {loss!r}; expected 'l1' or 'l2'")
