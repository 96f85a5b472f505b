"""DDPM and DDIM samplers (paper Section 3, Eq. 4-7) with analytic eps-functions, on real photos, no network.

Two data distributions have an exact eps = E[eps | x_t]:
- a point mass at x0*: eps = (x_t - sqrt(ab_t) x0*) / sqrt(1 - ab_t); every sampler must return x0* exactly;
- a Gaussian N(mu, s^2) per pixel: eps = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t); samples
  must have the mean and variance that an independent moment recursion predicts.
Both depend on ``cond`` (x0* = cond, mu = cond / 2), so the conditioning path is exercised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esrdf.config import ScheduleConfig, preset
from esrdf.diffusion.samplers import (
    EpsFn,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    prior_std,
    sample_residual_sr,
    unet_eps_fn,
)
from esrdf.diffusion.schedule import Schedule, make_schedule

PAPER = preset("paper").schedule
SCHEDULES = {
    "paper": PAPER,
    "paper_zero_snr": dataclasses.replace(PAPER, zero_terminal_snr=True),
    "cosine": ScheduleConfig(kind="cosine", timesteps=100),
}
GAUSS_STD = 0.5
RESIDUAL_STD = 0.05  # about the std of a trained predictor's residual on photos


def _crops(photos: list[np.ndarray], size: int) -> torch.Tensor:
    """Centre crops of uint8 HxWx3 photos as a (B, 3, size, size) float32 tensor in [-1, 1]."""
    out = []
    for img in photos:
        y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out.append(img[y : y + size, x : x + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def faces(astronaut: np.ndarray) -> torch.Tensor:
    """Two 32x32 regions of the astronaut photo (face, flag), (2, 3, 32, 32) in [-1, 1]."""
    return _crops([astronaut[60:160, 150:250], astronaut[0:100, 400:500]], 32)


@pytest.fixture(scope="module")
def photo_batch(eval_photos: dict[str, np.ndarray]) -> torch.Tensor:
    """One 64x64 centre crop of each held-out photo: (8, 3, 64, 64), about 98k pixels."""
    return _crops([eval_photos[k] for k in sorted(eval_photos)], 64)


def _ab_of(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.float32 and t.dim() == 1 and torch.equal(t, t.round())
    return torch.tensor(schedule.alphas_cumprod)[t.long()].reshape(-1, 1, 1, 1)


def point_mass_eps(schedule: Schedule) -> EpsFn:
    """Exact eps when the data is a point mass at x0* = cond."""

    def eps_fn(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _ab_of(schedule, t)
        return ((x_t - ab.sqrt().float() * cond) / (1 - ab).sqrt().float()).to(x_t.dtype)

    return eps_fn


def gaussian_eps(schedule: Schedule, std: float = GAUSS_STD) -> EpsFn:
    """Exact eps when each pixel of the data is N(mu = cond / 2, std^2)."""

    def eps_fn(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _ab_of(schedule, t)
        scale = ((1 - ab).sqrt() / (ab * std**2 + 1 - ab)).float()
        return scale * (x_t - ab.sqrt().float() * cond / 2)

    return eps_fn


def gaussian_moments(
    schedule: Schedule,
    std: float = GAUSS_STD,
    x_T_std: float = 1.0,
    steps: int | None = None,
    eta: float = 1.0,
) -> tuple[float, float]:
    """Exact (gain on mu, output std) of DDIM (eta; all T steps by default) from x_T ~ N(0, x_T_std^2),
    with the Gaussian eps; eta = 1 over all steps is ancestral DDPM.

    Derived independently of the sampler code: each update is x_prev = A x + B mu + sigma z, so
    x = K x_T + M mu + N(0, V) throughout.
    """
    k, m, v = 1.0, 0.0, 0.0
    ac = schedule.alphas_cumprod
    ts = (
        list(range(schedule.timesteps - 1, -1, -1))
        if steps is None
        else ddim_timesteps(len(ac), steps).tolist()
    )
    for i, t in enumerate(ts):
        ab, ab_prev = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        c = math.sqrt(1 - ab) / (ab * std**2 + 1 - ab)  # eps = c (x - sqrt(ab) mu)
        # x0_hat = g x + h mu; the sampler's convention at SNR 0 is x0_hat = 0.
        g, h = ((1 - math.sqrt(1 - ab) * c) / math.sqrt(ab), math.sqrt(1 - ab) * c) if ab > 0 else (0.0, 0.0)
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        direction = math.sqrt(max(0.0, 1 - ab_prev - sigma2))
        a_x = math.sqrt(ab_prev) * g + direction * c
        b_mu = math.sqrt(ab_prev) * h - direction * c * math.sqrt(ab)
        k, m, v = a_x * k, a_x * m + b_mu, a_x**2 * v + sigma2
    return m, math.sqrt((k * x_T_std) ** 2 + v)


def gaussian_ddpm_moments(schedule: Schedule, std: float = GAUSS_STD) -> tuple[float, float]:
    """(gain on mu, output std) of ancestral sampling from x_T ~ N(0, 1): :func:`gaussian_moments`."""
    return gaussian_moments(schedule, std)


def _noises(count: int, like: torch.Tensor, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(like.shape, generator=gen) for _ in range(count)]


def _x_T(like: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


# ---- timestep rule ------------------------------------------------------------------------------------


def test_ddim_timesteps_golden() -> None:
    assert ddim_timesteps(200, 10).tolist() == [199, 177, 155, 133, 111, 88, 66, 44, 22, 0]
    assert ddim_timesteps(200, 3).tolist() == [199, 100, 0]  # 99.5 rounds half to even
    assert ddim_timesteps(200, 1).tolist() == [199]
    assert ddim_timesteps(200, 200).tolist() == list(range(199, -1, -1))
    assert ddim_timesteps(200, 10).dtype == np.int64
    for bad in (0, 201):
        with pytest.raises(ValueError, match=r"DDIM steps must be in 1\.\.200"):
            ddim_timesteps(200, bad)


# ---- point mass: every sampler must land on x0* ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ddpm_returns_point_mass(faces: torch.Tensor, name: str) -> None:
    sched = make_schedule(SCHEDULES[name])
    out = ddpm_sample(
        point_mass_eps(sched), sched, _x_T(faces), faces, generator=torch.Generator().manual_seed(0)
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, faces, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize(("steps", "eta"), [(7, 0.0), (50, 0.0), (None, 0.0), (20, 0.5), (20, 1.0)])
def test_ddim_returns_point_mass(faces: torch.Tensor, name: str, steps: int | None, eta: float) -> None:
    sched = make_schedule(SCHEDULES[name])
    n = sched.timesteps if steps is None else steps
    out = ddim_sample(
        point_mass_eps(sched),
        sched,
        _x_T(faces) * 3,
        faces,
        n,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, faces, atol=1e-5, rtol=0)


def test_single_ddim_step(faces: torch.Tensor) -> None:
    """One step from T-1 jumps straight to x0_hat: exact for the paper schedule (SNR 0.58 at T-1), and the
    prior mean 0 at zero terminal SNR, where eps says nothing about x_0 (the documented convention)."""
    paper = make_schedule(PAPER)
    out = ddim_sample(point_mass_eps(paper), paper, _x_T(faces), faces, 1)
    torch.testing.assert_close(out, faces, atol=1e-5, rtol=0)
    zero_snr = make_schedule(SCHEDULES["paper_zero_snr"])
    out = ddim_sample(point_mass_eps(zero_snr), zero_snr, _x_T(faces), faces, 1, eta=0.5)
    assert torch.equal(out, torch.zeros_like(faces))


def test_last_ddpm_step_adds_no_noise(faces: torch.Tensor) -> None:
    sched = make_schedule(PAPER)
    assert sched.posterior_variance[0] == 0.0
    eps_fn = gaussian_eps(sched)
    noises = _noises(200, faces, seed=1)
    out = ddpm_sample(eps_fn, sched, _x_T(faces), faces, noises=noises)
    last_changed = ddpm_sample(eps_fn, sched, _x_T(faces), faces, noises=noises[:-1] + [noises[-1] * 5 + 1])
    first_changed = ddpm_sample(eps_fn, sched, _x_T(faces), faces, noises=[noises[0] * -1] + noises[1:])
    assert torch.equal(out, last_changed)
    assert not torch.allclose(out, first_changed, atol=1e-3)


def test_zero_snr_first_step_uses_x0_estimate_zero(faces: torch.Tensor) -> None:
    """At alpha_bar = 0 the x0 estimate is 0, so DDPM's first update is sqrt(1 - ab_{T-2}) * noise[0]."""
    sched = make_schedule(SCHEDULES["paper_zero_snr"])
    seen: list[torch.Tensor] = []
    base = point_mass_eps(sched)

    def recording(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x_t)
        return base(x_t, cond, t)

    noises = _noises(200, faces, seed=2)
    ddpm_sample(recording, sched, _x_T(faces), faces, noises=noises)
    expected = math.sqrt(1.0 - sched.alphas_cumprod[-2]) * noises[0]
    torch.testing.assert_close(seen[1], expected, atol=1e-6, rtol=0)


