"""Forward-process noise schedules (ESRDF paper Section 3, Eq. 1-3), computed once in float64.

The forward process noises the residual r_0 = hr - P(lr) (Eq. 1-2)::

    q(r_t | r_{t-1}) = N(sqrt(1 - beta_t) r_{t-1}, beta_t I)
    q(r_t | r_0)     = N(sqrt(alpha_bar_t) r_0, (1 - alpha_bar_t) I)      (Eq. 3)
    alpha_bar_t      = prod_{s<=t} (1 - beta_s)

Every quantity the samplers need is one named float64 array over the timestep indices 0..T-1 (the layout of
improved-diffusion's ``GaussianDiffusion``). ``alphas_cumprod`` is the defining array: the bundle manifest and
the C++ runtime carry only it, and :func:`make_schedule` itself builds every schedule through
:meth:`Schedule.from_alphas_cumprod`, so a schedule rebuilt from a bundle equals the eager one bit for bit.
(The price: ``betas`` are recovered as ``1 - alpha_bar_t / alpha_bar_{t-1}``, which for the paper's
beta_0 = 1e-6 differs from the nominal value in the 11th significant digit through float64 cancellation.)

The paper's schedule does not reach noise. Linear betas 1e-6..1e-2 over T=200 give
alpha_bar_{T-1} = 0.36660918337993165, i.e. r_T still holds sqrt(0.3666) = 0.605 of the residual's amplitude
(SNR 0.58), yet sampling starts from N(0, I). For N(mu, 0.5^2) data, ancestral DDPM with the exact eps then
returns mean 0.874 mu (computed in tests/test_samplers.py; 0.965 mu at std 0.25). The paper preset keeps this
faithfully. Two remedies exist:

* ``ScheduleConfig.zero_terminal_snr=True`` rescales sqrt(alpha_bar) so the last value is exactly 0
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1);
* more timesteps (``ScheduleConfig.timesteps``, e.g. 1000 with the same beta range ends at
  alpha_bar = 6.6e-3), sampled with the DDIM sub-sequence of ``esrdf.diffusion.samplers``, which is the
  sampling-time respacing, so no separate ``respaced`` schedule is provided.

At zero terminal SNR alpha_bar_{T-1} == 0 is stored exactly, so ``sqrt_recip_alphas_cumprod[-1]`` and
``sqrt_recipm1_alphas_cumprod[-1]`` are +inf: an eps-prediction says nothing about r_0 at SNR 0. The samplers
never multiply by them; at that one step they take the x0 estimate to be 0, the prior mean of the residual
(see ``samplers.predict_x0``), which keeps every update finite and affine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from esrdf.config import ScheduleConfig

# Nichol & Dhariwal (2021) clip betas at 0.999 so the last cosine step is not a division by ~0.
COSINE_MAX_BETA = 0.999


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float64)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Schedule:
    """All per-timestep quantities of one noise schedule: float64, read-only, safe to share across threads.

    Index t runs over 0..T-1; ``alphas_cumprod_prev[0]`` is 1.0 (the clean residual).
    Build with :func:`make_schedule` or :meth:`from_alphas_cumprod`.
    """

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    # 1/sqrt(alpha_bar_t) and sqrt(1/alpha_bar_t - 1): r_0 = a * x_t - b * eps; +inf where alpha_bar_t == 0.
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)   (Ho et al. 2020, Eq. 6-7)
    posterior_variance: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def timesteps(self) -> int:
        """T, the number of diffusion steps (indices 0..T-1)."""
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray) -> Schedule:
        """Derive every quantity from alpha_bar alone: what the bundle manifest and the runtime carry.

        ``alphas_cumprod`` must be 1-D, finite, strictly decreasing, below 1 at index 0, and positive except
        possibly at the last index (zero terminal SNR).
        """
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        _check_alphas_cumprod(ac)
        ac_prev = np.append(1.0, ac[:-1])
        alphas = ac / ac_prev
        betas = 1.0 - alphas
        # Only alpha_bar_{T-1} may be 0 (checked above); its reciprocals are +inf by design.
        with np.errstate(divide="ignore"):
            sqrt_recip = np.sqrt(1.0 / ac)
            sqrt_recipm1 = np.sqrt(1.0 / ac - 1.0)
        one_minus_ac = 1.0 - ac  # > 0 everywhere because alpha_bar_0 < 1
        return cls(
            betas=_readonly(betas),
            alphas=_readonly(alphas),
            alphas_cumprod=_readonly(ac),
            alphas_cumprod_prev=_readonly(ac_prev),
            sqrt_alphas_cumprod=_readonly(np.sqrt(ac)),
            sqrt_one_minus_alphas_cumprod=_readonly(np.sqrt(one_minus_ac)),
            sqrt_recip_alphas_cumprod=_readonly(sqrt_recip),
            sqrt_recipm1_alphas_cumprod=_readonly(sqrt_recipm1),
            posterior_variance=_readonly(betas * (1.0 - ac_prev) / one_minus_ac),
            posterior_mean_coef1=_readonly(betas * np.sqrt(ac_prev) / one_minus_ac),
            posterior_mean_coef2=_readonly((1.0 - ac_prev) * np.sqrt(alphas) / one_minus_ac),
        )


def _check_alphas_cumprod(ac: np.ndarray) -> None:
    if ac.ndim != 1 or ac.shape[0] < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {ac.shape}")
    if not np.all(np.isfinite(ac)):
        raise ValueError("alphas_cumprod must be finite")
    if not (ac[0] < 1.0):
        raise ValueError(f"alphas_cumprod[0] must be < 1 (beta_0 > 0), got {ac[0]!r}")
    if np.any(ac[:-1] <= 0.0) or ac[-1] < 0.0:
        raise ValueError("alphas_cumprod must be > 0 everywhere but the last index, which may be exactly 0")
    if np.any(np.diff(ac) >= 0.0):
        bad = int(np.argmax(np.diff(ac) >= 0.0)) + 1
        raise ValueError(f"alphas_cumprod must be strictly decreasing; index {bad} is not")


def linear_alphas_cumprod(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """alpha_bar for betas linearly spaced from beta_start to beta_end (paper Eq. 3: 1e-6..1e-2, T=200)."""
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (2021), Eq. 17, with betas clipped at 0.999.

    f(u) = cos((u + s) / (1 + s) * pi / 2)^2, alpha_bar(u) = f(u) / f(0) at u = (t + 1) / T.
    """
    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], COSINE_MAX_BETA)
    return np.cumprod(1.0 - betas)


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so that its last value is exactly 0 and its first is kept.

    Lin et al. (2024), Algorithm 1. The map is linear in sqrt(alpha_bar), so the schedule stays strictly
    decreasing.
    """
    sqrt_ac = np.sqrt(np.asarray(alphas_cumprod, dtype=np.float64))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    rescaled = (sqrt_ac - last) * (first / (first - last))
    return rescaled**2


def make_schedule(cfg: ScheduleConfig) -> Schedule:
    """The schedule described by ``cfg`` (``kind`` linear or cosine, optionally at zero terminal SNR)."""
    if cfg.timesteps < 1:
        raise ValueError(f"schedule.timesteps must be >= 1, got {cfg.timesteps}")
    if cfg.kind == "linear":
        if not 0.0 < cfg.beta_start <= cfg.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {cfg.beta_start}, {cfg.beta_end}")
        ac = linear_alphas_cumprod(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    elif cfg.kind == "cosine":
        ac = cosine_alphas_cumprod(cfg.timesteps, cfg.cosine_s)
    else:
        raise ValueError(f"unknown schedule kind {cfg.kind!r}; expected 'linear' or 'cosine'")
    if cfg.zero_terminal_snr:
        ac = rescale_zero_terminal_snr(ac)
    return Schedule.from_alphas_cumprod(ac)
