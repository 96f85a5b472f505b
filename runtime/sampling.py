"""Per-step coefficients of the reverse process, in the affine form the step graph computes.

The exported step graph (``esrdf.runtime.graph_spec``) evaluates, in fp32,

    x_prev = c_xt * x_t + c_eps * eps_theta(concat[c, x_t], t) + c_noise * z,

so choosing the sampler and the number of steps is choosing these three numbers per step. This module
derives them from the bundle's ``alphas_cumprod`` (paper Eq. 1-3: alpha_bar_t = prod_{s<=t} (1 - beta_s))
in float64 and casts to float32 at the end. It is written independently of ``esrdf.diffusion`` (the eager
sampler); the tests check both against textbook formulas.

DDIM (Song et al. 2021, Eq. 12), the deterministic-to-ancestral family with ``eta`` in [0, 1]:
    x0_hat  = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    x_prev  = sqrt(ab_p) x0_hat + sqrt(1 - ab_p - sigma^2) eps + sigma z
    sigma   = eta sqrt((1 - ab_p) / (1 - ab_t)) sqrt(1 - ab_t / ab_p)
which is affine in (x_t, eps, z) with
    c_xt = sqrt(ab_p / ab_t),  c_noise = sigma,
    c_eps = sqrt(1 - ab_p - sigma^2) - sqrt(ab_p) sqrt((1 - ab_t) / ab_t).

DDPM ancestral (paper Eq. 6-7; Ho et al. 2020 Alg. 2 with the posterior variance), over all T indices:
    alpha_t = ab_t / ab_p,  beta_t = 1 - alpha_t
    x_prev  = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sqrt(beta_tilde_t) z,
    beta_tilde_t = beta_t (1 - ab_p) / (1 - ab_t)     (0 at t = 0, where ab_p = 1)

Timesteps follow the project rule: DDIM uses
``np.unique(np.linspace(T-1, 0, steps).round().astype(np.int64))[::-1]``; the step after the last index uses
ab_p = 1. No x0 clipping anywhere: the update must stay affine to fit the graph.

Zero terminal SNR (alpha_bar_{T-1} == 0, e.g. ``ScheduleConfig.zero_terminal_snr``): there x_t is pure
noise, an eps prediction says nothing about x0, and 1/sqrt(ab_t) is infinite. At that step we take
x0_hat = 0, the residual's prior mean (the SNR -> 0 limit of E[x0 | x_t]), exactly as the eager sampler
(``esrdf.diffusion.samplers.predict_x0``) does, so injected-noise parity holds there too. The step stays
affine and finite: DDIM gives (0, sqrt(1 - ab_p - sigma^2), sigma), DDPM gives (0, 0, sqrt(1 - ab_p)).
We do not clamp alpha_bar to a tiny positive value instead: that multiplies the network's eps error by
sqrt(ab_p / clamp), up to 2**12 = 4096 for a 2**-24 clamp. Only the last index may be 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esrdf.config import PRIORS, SAMPLERS, ResolvedSampling


@dataclass(frozen=True)
class StepPlan:
    """What the driver feeds the step graph: one row per engine call, highest t first.

    ``t`` holds the integer timestep index as float32 (the U-Net embeds the index, not the noise level);
    ``coefs[k] = (c_xt, c_eps, c_noise)``. Arrays are read-only so a plan can be shared across threads.
    """

    sampler: str
    eta: float
    timesteps: np.ndarray  # int64[N]
    t: np.ndarray  # float32[N]
    coefs: np.ndarray  # float32[N, 3]
    # std of x_T: noise field 0 is multiplied by it where x_T is made (1.0: x_T ~ N(0, I), the paper's start;
    # ``init_noise_std`` below gives it for a prior)
    init_noise_std: float = 1.0
    prior: str = "paper"  # the prior init_noise_std is of (``esrdf.config.Prior``), for eager comparisons

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """Descending int64 indices of the DDIM sub-sequence (the project's one rule, shared with eager)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps} (the schedule's T), got {steps}")
    return np.unique(np.linspace(num_timesteps - 1, 0, steps).round().astype(np.int64))[::-1].copy()


def _alpha_bars(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ab_t, ab_p) per step in float64; ab_p = 1 after the last step."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    return ab[timesteps], np.append(ab[timesteps[1:]], 1.0)