# ---- Gaussian data: the distribution of the samples -------------------------------------------------


def test_gaussian_moment_recursion_shows_the_paper_schedule_trap() -> None:
    """Starting the paper schedule (alpha_bar_T = 0.367) at N(0, I) shrinks the mean by 13% (data std 0.5)."""
    gain_paper, std_paper = gaussian_ddpm_moments(make_schedule(PAPER))
    gain_zero, std_zero = gaussian_ddpm_moments(make_schedule(SCHEDULES["paper_zero_snr"]))
    assert gain_paper == pytest.approx(0.8737, abs=1e-3)
    assert gain_zero == pytest.approx(1.0, abs=1e-3)
    # Finite-T ancestral sampling with the exact eps slightly under-disperses in both cases.
    assert std_paper / GAUSS_STD == pytest.approx(1.0, abs=0.03)
    assert std_zero / GAUSS_STD == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("name", ["paper", "paper_zero_snr"])
def test_ddpm_samples_gaussian_with_predicted_moments(photo_batch: torch.Tensor, name: str) -> None:
    sched = make_schedule(SCHEDULES[name])
    gain, std = gaussian_ddpm_moments(sched)
    out = ddpm_sample(
        gaussian_eps(sched),
        sched,
        _x_T(photo_batch),
        photo_batch,
        generator=torch.Generator().manual_seed(11),
    )
    mu = (photo_batch / 2).double().flatten()
    x = out.double().flatten()
    slope = torch.cov(torch.stack([x, mu]))[0, 1] / mu.var()
    spread = (x - slope * mu).std()
    assert slope.item() == pytest.approx(gain, abs=0.025)  # 4 standard errors; the paper's gain is 0.874
    assert spread.item() == pytest.approx(std, rel=0.02)


