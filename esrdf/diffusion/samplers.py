"""Reverse-process samplers for the residual (ESRDF paper Section 3, Eq. 4-7), as pure functions.

Each sampler is a free function of (eps_fn, schedule, x_T, cond, noise source) and keeps no state on any
object, so one model can serve concurrent requests (k-diffusion's ``sampling.py`` shape). The U-Net
predicts eps (Eq. 5-6); the output image is coarse + sampled residual (Eq. 7, Fig. 1).

The updates are written in textbook form: estimate x_0 from eps, then take the DDPM posterior mean or the
DDIM direction. ``esrdf.runtime`` re-derives the same steps independently as affine coefficients of
(x_t, eps, noise) from ``alphas_cumprod`` alone; a parity test compares the two, which is why no code is
shared with it.

Conventions every implementation follows (the runtime included):

* x_T is passed separately; ``noises[i]`` is used at the i-th update, i = 0 being the highest t. A step whose
  sigma is 0 (the last one) still consumes its noise tensor, times 0. Without ``noises`` the same tensors are
  drawn from ``generator`` in that order, one ``torch.randn`` of x_T's shape per update.
* No clipping of the x_0 estimate: every update stays affine, so it fits the exported step graph.
* Arithmetic runs in the input tensors' dtype (float32); coefficients come from the float64 schedule as
  Python floats.
* At zero terminal SNR (alpha_bar_t == 0) an eps prediction carries no information about x_0, and
  1/sqrt(alpha_bar_t) is infinite. There the x_0 estimate is taken to be 0, the prior mean of the residual
  (the limit of E[x_0 | x_t] as SNR -> 0 for zero-mean residuals). The update there is still affine and
  finite: DDPM gives x_prev = sqrt(posterior_variance) z, DDIM gives
  x_prev = sqrt(1 - ab_prev - sigma^2) eps + sigma z.
  Clamping alpha_bar_{T-1} to a tiny positive value instead would multiply the model's eps error reaching
  x_{T-2} by sqrt(alphas_cumprod[T-2] / clamp): 31.7 for the rescaled paper schedule at a clamp of 2**-24,
  7.7e3 at 1e-12 (computed from the schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from esrdf.config import PRIORS, Prediction, Prior
from esrdf.diffusion.parameterisation import output_to_eps
from esrdf.diffusion.schedule import Schedule

# eps_fn(x_t, cond, t) -> eps, with t a float32 tensor [B] holding the timestep index.
EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# progress(done, total), called after each update.
ProgressFn = Callable[[int, int], None]


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """The descending index sub-sequence of a ``steps``-step DDIM run over a T-step schedule.

    The one rule shared by eager and runtime samplers: rounded ``linspace(T-1, 0, steps)``, de-duplicated.
    The update after the last index (always 0) goes to alpha_bar_prev = 1.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in 1..{timesteps} (the schedule's T), got {steps}")
    picked = np.unique(np.linspace(timesteps - 1, 0, steps).round().astype(np.int64))[::-1]
    return np.ascontiguousarray(picked)


def prior_std(schedule: Schedule, prior: Prior) -> float:
    """The std of x_T under ``prior``: 1 for "paper", sqrt(1 - alpha_bar_{T-1}) for "matched"."""
    if prior == "paper":
        return 1.0
    if prior == "matched":
        return float(schedule.sqrt_one_minus_alphas_cumprod[-1])
    raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")


def unet_eps_fn(
    unet: nn.Module | Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule | None = None,
    prediction: Prediction = "eps",
) -> EpsFn:
    """Adapt a conditional U-Net called as ``unet(concat[cond, x_t], t)`` (paper Eq. 5) to an eps_fn.

    A U-Net that predicts v or x0 has its output converted to eps (``parameterisation.output_to_eps``) in
    float32 with the coefficients of ``schedule`` at t, as the exported step graph does.
    """
    if prediction != "eps" and schedule is None:
        raise ValueError(f"a {prediction!r}-predicting U-Net needs the schedule to convert its output to eps")

    def eps_fn(x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        output = unet(torch.cat([cond, x_t], dim=1), t)
        if prediction == "eps":
            return output
        assert schedule is not None
        index = t.long().cpu().numpy()
        shape = (-1, *([1] * (x_t.dim() - 1)))
        sqrt_ab, sqrt_1m = (
            torch.from_numpy(table[index]).to(torch.float32).to(x_t.device).reshape(shape)
            for table in (schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)
        )
        return output_to_eps(prediction, output.float(), x_t.float(), sqrt_ab, sqrt_1m).to(x_t.dtype)

    return eps_fn


def predict_x0(schedule: Schedule, x_t: Tensor, eps: Tensor, t: int) -> Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), inverting paper Eq. 3.

    Returns 0 (the residual's prior mean) at alpha_bar_t == 0, where eps determines nothing about x_0.
    """
    if schedule.alphas_cumprod[t] == 0.0:
        return torch.zeros_like(x_t)
    return (
        float(schedule.sqrt_recip_alphas_cumprod[t]) * x_t
        - float(schedule.sqrt_recipm1_alphas_cumprod[t]) * eps
    )


def _noise_source(
    noises: Sequence[Tensor] | None, count: int, like: Tensor, generator: torch.Generator | None
) -> Callable[[int], Tensor]:
    """noise(i) for update i: the injected tensor, or a fresh draw from ``generator`` in update order."""
    if noises is None:
        return lambda _i: _randn_like(like, generator)
    if len(noises) != count:
        raise ValueError(
            f"noises has {len(noises)} tensors but this run makes {count} updates (one per step)"
        )
    for i, noise in enumerate(noises):
        if tuple(noise.shape) != tuple(like.shape):
            raise ValueError(
                f"noises[{i}] has shape {tuple(noise.shape)}, expected x_T's {tuple(like.shape)}"
            )
    return lambda i: noises[i]


def _randn_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) of ``like``'s shape, drawn on the generator's device (so a CPU generator gives the same
    noise to CPU and CUDA runs), then moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def _t_batch(t: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), float(t), dtype=torch.float32, device=like.device)


def ddpm_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: Tensor,
    cond: Tensor,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Ancestral DDPM sampling over all T indices, T-1 down to 0 (paper Eq. 4-6; Ho et al. 2020, Alg. 2).

    x_{t-1} = coef1_t * x0_hat + coef2_t * x_t + sqrt(posterior_variance_t) * z, with x0_hat from eps. The
    posterior variance at t = 0 is exactly 0, so the last update adds no noise.
    """
    count = schedule.timesteps
    noise = _noise_source(noises, count, x_T, generator)
    x = x_T
    with torch.no_grad():
        for i, t in enumerate(range(count - 1, -1, -1)):
            eps = eps_fn(x, cond, _t_batch(t, x))
            x0_hat = predict_x0(schedule, x, eps, t)
            mean = (
                float(schedule.posterior_mean_coef1[t]) * x0_hat + float(schedule.posterior_mean_coef2[t]) * x
            )
            x = mean + float(np.sqrt(schedule.posterior_variance[t])) * noise(i)
            if progress is not None:
                progress(i + 1, count)
    return x


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) of Song et al. (2021), Eq. 16: eta = 1 gives DDPM's posterior std, eta = 0 none."""
    return float(
        eta * np.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    )


def ddim_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: Tensor,
    cond: Tensor,
    steps: int,
    eta: float = 0.0,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> Tensor:
    """DDIM over the :func:`ddim_timesteps` sub-sequence (Song et al. 2021, Eq. 12), ``eta`` in [0, 1].

    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z. With eta = 1
    and all T steps this is the DDPM ancestral sampler.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = ddim_timesteps(schedule.timesteps, steps)
    noise = _noise_source(noises, len(ts), x_T, generator)
    x = x_T
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            alpha_bar = float(schedule.alphas_cumprod[t])
            alpha_bar_prev = float(schedule.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
            # max(0, .) only absorbs float64 rounding at eta = 1, where the radicand is 0 up to an ulp.
            direction = float(np.sqrt(max(0.0, 1.0 - alpha_bar_prev - sigma**2)))
            eps = eps_fn(x, cond, _t_batch(t, x))
            x0_hat = predict_x0(schedule, x, eps, t)
            x = float(np.sqrt(alpha_bar_prev)) * x0_hat + direction * eps + sigma * noise(i)
            if progress is not None:
                progress(i + 1, len(ts))
    return x


def sample_residual_sr(
    predictor: nn.Module | Callable[[Tensor], Tensor],
    unet: nn.Module | Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    lr: Tensor,
    sampler: Literal["ddim", "ddpm"] = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    x_T: Tensor | None = None,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    prior: Prior = "paper",
    prediction: Prediction = "eps",
) -> tuple[Tensor, Tensor]:
    """Residual-diffusion super-resolution (paper Eq. 7, Fig. 1): returns (coarse, coarse + sampled residual).

    coarse = predictor(lr); the residual is sampled conditioned on coarse, starting from
    ``prior_std(schedule, prior) * x_T``. ``x_T`` is the unit-variance noise field 0 (drawn from
    ``generator`` before any step noise when not given), so the runtime's injected fields mean the same here.
    The default prior is the paper's N(0, I); "matched" is what the toolkit's defaults use. ``steps``
    defaults to T; DDPM always runs all T. The output is not clipped: callers clamp to [-1, 1] for images.
    ``prediction`` is what the U-Net outputs (``ModelConfig.unet.prediction``).
    """
    std = prior_std(schedule, prior)  # checks ``prior`` before the predictor runs
    with torch.no_grad():
        coarse = predictor(lr)
    if x_T is None:
        x_T = _randn_like(coarse, generator)
    if std != 1.0:
        x_T = x_T * std
    eps_fn = unet_eps_fn(unet, schedule, prediction)
    if sampler == "ddpm":
        if steps not in (None, schedule.timesteps):
            raise ValueError(
                f"DDPM runs all {schedule.timesteps} steps; got steps={steps} (use sampler='ddim')"
            )
        residual = ddpm_sample(eps_fn, schedule, x_T, coarse, noises=noises, generator=generator)
    elif sampler == "ddim":
        n = schedule.timesteps if steps is None else steps
        residual = ddim_sample(eps_fn, schedule, x_T, coarse, n, eta=eta, noises=noises, generator=generator)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddim' or 'ddpm'")
    return coarse, coarse + residual