def _x0_from_eps(ab_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with x0_hat = a x_t - b eps (inverting paper Eq. 3); (0, 0) where ab_t == 0 (see above)."""
    safe = np.where(ab_t > 0.0, ab_t, 1.0)
    zero_snr = ab_t == 0.0
    return np.where(zero_snr, 0.0, 1.0 / np.sqrt(safe)), np.where(zero_snr, 0.0, np.sqrt((1.0 - safe) / safe))


def ddim_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray, eta: float) -> np.ndarray:
    """float64 [N, 3] (c_xt, c_eps, c_noise) of DDIM with ``eta`` over descending ``timesteps``."""
    if not 0.0 <= eta <= 1.0:
        # Past 1, 1 - ab_p - sigma^2 goes negative: the DDIM family is only defined up to eta = 1.
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ab_t, ab_p = _alpha_bars(alphas_cumprod, timesteps)
    sigma = eta * np.sqrt((1.0 - ab_p) / (1.0 - ab_t)) * np.sqrt(1.0 - ab_t / ab_p)
    # max(0, .) absorbs float64 rounding where the bracket is exactly 0 (eta = 1 at the final step).
    direction = np.sqrt(np.maximum(1.0 - ab_p - sigma**2, 0.0))
    a, b = _x0_from_eps(ab_t)
    # x_prev = sqrt(ab_p) (a x_t - b eps) + direction eps + sigma z
    return np.stack([np.sqrt(ab_p) * a, direction - np.sqrt(ab_p) * b, sigma], axis=1)


def ddpm_coefficients(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float64 [T, 3] (c_xt, c_eps, c_noise) of DDPM ancestral sampling over t = T-1..0 (paper Eq. 6-7).

    Where ab_t > 0 this is Ho et al.'s x_prev = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + ...;
    at ab_t == 0, x0_hat = 0 and alpha_t = 0 leave only the noise term.
    """
    timesteps = np.arange(len(alphas_cumprod) - 1, -1, -1, dtype=np.int64)
    ab_t, ab_p = _alpha_bars(alphas_cumprod, timesteps)
    alpha_t = ab_t / ab_p
    beta_t = 1.0 - alpha_t
    zero_snr = ab_t == 0.0
    safe_alpha = np.where(zero_snr, 1.0, alpha_t)
    c_xt = np.where(zero_snr, 0.0, 1.0 / np.sqrt(safe_alpha))
    c_eps = np.where(zero_snr, 0.0, -beta_t / (np.sqrt(safe_alpha) * np.sqrt(1.0 - ab_t)))
    posterior_variance = beta_t * (1.0 - ab_p) / (1.0 - ab_t)
    return np.stack([c_xt, c_eps, np.sqrt(np.maximum(posterior_variance, 0.0))], axis=1)


def init_noise_std(alphas_cumprod: np.ndarray, prior: str) -> float:
    """The std of x_T under ``prior`` (``esrdf.config.Prior``): 1 for "paper" (x_T ~ N(0, I)), and
    sqrt(1 - alpha_bar_{T-1}) for "matched", the marginal q(x_T | r_0) of paper Eq. 3 for a zero-mean
    residual, i.e. what training showed the U-Net at t = T-1. Float64, as the eager ``prior_std``."""
    if prior == "paper":
        return 1.0
    if prior == "matched":
        return float(np.sqrt(1.0 - np.asarray(alphas_cumprod, dtype=np.float64)[-1]))
    raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")


def plan_steps(
    alphas_cumprod: np.ndarray,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    prior: str = "paper",
) -> StepPlan:
    """The step plan for ``sampler``: DDIM over ``steps`` indices with ``eta``, or DDPM over all T, starting
    from x_T with the std of ``prior`` (``init_noise_std``). Callers holding a ``ResolvedSampling`` use
    ``plan_for``; the default here is the paper's N(0, I), so a bare plan means what the paper's sampler
    does.

    For ``ddpm``, ``steps`` must be None or T (ancestral sampling does not skip steps).
    """
    x_t_std = init_noise_std(alphas_cumprod, prior)
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    num_timesteps = int(ab.shape[0])
    if ab.ndim != 1 or num_timesteps < 1 or np.any(ab[:-1] <= 0.0) or np.any(ab > 1.0) or ab[-1] < 0.0:
        raise ValueError("alphas_cumprod must be a 1-D array in (0, 1], only its last value may be 0")
    if sampler == "ddim":
        timesteps = ddim_timesteps(num_timesteps, num_timesteps if steps is None else steps)
        coefs = ddim_coefficients(ab, timesteps, eta)
    elif sampler == "ddpm":
        if steps not in (None, num_timesteps):
            raise ValueError(
                f"ddpm samples all T={num_timesteps} steps; got steps={steps} (use ddim to skip)"
            )
        timesteps = np.arange(num_timesteps - 1, -1, -1, dtype=np.int64)
        coefs = ddpm_coefficients(ab)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if not np.all(np.isfinite(coefs)):
        raise ValueError("schedule gives non-finite step coefficients")
    arrays = (timesteps, timesteps.astype(np.float32), coefs.astype(np.float32))
    for a in arrays:
        a.flags.writeable = False
    timesteps, t, coefs = arrays
    return StepPlan(sampler, float(eta), timesteps, t, coefs, init_noise_std=x_t_std, prior=prior)


def plan_for(alphas_cumprod: np.ndarray, sampling: ResolvedSampling) -> StepPlan:
    """The step plan of resolved options (sampler, steps, eta and prior; the seed only picks the noise)."""
    return plan_steps(alphas_cumprod, sampling.sampler, sampling.steps, sampling.eta, sampling.prior)
