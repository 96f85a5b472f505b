"""Runtime step coefficients (esrdf.runtime.sampling) and the sampler driver (esrdf.runtime.driver).

Coefficients are checked against textbook float64 formulas written here, against exact recovery of a
point-mass "data set" (a real photo crop) with its analytic eps, and against the eager torch sampler on the
same injected noise. The driver runs over an analytic numpy engine: per-pixel eps functions make the exact
answer known, and make tiled and untiled runs agree pixel for pixel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from esrdf.runtime.bundle import (
    FORMAT_VERSION,
    ExportSettings,
    GraphEntry,
    Manifest,
    ScheduleEntry,
    TensorEntry,
)
from esrdf.runtime.driver import engine_batches, fixed_batches, fixed_shape, upscale_array
from esrdf.runtime.noise import noise_field
from esrdf.runtime.sampling import ddim_coefficients, ddim_timesteps, ddpm_coefficients, plan_steps
from esrdf.runtime.tiling import plan_tiles

# ---------------------------------------------------------------- schedules, built here in float64


def linear_alphas_cumprod(T: int = 200, beta_start: float = 1e-6, beta_end: float = 1e-2) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, T, dtype=np.float64))


def cosine_alphas_cumprod(T: int = 100, s: float = 0.008) -> np.ndarray:
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas)


def zero_snr_alphas_cumprod(T: int = 200) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that the last one is exactly 0."""
    sqrt_ab = np.sqrt(linear_alphas_cumprod(T))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


SCHEDULES = {
    "paper_linear": linear_alphas_cumprod(),
    "cosine": cosine_alphas_cumprod(),
    "zero_terminal_snr": zero_snr_alphas_cumprod(),
}


def test_paper_schedule_ends_far_from_noise() -> None:
    # docs/DESIGN.md section 6: the paper's T=200 linear schedule ends at alpha_bar ~= 0.3666.
    assert SCHEDULES["paper_linear"][-1] == pytest.approx(0.36660918337993165, rel=1e-12)
    assert SCHEDULES["zero_terminal_snr"][-1] == 0.0


def test_ddim_timesteps_golden() -> None:
    assert ddim_timesteps(200, 10).tolist() == [199, 177, 155, 133, 111, 88, 66, 44, 22, 0]
    assert ddim_timesteps(200, 1).tolist() == [199]
    assert ddim_timesteps(200, 200).tolist() == list(range(199, -1, -1))
    with pytest.raises(ValueError, match="steps must be in 1..200"):
        ddim_timesteps(200, 201)


# ---------------------------------------------------------------- textbook formulas (independent)


