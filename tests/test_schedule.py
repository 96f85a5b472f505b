"""Noise schedules and the forward process (paper Section 3, Eq. 1-3 and 6): golden values, no network.

Golden values are derived independently of the code under test: with math.prod / math.cos in pure Python
or from closed forms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import pytest
import torch

from esrdf.config import ScheduleConfig, preset
from esrdf.diffusion.objective import diffusion_loss, q_sample
from esrdf.diffusion.schedule import Schedule, make_schedule

PAPER = preset("paper").schedule
SCHEDULE_CONFIGS = {
    "paper": PAPER,
    "paper_zero_snr": dataclasses.replace(PAPER, zero_terminal_snr=True),
    "cosine": ScheduleConfig(kind="cosine", timesteps=1000),
    "cosine_zero_snr": ScheduleConfig(kind="cosine", timesteps=50, zero_terminal_snr=True),
}
ARRAY_FIELDS = [f.name for f in dataclasses.fields(Schedule)]


def _paper_betas() -> list[float]:
    """The paper's betas in pure Python: linear 1e-6..1e-2 over T=200."""
    T = 200
    return [1e-6 + i * (1e-2 - 1e-6) / (T - 1) for i in range(T)]


def _cosine_f(u: float, s: float = 0.008) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def test_paper_preset_golden_values() -> None:
    sched = make_schedule(PAPER)
    assert sched.timesteps == 200
    assert all(getattr(sched, name).shape == (200,) for name in ARRAY_FIELDS)
    # betas are recovered from alphas_cumprod, exact to ~3e-11 relative (float64 cancellation at 1 - 1e-6).
    assert sched.betas[0] == pytest.approx(1e-6, rel=1e-9)
    assert sched.betas[-1] == pytest.approx(1e-2, rel=1e-12)
    expected_last = math.prod(1.0 - b for b in _paper_betas())
    assert sched.alphas_cumprod[-1] == pytest.approx(expected_last, rel=1e-13)
    assert sched.alphas_cumprod[-1] == pytest.approx(0.366609, abs=1e-6)
    mid = math.prod(1.0 - b for b in _paper_betas()[:100])
    assert sched.alphas_cumprod[99] == pytest.approx(mid, rel=1e-13)
    assert sched.alphas_cumprod_prev[0] == 1.0
    assert sched.posterior_variance[0] == 0.0  # the last reverse step adds no noise


def test_paper_preset_ends_far_from_noise_and_remedies_reach_it() -> None:
    """docs/DESIGN.md section 6: x_T of the paper schedule still holds 60% of the residual's amplitude."""
    paper = make_schedule(PAPER)
    assert paper.sqrt_alphas_cumprod[-1] == pytest.approx(0.6054826, abs=1e-7)
    more_t = make_schedule(dataclasses.replace(PAPER, timesteps=1000))
    betas_1000 = [1e-6 + i * (1e-2 - 1e-6) / 999 for i in range(1000)]
    assert more_t.alphas_cumprod[-1] == pytest.approx(math.prod(1.0 - b for b in betas_1000), rel=1e-12)
    assert more_t.alphas_cumprod[-1] < 7e-3
    assert make_schedule(SCHEDULE_CONFIGS["paper_zero_snr"]).alphas_cumprod[-1] == 0.0


def test_posterior_coefficients_match_closed_forms() -> None:
    """coef1/coef2/variance against Ho et al. (2020) Eq. 7 and 11, written in another form."""
    sched = make_schedule(PAPER)
    ac, ac_prev, betas = sched.alphas_cumprod, sched.alphas_cumprod_prev, sched.betas
    t = np.arange(1, sched.timesteps)
    np.testing.assert_allclose(
        sched.posterior_variance[t], 1.0 / (1.0 / (1.0 - ac_prev[t]) + (1.0 - betas[t]) / betas[t]), rtol=1e-9
    )
    # Posterior mean from (x0, eps) equals the eps-form mean 1/sqrt(alpha) (x_t - beta/sqrt(1-ab) eps).
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, sched.timesteps))
    x_t = np.sqrt(ac) * x0 + np.sqrt(1.0 - ac) * eps
    mean = sched.posterior_mean_coef1 * x0 + sched.posterior_mean_coef2 * x_t
    eps_form = (x_t - betas / np.sqrt(1.0 - ac) * eps) / np.sqrt(1.0 - betas)
    np.testing.assert_allclose(mean, eps_form, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        sched.sqrt_recip_alphas_cumprod * x_t - sched.sqrt_recipm1_alphas_cumprod * eps, x0, atol=1e-12
    )