def test_ddpm_equals_ddim_eta_one_over_all_steps(faces: torch.Tensor) -> None:
    sched = make_schedule(PAPER)
    eps_fn = gaussian_eps(sched)
    noises = _noises(200, faces, seed=3)
    ddpm = ddpm_sample(eps_fn, sched, _x_T(faces), faces, noises=noises)
    ddim = ddim_sample(eps_fn, sched, _x_T(faces), faces, 200, eta=1.0, noises=noises)
    torch.testing.assert_close(ddpm, ddim, atol=1e-5, rtol=0)
    ddim_det = ddim_sample(eps_fn, sched, _x_T(faces), faces, 200, eta=0.0, noises=noises)
    assert not torch.allclose(ddpm, ddim_det, atol=1e-2)  # eta matters


# ---- noise injection ----------------------------------------------------------------------------------


def test_injected_noise_is_deterministic_and_matches_generator_order(faces: torch.Tensor) -> None:
    sched = make_schedule(PAPER)
    eps_fn = gaussian_eps(sched)
    x_T = _x_T(faces)
    cases: list[tuple[Callable[..., torch.Tensor], int, dict]] = [
        (ddpm_sample, 200, {}),
        (ddim_sample, 10, {"steps": 10, "eta": 0.7}),
    ]
    for sampler, count, kwargs in cases:
        noises = _noises(count, faces, seed=9)
        first = sampler(eps_fn, sched, x_T, faces, noises=noises, **kwargs)
        again = sampler(eps_fn, sched, x_T, faces, noises=[n.clone() for n in noises], **kwargs)
        drawn = sampler(eps_fn, sched, x_T, faces, generator=torch.Generator().manual_seed(9), **kwargs)
        assert torch.equal(first, again) and torch.equal(first, drawn)
        other = sampler(eps_fn, sched, x_T, faces, noises=_noises(count, faces, seed=10), **kwargs)
        assert not torch.allclose(first, other, atol=1e-3)


