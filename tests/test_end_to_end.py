"""End to end: the lean runtime (``esrdf.runtime.Upscaler``) against the eager sampler, on a real photo.

The runtime runs the exported bundle through an engine (onnxruntime, or the torch oracle); the eager side is
``esrdf.diffusion.samplers.sample_residual_sr`` on the checkpoint's modules. Both get the same injected
noise fields (x_T, then one per update), so the bars are those of docs/DESIGN.md section 4.

The tiny model has random weights, so its samples are far from the photo and part of the output saturates
at the [-1, 1] clip; the tests check that enough pixels stay unclipped for the comparison to bite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from tiny_bundle import make_tiny_checkpoint, tiny_bundle, tiny_checkpoint

from esrdf.config import SamplingOptions
from esrdf.export.parity import compare
from esrdf.runtime.tolerances import END_TO_END_FP16, END_TO_END_FP32, FP16_GRAPH, FP32_GRAPH

HR_CROP = (slice(40, 88), slice(180, 244))  # 48 x 64 HR, non-square; LR 12 x 16
MIN_UNCLIPPED = 0.25  # fraction of output values strictly inside (-1, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> dict[str, Any]:
    from esrdf.checkpoint import load_checkpoint
    from esrdf.data import bicubic_downsample
    from esrdf.diffusion.schedule import make_schedule

    base = tmp_path_factory.getbasetemp()
    ckpt = load_checkpoint(tiny_checkpoint(base))
    lr_rgb = bicubic_downsample(astronaut[HR_CROP], 4)
    return {
        "bundle": tiny_bundle(base),
        "ckpt": ckpt,
        "schedule": make_schedule(ckpt.config.schedule),
        "lr": lr_rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0,  # (3, 12, 16) in [-1, 1]
    }


def _noise_fields(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.standard_normal((count, 3, 48, 64)).astype(np.float32))


def _eager(
    setup: dict[str, Any],
    fields: list[np.ndarray],
    sampler: Literal["ddim", "ddpm"],
    steps: int | None,
    eta: float,
    prior: Literal["matched", "paper"] = "matched",
) -> np.ndarray:
    from esrdf.diffusion.samplers import sample_residual_sr

    ckpt = setup["ckpt"]
    _coarse, out = sample_residual_sr(
        ckpt.predictor,
        ckpt.unet,
        setup["schedule"],
        torch.from_numpy(setup["lr"])[None],
        sampler=sampler,
        steps=steps,
        eta=eta,
        prior=prior,
        x_T=torch.from_numpy(fields[0])[None],
        noises=[torch.from_numpy(f)[None] for f in fields[1:]],
    )
    return np.clip(out[0].numpy(), -1.0, 1.0)


def _runtime(
    setup: dict[str, Any],
    fields: list[np.ndarray],
    sampler: str,
    steps: int | None,
    eta: float,
    prior: str | None = None,
    **upscaler: Any,
) -> np.ndarray:
    from esrdf.runtime import Upscaler

    # onnxruntime unless a test names another: the fp32 and fp16 bars are that engine's (auto may pick bf16)
    runtime = Upscaler(setup["bundle"], tile=0, **{"backend": "onnxruntime", **upscaler})
    options = SamplingOptions(steps=steps, sampler=sampler, eta=eta, prior=prior)
    return runtime.upscale_array(setup["lr"], options, injected_noise=fields)


def _max_abs01(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) / 2.0  # [-1, 1] -> [0, 1] images


@pytest.mark.parametrize(
    ("backend", "sampler", "steps", "eta", "prior"),
    [
        ("onnxruntime", "ddim", 10, 0.0, "matched"),
        ("onnxruntime", "ddim", 10, 0.0, "paper"),
        ("onnxruntime", "ddim", 7, 1.0, "paper"),
        ("onnxruntime", "ddpm", None, 1.0, "matched"),
        ("torch", "ddim", 6, 0.5, "matched"),
        ("torch", "ddim", 6, 0.5, "paper"),
    ],
)
def test_runtime_matches_eager_sampler_fp32(
    setup: dict[str, Any],
    backend: str,
    sampler: Literal["ddim", "ddpm"],
    steps: int | None,
    eta: float,
    prior: Literal["matched", "paper"],
) -> None:
    """Injected noise, same prior option on both sides: the runtime scales field 0 where the eager sampler
    does, so the two start from the same x_T."""
    count = (setup["schedule"].timesteps if steps is None else steps) + 1
    fields = _noise_fields(count)
    eager = _eager(setup, fields, sampler, steps, eta, prior)
    out = _runtime(setup, fields, sampler, steps, eta, prior, backend=backend)
    assert out.shape == (3, 48, 64)
    assert np.mean(np.abs(eager) < 1.0) > MIN_UNCLIPPED
    assert _max_abs01(out, eager) <= END_TO_END_FP32.max_abs


def test_fp16_end_to_end_psnr_against_fp32(setup: dict[str, Any]) -> None:
    fields = _noise_fields(11, seed=1)
    fp32 = _runtime(setup, fields, "ddim", 10, 0.0)
    fp16 = _runtime(setup, fields, "ddim", 10, 0.0, precision="fp16")
    assert np.mean(np.abs(fp32) < 1.0) > MIN_UNCLIPPED
    assert not np.array_equal(fp16, fp32)  # the fp16 graphs really ran
    assert compare(fp16, fp32).psnr_db >= END_TO_END_FP16.min_psnr_db


def test_tiled_agrees_with_untiled_in_the_interior(setup: dict[str, Any], astronaut: np.ndarray) -> None:
    """Tiles see less context than the whole image (the U-Net's attention and the predictor's CBAM pool
    globally), so tiled output differs at some level everywhere; blended overlaps and one shared noise
    field keep it close. A misplaced tile or a tile-local noise field falls to the other-seed level."""
    from esrdf.data import bicubic_downsample
    from esrdf.runtime import Upscaler

    lr = bicubic_downsample(astronaut[100:196, 200:328], 4).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    whole = Upscaler(setup["bundle"], tile=0).upscale_array(lr, SamplingOptions(steps=4, seed=5))
    tiled = Upscaler(setup["bundle"], tile=16, overlap=8, batch=2).upscale_array(
        lr, SamplingOptions(steps=4, seed=5)
    )
    other_seed = Upscaler(setup["bundle"], tile=0).upscale_array(lr, SamplingOptions(steps=4, seed=6))
    assert tiled.shape == whole.shape == (3, 96, 128)
    inner = (slice(None), slice(32, -32), slice(32, -32))  # one overlap (8 LR = 32 HR px) in from the edge
    assert compare(tiled[inner], whole[inner]).psnr_db >= 30.0
    assert compare(other_seed[inner], whole[inner]).psnr_db < 15.0


def test_torch_engine_refuses_fp16_on_cpu(setup: dict[str, Any]) -> None:
    from esrdf.engines.torch_engine import TorchEngine
    from esrdf.runtime.engine import EngineError

    with pytest.raises(EngineError, match="fp16 on CUDA only"):
        TorchEngine.from_bundle(setup["bundle"], device="cpu", precision="fp16")


@pytest.mark.gpu
def test_torch_engine_on_cuda_matches_cpu_and_holds_fp16_bars(tmp_path: Path, test_device: str) -> None:
    """The torch engine on CUDA: fp32 (IEEE, TF32 off) matches the CPU oracle per graph; fp16 autocast meets
    the per-graph fp16 bars and the end-to-end fp16 PSNR. Needs only torch and a checkpoint, so it runs on
    a GPU machine without the export toolchain (synthetic photo where scikit-image is missing)."""
    from esrdf.checkpoint import read_config
    from esrdf.diffusion.schedule import make_schedule
    from esrdf.engines.torch_engine import TorchEngine
    from esrdf.export.parity import bar_failures, make_feeds, parity_photo
    from esrdf.runtime.sampling import plan_steps

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    engines = {
        "cpu": TorchEngine.from_checkpoint(ckpt),
        "fp32": TorchEngine.from_checkpoint(ckpt, test_device),
        "fp16": TorchEngine.from_checkpoint(ckpt, test_device, "fp16"),
    }
    alphas_cumprod = make_schedule(read_config(ckpt).schedule).alphas_cumprod
    feeds = make_feeds(engines["cpu"]._predictor, alphas_cumprod, parity_photo()[0], 2, 16, 24, 4)
    for role in ("predictor", "step"):
        out = {
            k: e.download(getattr(e, role)(*map(e.upload, feeds[role].values()))) for k, e in engines.items()
        }
        assert not bar_failures(compare(out["fp32"], out["cpu"]), FP32_GRAPH, f"{role} cuda fp32")
        assert not bar_failures(compare(out["fp16"], out["fp32"]), FP16_GRAPH, f"{role} cuda fp16")
    plan = plan_steps(alphas_cumprod, "ddim", 10, 0.0)
    fields = np.random.default_rng(0).standard_normal((11, *feeds["step"]["cond"].shape)).astype(np.float32)
    final = {}
    for key in ("fp32", "fp16"):
        e = engines[key]
        coarse, x = e.predictor(e.upload(feeds["predictor"]["lr"])), e.upload(fields[0])
        for k in range(plan.num_steps):
            t, coefs = np.full(2, plan.t[k], np.float32), np.repeat(plan.coefs[k : k + 1], 2, axis=0)
            x = e.step(x, coarse, e.upload(t), e.upload(coefs), e.upload(fields[k + 1]))
        final[key] = np.clip(e.download(coarse) + e.download(x), -1.0, 1.0)
    assert compare(final["fp16"], final["fp32"]).psnr_db >= END_TO_END_FP16.min_psnr_db


def test_matched_prior_is_the_paper_prior_with_field_zero_scaled(setup: dict[str, Any]) -> None:
    """The runtime's x_T contract, the one the eager sampler and the C++ runtime share: the matched prior
    multiplies noise field 0 by sqrt(1 - alpha_bar_{T-1}) (float32) and changes nothing else."""
    from esrdf.runtime.sampling import init_noise_std

    fields = _noise_fields(5, seed=2)
    std = init_noise_std(setup["schedule"].alphas_cumprod, "matched")
    assert 0.0 < std < 1.0
    matched = _runtime(setup, fields, "ddim", 4, 0.0, "matched")
    scaled = _runtime(setup, [fields[0] * np.float32(std), *fields[1:]], "ddim", 4, 0.0, "paper")
    np.testing.assert_array_equal(matched, scaled)
    assert not np.array_equal(matched, _runtime(setup, fields, "ddim", 4, 0.0, "paper"))