def test_cosine_schedule_endpoints() -> None:
    sched = make_schedule(SCHEDULE_CONFIGS["cosine"])
    T = 1000
    assert sched.alphas_cumprod[0] == pytest.approx(_cosine_f(1 / T) / _cosine_f(0.0), rel=1e-12)
    assert sched.alphas_cumprod[499] == pytest.approx(_cosine_f(0.5) / _cosine_f(0.0), rel=1e-11)
    # cos(pi/2)^2 ~ 0, so the last beta is the clip value of Nichol & Dhariwal.
    assert sched.betas[-1] == pytest.approx(0.999, rel=1e-12)
    assert sched.alphas_cumprod[-1] == pytest.approx(sched.alphas_cumprod[-2] * 0.001, rel=1e-9)
    assert sched.betas[-2] < 0.999


@pytest.mark.parametrize("name", ["paper_zero_snr", "cosine_zero_snr"])
def test_zero_terminal_snr_rescale(name: str) -> None:
    cfg = SCHEDULE_CONFIGS[name]
    plain = make_schedule(dataclasses.replace(cfg, zero_terminal_snr=False))
    sched = make_schedule(cfg)
    assert sched.alphas_cumprod[-1] == 0.0
    assert sched.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-14)
    assert np.all(np.diff(sched.alphas_cumprod) < 0)
    # Lin et al. (2024) Algorithm 1 at one interior index, from the un-rescaled values.
    first, last, mid = (math.sqrt(plain.alphas_cumprod[i]) for i in (0, -1, cfg.timesteps // 2))
    expected_mid = ((mid - last) * first / (first - last)) ** 2
    assert sched.alphas_cumprod[cfg.timesteps // 2] == pytest.approx(expected_mid, rel=1e-12)
    # SNR 0 is handled explicitly: the reciprocals are inf, every posterior quantity stays finite.
    assert np.isinf(sched.sqrt_recip_alphas_cumprod[-1]) and np.isinf(sched.sqrt_recipm1_alphas_cumprod[-1])
    assert np.all(np.isfinite(sched.sqrt_recip_alphas_cumprod[:-1]))
    for field in ("betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert np.all(np.isfinite(getattr(sched, field))), field
    assert sched.betas[-1] == 1.0
    assert sched.posterior_mean_coef2[-1] == 0.0  # x_T carries nothing about x_0
    assert sched.posterior_variance[-1] == pytest.approx(1.0 - sched.alphas_cumprod[-2], rel=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULE_CONFIGS))
def test_from_alphas_cumprod_round_trip_is_exact(name: str) -> None:
    """The bundle carries only alphas_cumprod; rebuilding from it reproduces every array bit for bit."""
    sched = make_schedule(SCHEDULE_CONFIGS[name])
    shipped = np.array(sched.alphas_cumprod.tolist())  # as a JSON list would bring it back
    rebuilt = Schedule.from_alphas_cumprod(shipped)
    for field in ARRAY_FIELDS:
        a, b = getattr(sched, field), getattr(rebuilt, field)
        assert a.dtype == np.float64 and np.array_equal(a, b), field


def test_schedule_arrays_are_read_only() -> None:
    sched = make_schedule(PAPER)
    with pytest.raises(ValueError, match="read-only"):
        sched.betas[0] = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.betas = np.zeros(200)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.9, 0.95, 0.5], "strictly decreasing; index 1"),
        ([1.0, 0.9], r"alphas_cumprod\[0\] must be < 1"),
        ([0.9, 0.0, 0.0], "> 0 everywhere but the last"),
        ([0.9, float("nan")], "finite"),
        ([[0.9, 0.8]], "1-D"),
    ],
)
def test_from_alphas_cumprod_rejects_invalid(values: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule.from_alphas_cumprod(np.array(values))


def test_make_schedule_rejects_bad_betas() -> None:
    with pytest.raises(ValueError, match="beta_start"):
        make_schedule(dataclasses.replace(PAPER, beta_start=0.02, beta_end=0.01))


# ---- forward process and training objective (Eq. 3, Eq. 6) -------------------------------------------


def _photo_batch(photo: np.ndarray, size: int = 32) -> torch.Tensor:
    """Three real crops of a uint8 HxWx3 photo as a (3, 3, size, size) float32 tensor in [-1, 1]."""
    crops = [photo[y : y + size, x : x + size] for y, x in ((100, 180), (300, 300), (20, 400))]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_q_sample_matches_eq3_per_element(astronaut: np.ndarray) -> None:
    sched = make_schedule(PAPER)
    r0 = _photo_batch(astronaut) * 0.2  # residual-sized values
    noise = torch.randn(r0.shape, generator=torch.Generator().manual_seed(3))
    t_idx = torch.tensor([0, 100, 199])
    r_t = q_sample(sched, r0, t_idx, noise)
    assert r_t.dtype == torch.float32
    for b, t in enumerate(t_idx.tolist()):
        ab = math.prod(1.0 - beta for beta in _paper_betas()[: t + 1])
        expected = math.sqrt(ab) * r0[b].double() + math.sqrt(1.0 - ab) * noise[b].double()
        torch.testing.assert_close(r_t[b].double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="integer"):
        q_sample(sched, r0, t_idx.float(), noise)


class OracleDenoiser(torch.nn.Module):
    """The exact eps for a known residual r0: eps = (r_t - sqrt(ab_t) r0) / sqrt(1 - ab_t).

    Also checks the U-Net contract: input concat[cond, r_t], t a float32 [B] index.
    """

    def __init__(self, sched: Schedule, r0: torch.Tensor, cond: torch.Tensor) -> None:
        super().__init__()
        self.ab = torch.tensor(sched.alphas_cumprod)
        self.r0, self.cond = r0, cond
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        assert torch.equal(t, t.round())
        self.seen_t.append(t)
        cond, r_t = x[:, :3], x[:, 3:]
        torch.testing.assert_close(cond, self.cond)
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1)
        return ((r_t.double() - ab.sqrt() * self.r0.double()) / (1 - ab).sqrt()).float()


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_diffusion_loss_oracle_is_near_zero_and_blind_model_is_analytic(
    astronaut: np.ndarray, loss: Literal["l1", "l2"]
) -> None:
    sched = make_schedule(PAPER)
    cond = _photo_batch(astronaut, size=64)
    r0 = (_photo_batch(astronaut[::-1], size=64) - cond) * 0.25  # a real image difference as the residual
    oracle = OracleDenoiser(sched, r0, cond)
    gen = torch.Generator().manual_seed(0)
    # Not 0: float32 rounding of r_t is amplified by 1/sqrt(1 - ab_0) = 1e3 where t = 0 is drawn.
    assert diffusion_loss(oracle, sched, r0, cond, loss=loss, generator=gen).item() < 1e-5

    def blind(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, 3:])

    # Predicting 0 leaves E|z| = sqrt(2/pi) (L1) or E z^2 = 1 (L2) over 36,864 N(0,1) draws.
    value = diffusion_loss(blind, sched, r0, cond, loss=loss, generator=gen).item()
    expected, tol = (math.sqrt(2 / math.pi), 0.015) if loss == "l1" else (1.0, 0.04)
    assert value == pytest.approx(expected, abs=tol)