def test_noise_count_and_shape_are_validated(faces: torch.Tensor) -> None:
    sched = make_schedule(PAPER)
    eps_fn = point_mass_eps(sched)
    with pytest.raises(ValueError, match="noises has 199 tensors but this run makes 200 updates"):
        ddpm_sample(eps_fn, sched, faces, faces, noises=_noises(199, faces, 0))
    with pytest.raises(ValueError, match="noises has 10 tensors but this run makes 3 updates"):
        ddim_sample(eps_fn, sched, faces, faces, 3, eta=0.5, noises=_noises(10, faces, 0))
    bad = _noises(3, faces, 0)
    bad[1] = bad[1][:, :, :16]
    with pytest.raises(ValueError, match=r"noises\[1\] has shape \(2, 3, 16, 32\)"):
        ddim_sample(eps_fn, sched, faces, faces, 3, noises=bad)
    with pytest.raises(ValueError, match="eta must be in"):
        ddim_sample(eps_fn, sched, faces, faces, 3, eta=1.5)


def test_eps_fn_sees_the_timestep_indices_in_order(faces: torch.Tensor) -> None:
    sched = make_schedule(PAPER)
    seen_t: list[list[float]] = []
    progress: list[tuple[int, int]] = []
    base = point_mass_eps(sched)

    def recording(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen_t.append(t.tolist())
        return base(x_t, cond, t)

    ddim_sample(recording, sched, faces, faces, 10, progress=lambda i, n: progress.append((i, n)))
    assert seen_t == [[float(t)] * 2 for t in ddim_timesteps(200, 10)]
    assert progress == [(i, 10) for i in range(1, 11)]


# ---- residual SR end to end (Eq. 7) -----------------------------------------------------------------


class ResidualOracle(torch.nn.Module):
    """A U-Net-shaped exact denoiser for the residual r0 = hr - cond, called as unet(concat[cond, x_t], t)."""

    def __init__(self, schedule: Schedule, hr: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.hr = schedule, hr

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, x_t = x[:, :3], x[:, 3:]
        return point_mass_eps(self.schedule)(x_t, self.hr - cond, t)


class GaussianResidualUNet(torch.nn.Module):
    """A U-Net-shaped exact denoiser for residuals that are N(cond / 2, std^2) per pixel."""

    def __init__(self, schedule: Schedule, std: float = GAUSS_STD) -> None:
        super().__init__()
        self.eps_fn = gaussian_eps(schedule, std)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps_fn(x[:, 3:], x[:, :3], t)


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddim", 8, 0.0), ("ddim", 25, 0.5), ("ddpm", None, 0.0)]
)
def test_sample_residual_sr_recovers_hr(
    faces: torch.Tensor, sampler: str, steps: int | None, eta: float
) -> None:
    sched = make_schedule(PAPER)
    hr = faces
    lr = F.avg_pool2d(hr, 4)
    predictor = torch.nn.Upsample(scale_factor=4, mode="bicubic", align_corners=False)
    coarse, out = sample_residual_sr(
        predictor,
        ResidualOracle(sched, hr),
        sched,
        lr,
        sampler=sampler,  # type: ignore[arg-type]
        steps=steps,
        eta=eta,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(coarse, predictor(lr))
    assert (coarse - hr).abs().mean() > 0.02  # the residual is real work for the sampler
    torch.testing.assert_close(out, hr, atol=2e-5, rtol=0)


def test_sample_residual_sr_rejects_bad_arguments(faces: torch.Tensor) -> None:
    sched = make_schedule(PAPER)
    predictor = torch.nn.Upsample(scale_factor=4, mode="bicubic", align_corners=False)
    lr = F.avg_pool2d(faces, 4)
    with pytest.raises(ValueError, match="DDPM runs all 200 steps"):
        sample_residual_sr(predictor, ResidualOracle(sched, faces), sched, lr, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_residual_sr(predictor, ResidualOracle(sched, faces), sched, lr, sampler="euler")  # type: ignore[arg-type]


def test_unet_eps_fn_feeds_cond_first_to_the_real_unet(faces: torch.Tensor) -> None:
    unet_module = pytest.importorskip("esrdf.models.unet")
    torch.manual_seed(0)
    unet = unet_module.UNet(preset("tiny").unet).eval()
    x_t = _x_T(faces)
    t = torch.full((2,), 57.0)
    with torch.no_grad():
        eps = unet_eps_fn(unet)(x_t, faces, t)
        torch.testing.assert_close(eps, unet(torch.cat([faces, x_t], 1), t), atol=0, rtol=0)
        assert not torch.allclose(eps, unet(torch.cat([x_t, faces], 1), t), atol=1e-4)


# ---- the x_T prior ------------------------------------------------------------------------------------


def test_prior_std_golden() -> None:
    sched = make_schedule(PAPER)
    assert prior_std(sched, "paper") == 1.0
    # sqrt(1 - 0.36660918337993165): the marginal std of r_T that training sees for a zero-mean residual.
    assert prior_std(sched, "matched") == pytest.approx(0.7958585, abs=1e-7)
    assert prior_std(make_schedule(SCHEDULES["paper_zero_snr"]), "matched") == 1.0  # the priors agree there
    with pytest.raises(ValueError, match="unknown prior"):
        prior_std(sched, "uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddim", 9, 0.0), ("ddim", 6, 0.6), ("ddpm", None, 1.0)]
)
def test_matched_prior_is_paper_prior_with_field_zero_scaled(
    faces: torch.Tensor, sampler: str, steps: int | None, eta: float
) -> None:
    """The injected-noise contract the runtime shares: only noise field 0 (x_T) changes, by prior_std."""
    sched = make_schedule(PAPER)
    hr = faces
    lr = F.avg_pool2d(hr, 4)
    predictor = torch.nn.Upsample(scale_factor=4, mode="bicubic", align_corners=False)
    unet = GaussianResidualUNet(sched)
    x_T = _x_T(hr)
    noises = _noises(sched.timesteps if steps is None else steps, hr, seed=5)
    common = {"sampler": sampler, "steps": steps, "eta": eta, "noises": noises}
    _, matched = sample_residual_sr(predictor, unet, sched, lr, x_T=x_T, prior="matched", **common)  # type: ignore[arg-type]
    scaled = x_T * prior_std(sched, "matched")
    _, paper = sample_residual_sr(predictor, unet, sched, lr, x_T=scaled, prior="paper", **common)  # type: ignore[arg-type]
    torch.testing.assert_close(matched, paper, atol=0, rtol=0)
    _, unscaled = sample_residual_sr(predictor, unet, sched, lr, x_T=x_T, **common)  # type: ignore[arg-type]
    assert (unscaled - matched).abs().mean() > 1e-3  # the default is the paper's N(0, I), and it matters


def test_matched_prior_gives_deterministic_ddim_the_data_spread(photo_batch: torch.Tensor) -> None:
    """Residual-like data (std 0.05) on the paper schedule, DDIM eta 0 over all T steps (the probability-flow
    ODE), exact eps: from N(0, I) the samples are ~1.2x too spread (the leftover x_T noise); from the matched
    prior they have about the data's std. The moment recursion predicts both and the samples match it. (With
    fewer steps the discretised ODE under-disperses whatever the prior: 0.033 at 20 steps from matched.)"""
    sched = make_schedule(PAPER)
    hr = photo_batch
    lr = F.avg_pool2d(hr, 4)
    predictor = torch.nn.Upsample(scale_factor=4, mode="bicubic", align_corners=False)
    unet = GaussianResidualUNet(sched, std=RESIDUAL_STD)
    spreads = {}
    for prior in ("paper", "matched"):
        _, expected = gaussian_moments(sched, RESIDUAL_STD, prior_std(sched, prior), steps=200, eta=0.0)
        coarse, out = sample_residual_sr(predictor, unet, sched, lr, steps=200, eta=0.0, prior=prior,
                                         generator=torch.Generator().manual_seed(11))  # fmt: skip
        mu = coarse.double().flatten() / 2  # the residual data is N(cond / 2, std^2) per pixel
        x = (out - coarse).double().flatten()
        spread = (x - mu).std().item()
        assert spread == pytest.approx(expected, rel=0.02)
        spreads[prior] = spread
    assert spreads["matched"] == pytest.approx(RESIDUAL_STD, rel=0.05)
    assert spreads["paper"] / RESIDUAL_STD == pytest.approx(1.21, abs=0.03)