def textbook_ddim_step(ab: np.ndarray, t: int, t_prev: int | None, eta: float, x_t, eps, z) -> np.ndarray:
    """Song et al. 2021 Eq. 12 in x0 form, float64; x0 = 0 at zero SNR (the eager convention)."""
    ab_t = ab[t]
    ab_p = 1.0 if t_prev is None else ab[t_prev]
    x0 = np.zeros_like(x_t) if ab_t == 0 else (x_t - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
    sigma = eta * np.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
    return np.sqrt(ab_p) * x0 + np.sqrt(max(1 - ab_p - sigma**2, 0.0)) * eps + sigma * z


def textbook_ddpm_step(ab: np.ndarray, t: int, x_t, eps, z) -> np.ndarray:
    """Ho et al. 2020: posterior q(x_{t-1} | x_t, x0) with improved-diffusion's coef1/coef2, float64."""
    ab_t = ab[t]
    ab_p = ab[t - 1] if t > 0 else 1.0
    beta = 1 - ab_t / ab_p
    x0 = np.zeros_like(x_t) if ab_t == 0 else np.sqrt(1 / ab_t) * x_t - np.sqrt(1 / ab_t - 1) * eps
    coef1 = beta * np.sqrt(ab_p) / (1 - ab_t)
    coef2 = (1 - ab_p) * np.sqrt(1 - beta) / (1 - ab_t)
    variance = beta * (1 - ab_p) / (1 - ab_t)
    return coef1 * x0 + coef2 * x_t + np.sqrt(variance) * z


def affine(coefs: np.ndarray, x_t, eps, z):
    return coefs[0] * x_t + coefs[1] * eps + coefs[2] * z


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize(("steps", "eta"), [(10, 0.0), (25, 0.5), (7, 1.0)])
def test_ddim_coefficients_match_textbook(name: str, steps: int, eta: float) -> None:
    ab = SCHEDULES[name]
    rng = np.random.default_rng(0)
    x_t, eps, z = rng.standard_normal((3, 64))
    ts = ddim_timesteps(len(ab), steps)
    coefs = ddim_coefficients(ab, ts, eta)
    for k, t in enumerate(ts.tolist()):
        t_prev = int(ts[k + 1]) if k + 1 < len(ts) else None
        expected = textbook_ddim_step(ab, t, t_prev, eta, x_t, eps, z)
        np.testing.assert_allclose(affine(coefs[k], x_t, eps, z), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ddpm_coefficients_match_textbook(name: str) -> None:
    ab = SCHEDULES[name]
    rng = np.random.default_rng(1)
    x_t, eps, z = rng.standard_normal((3, 64))
    coefs = ddpm_coefficients(ab)
    for k, t in enumerate(range(len(ab) - 1, -1, -1)):
        expected = textbook_ddpm_step(ab, t, x_t, eps, z)
        np.testing.assert_allclose(affine(coefs[k], x_t, eps, z), expected, rtol=1e-9, atol=1e-12)
    assert coefs[-1, 2] == 0.0  # no noise in the last update


def test_ddim_eta1_full_steps_is_ddpm() -> None:
    ab = SCHEDULES["paper_linear"]
    ddim = plan_steps(ab, "ddim", steps=len(ab), eta=1.0).coefs
    ddpm = plan_steps(ab, "ddpm").coefs
    np.testing.assert_allclose(ddim, ddpm, rtol=2e-6, atol=1e-7)


def test_plan_is_float32_readonly_and_validated() -> None:
    plan = plan_steps(SCHEDULES["cosine"], "ddim", steps=20, eta=0.3)
    assert plan.t.dtype == np.float32 and plan.coefs.dtype == np.float32 and plan.coefs.shape == (20, 3)
    assert plan.t.tolist() == [float(t) for t in ddim_timesteps(100, 20)]
    with pytest.raises(ValueError):
        plan.coefs[0, 0] = 1.0
    with pytest.raises(ValueError, match="eta"):
        plan_steps(SCHEDULES["cosine"], "ddim", 20, eta=1.5)
    with pytest.raises(ValueError, match="ddpm samples all"):
        plan_steps(SCHEDULES["cosine"], "ddpm", steps=20)
    with pytest.raises(ValueError, match="unknown sampler"):
        plan_steps(SCHEDULES["cosine"], "euler")


def test_zero_snr_coefficients_are_finite() -> None:
    ab = SCHEDULES["zero_terminal_snr"]
    for plan in (plan_steps(ab, "ddim", 10, 0.0), plan_steps(ab, "ddim", 10, 1.0), plan_steps(ab, "ddpm")):
        assert np.all(np.isfinite(plan.coefs))
        assert plan.coefs[0, 0] == 0.0  # x0_hat = 0 at SNR 0: x_t enters only through eps


# ---------------------------------------------------------------- analytic eps: point-mass recovery


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddim", 8, 0.0), ("ddim", 13, 1.0), ("ddpm", None, 0.0)]
)
def test_point_mass_data_is_recovered_exactly(astronaut, name, sampler, steps, eta) -> None:
    """With data = one image r*, eps(x_t, t) = (x_t - sqrt(ab_t) r*) / sqrt(1 - ab_t) is exact, and every
    sampler must land on r* from any x_T, whatever its noise. Run in float32 like the step graph."""
    ab = SCHEDULES[name]
    target = astronaut[100:132, 180:212].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    plan = plan_steps(ab, sampler, steps, eta)
    x = noise_field(seed=3, step_index=0, y0=0, x0=0, height=32, width=32)
    for k in range(plan.num_steps):
        ab_t = np.float32(ab[int(plan.t[k])])
        eps = (x - np.sqrt(ab_t) * target) / np.sqrt(np.float32(1.0) - ab_t)
        c_xt, c_eps, c_noise = plan.coefs[k]
        x = c_xt * x + c_eps * eps + c_noise * noise_field(3, k + 1, 0, 0, 32, 32)
    np.testing.assert_allclose(x, target, atol=2e-4)


@pytest.mark.parametrize("name", ["paper_linear", "zero_terminal_snr"])
@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddim", 12, 0.0), ("ddim", 12, 0.7), ("ddpm", None, 0.0)]
)
def test_matches_eager_sampler_with_injected_noise(astronaut, name, sampler, steps, eta) -> None:
    """Runtime coefficients applied affinely == esrdf.diffusion's textbook torch sampler, same noise."""
    torch = pytest.importorskip("torch")
    from esrdf.diffusion.samplers import ddim_sample, ddpm_sample
    from esrdf.diffusion.schedule import Schedule

    ab = SCHEDULES[name]
    schedule = Schedule.from_alphas_cumprod(ab)
    cond = astronaut[40:56, 200:216].transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0
    plan = plan_steps(ab, sampler, steps, eta)
    fields = [noise_field(5, k, 0, 0, 16, 16)[None] for k in range(plan.num_steps + 1)]

    # The exact eps of Gaussian data N(mu(cond), s^2) per pixel: a smooth stand-in for the network.
    def gaussian_eps(x, c, ab_t, tanh):
        return np.sqrt(1 - ab_t) * (x - np.sqrt(ab_t) * 0.3 * tanh(c)) / (ab_t * 0.04 + 1 - ab_t)

    def eps_np(x, c, t):
        return gaussian_eps(x, c, np.float32(ab[int(t)]), np.tanh)

    x = fields[0]
    for k in range(plan.num_steps):
        eps = eps_np(x, cond, plan.t[k]).astype(np.float32)
        x = plan.coefs[k, 0] * x + plan.coefs[k, 1] * eps + plan.coefs[k, 2] * fields[k + 1]

    def eps_torch(x_t, c, t):
        return gaussian_eps(x_t, c, float(np.float32(ab[int(t[0])])), torch.tanh)

    noises = [torch.from_numpy(f) for f in fields[1:]]
    x_T, cond_t = torch.from_numpy(fields[0]), torch.from_numpy(cond)
    if sampler == "ddpm":
        eager = ddpm_sample(eps_torch, schedule, x_T, cond_t, noises=noises)
    else:
        eager = ddim_sample(eps_torch, schedule, x_T, cond_t, steps, eta=eta, noises=noises)
    np.testing.assert_allclose(x, eager.numpy(), atol=5e-5)