def test_diffusion_loss_draws_t_uniformly_and_reproducibly(astronaut: np.ndarray) -> None:
    sched = make_schedule(PAPER)
    cond = _photo_batch(astronaut, size=8).repeat(200, 1, 1, 1)  # 600 draws of t
    r0 = cond * 0.1
    oracle = OracleDenoiser(sched, r0, cond)
    first = diffusion_loss(oracle, sched, r0, cond, generator=torch.Generator().manual_seed(5))
    again = diffusion_loss(oracle, sched, r0, cond, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    t = oracle.seen_t[0]
    assert t.min() >= 0 and t.max() <= 199
    assert (t < 100).float().mean().item() == pytest.approx(0.5, abs=0.08)
    assert len(torch.unique(t)) > 100
    with pytest.raises(ValueError, match="unknown diffusion loss"):
        diffusion_loss(oracle, sched, r0, cond, loss="huber")  # type: ignore[arg-type]


def test_diffusion_loss_trains_a_conv(astronaut: np.ndarray) -> None:
    """Gradients reach the network: a few AdamW steps on a 1x1 conv lower the L1 loss."""
    sched = make_schedule(PAPER)
    cond = _photo_batch(astronaut, size=32)
    r0 = (_photo_batch(astronaut[:, ::-1], size=32) - cond) * 0.25
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 3, 1)

    def unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return conv(x)

    opt = torch.optim.AdamW(conv.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        loss = diffusion_loss(unet, sched, r0, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