# ---------------------------------------------------------------- the driver over an analytic engine


def target_residual(coarse: np.ndarray) -> np.ndarray:
    """The analytic engine's "data": a per-pixel function of the condition."""
    return 0.25 * np.sin(3.0 * coarse)


class AnalyticEngine:
    """A numpy engine with an exact eps: point-mass data at r*(cond), or a per-pixel function of x_t.

    The predictor is nearest-neighbour upsampling. Both graphs are per-pixel, like a 1x1 network, which is
    what makes a tiled run equal an untiled one exactly.
    """

    name = "analytic"

    def __init__(self, alphas_cumprod: np.ndarray, scale: int, point_mass: bool = True) -> None:
        self.ab, self.scale, self.point_mass = alphas_cumprod, scale, point_mass
        self.calls = 0

    def upload(self, array):
        return np.array(array, dtype=np.float32)

    def download(self, array):
        return np.asarray(array, dtype=np.float32)

    def predictor(self, lr):
        self.calls += 1
        return lr.repeat(self.scale, axis=2).repeat(self.scale, axis=3)

    def step(self, x_t, cond, t, coefs, noise):
        self.calls += 1
        ab_t = self.ab[t.astype(np.int64)].astype(np.float32)[:, None, None, None]
        if self.point_mass:
            eps = (x_t - np.sqrt(ab_t) * target_residual(cond)) / np.sqrt(1 - ab_t)
        else:
            eps = np.tanh(0.9 * x_t - 0.2 * cond)
        c = coefs[:, :, None, None, None]
        return c[:, 0] * x_t + c[:, 1] * eps + c[:, 2] * noise


def analytic_manifest(ab: np.ndarray, scale: int = 2) -> Manifest:
    schedule = ScheduleEntry(kind="linear", timesteps=len(ab), alphas_cumprod=ab.tolist())
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name="analytic",
        scale=scale,
        channels=3,
        hr_multiple_of=4,
        value_range=[-1.0, 1.0],
        schedule=schedule,
        graphs=[],
        export=ExportSettings(checkpoint="none", tile=16, batch=2),
    )


@pytest.fixture(scope="module")
def photo_lr(astronaut) -> np.ndarray:
    """A 37x53 real-photo crop (odd sizes on purpose) as (3, h, w) in [-1, 1]."""
    return astronaut[60:97, 150:203].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize(("tile", "overlap", "batch"), [(0, 0, 1), (16, 4, 3), (64, 8, 2), (12, 0, 5)])
def test_driver_recovers_point_mass_output(photo_lr, tile, overlap, batch) -> None:
    ab = SCHEDULES["paper_linear"]
    engine, manifest = AnalyticEngine(ab, scale=2), analytic_manifest(ab)
    out = upscale_array(
        engine,
        manifest,
        photo_lr,
        plan_steps(ab, "ddim", 6, 0.5),
        seed=1,
        tile=tile,
        overlap=overlap,
        batch=batch,
    )
    coarse = photo_lr.repeat(2, axis=1).repeat(2, axis=2)
    assert out.shape == (3, 74, 106)
    np.testing.assert_allclose(out, np.clip(coarse + target_residual(coarse), -1, 1), atol=2e-4)


def test_driver_tiled_equals_untiled_and_is_seeded(photo_lr) -> None:
    """With per-pixel graphs, noise cut from one global field makes the tiling invisible."""
    ab = SCHEDULES["paper_linear"]
    engine, manifest = AnalyticEngine(ab, 2, point_mass=False), analytic_manifest(ab)
    plan = plan_steps(ab, "ddim", 5, 1.0)
    calls: list[tuple[int, int]] = []
    tiled = upscale_array(
        engine,
        manifest,
        photo_lr,
        plan,
        seed=7,
        tile=16,
        overlap=6,
        batch=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    untiled = upscale_array(engine, manifest, photo_lr, plan, seed=7, tile=0)
    other_seed = upscale_array(engine, manifest, photo_lr, plan, seed=8, tile=0)
    np.testing.assert_allclose(tiled, untiled, atol=1e-6)
    assert np.abs(other_seed - untiled).mean() > 1e-2  # the noise matters at eta = 1
    n_batches = -(-len(plan_tiles(37, 53, 16, 6, 2).tiles) // 4)
    assert calls[-1] == (n_batches * 6, n_batches * 6) and len(calls) == n_batches * 6


def test_driver_injected_noise_equals_seeded_field(photo_lr) -> None:
    ab = SCHEDULES["cosine"]
    engine, manifest = AnalyticEngine(ab, 2, point_mass=False), analytic_manifest(ab)
    plan = plan_steps(ab, "ddpm")
    tiles = plan_tiles(37, 53, 0, 0, manifest.lr_multiple_of)  # padded canvas 38 x 54 (multiple of 2)
    fields = [
        noise_field(11, k, 0, 0, tiles.padded_height * 2, tiles.padded_width * 2)
        for k in range(plan.num_steps + 1)
    ]
    seeded = upscale_array(engine, manifest, photo_lr, plan, seed=11, tile=16, overlap=4, batch=2)
    injected = upscale_array(engine, manifest, photo_lr, plan, seed=999, tile=0, injected_noise=fields)
    np.testing.assert_allclose(injected, seeded, atol=1e-6)
    with pytest.raises(ValueError, match="injected_noise"):
        upscale_array(engine, manifest, photo_lr, plan, tile=0, injected_noise=fields[:-1])


class FixedBatchEngine(AnalyticEngine):
    """Graphs exported with a static batch of 2: every call must see exactly 2 tiles."""

    def predictor(self, lr):
        assert lr.shape[0] == 2 and lr.shape[2:] == (16, 16)
        return super().predictor(lr)

    def step(self, x_t, cond, t, coefs, noise):
        assert x_t.shape[0] == t.shape[0] == coefs.shape[0] == noise.shape[0] == 2
        return super().step(x_t, cond, t, coefs, noise)


def test_driver_pads_the_last_batch_for_a_fixed_batch_graph(photo_lr) -> None:
    ab = SCHEDULES["paper_linear"]
    static = [TensorEntry("lr", [2, 3, 16, 16])], [TensorEntry("coarse", [2, 3, 32, 32])]
    manifest = dataclasses.replace(
        analytic_manifest(ab), graphs=[GraphEntry("predictor", "fp32", "p.onnx", "0" * 64, *static, 18)]
    )
    assert fixed_shape(manifest) == (2, 16)
    plan = plan_steps(ab, "ddim", 3)
    assert len(plan_tiles(37, 30, 16, 3).tiles) % 2 == 1  # so the last batch needs padding
    out = upscale_array(
        FixedBatchEngine(ab, 2), manifest, photo_lr[:, :30], plan, tile=16, overlap=3, batch=2
    )
    coarse = photo_lr[:, :30].repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(out, np.clip(coarse + target_residual(coarse), -1, 1), atol=2e-4)

    def padded(plan, noise, tick):  # a hook that needs a fixed batch pads itself
        return fixed_batches(engine_batches(FixedBatchEngine(ab, 2), plan, noise, tick), 2)

    dynamic = upscale_array(AnalyticEngine(ab, 2), analytic_manifest(ab), photo_lr[:, :30], plan, tile=16,
                            overlap=3, batch=2, sampler=padded)  # fmt: skip
    np.testing.assert_array_equal(dynamic, out)
    with pytest.raises(ValueError, match="16-pixel LR tiles only"):
        upscale_array(FixedBatchEngine(ab, 2), manifest, photo_lr, plan, tile=32, overlap=4, batch=2)
    with pytest.raises(ValueError, match="batch must be 2"):
        upscale_array(FixedBatchEngine(ab, 2), manifest, photo_lr, plan, tile=16, overlap=4, batch=3)
