"""The step graph of a v- or x0-predicting U-Net keeps the eps contract (esrdf/models/step_module.py).

The U-Net's output is converted to eps inside the step, in fp32, from constant tables gathered by t, so the
runtime's per-step coefficients (affine in x_t, eps, noise) are the same for every parameterisation.
Checked with exact oracles (golden), then end to end: a tiny v-predicting checkpoint exported to a bundle
and run by the lean runtime against the eager sampler with the same injected noise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from esrdf.config import Prediction, SamplingOptions, preset
from esrdf.diffusion.parameterisation import training_target
from esrdf.diffusion.schedule import Schedule, make_schedule
from esrdf.models.step_module import StepModule
from esrdf.runtime.tolerances import END_TO_END_FP16, END_TO_END_FP32

HR_CROP = (slice(40, 88), slice(180, 244))  # 48 x 64 HR of the astronaut


class Oracle(torch.nn.Module):
    """The exact output of a ``prediction`` U-Net for a known residual, called as unet(concat, t)."""

    def __init__(self, schedule: Schedule, r0: torch.Tensor, prediction: Prediction) -> None:
        super().__init__()
        self.ab = torch.tensor(schedule.alphas_cumprod)
        self.r0, self.prediction = r0, prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r_t, r0 = x[:, 3:].double(), self.r0.double()
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1)
        eps = (r_t - ab.sqrt() * r0) / (1 - ab).sqrt()
        return training_target(self.prediction, r0, eps, ab.sqrt(), (1 - ab).sqrt()).float()


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_step_converts_outputs_to_the_eps_update(astronaut: np.ndarray, prediction: Prediction) -> None:
    cfg = preset("tiny")
    sched = make_schedule(cfg.schedule)
    v_cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, prediction=prediction))
    photo = torch.from_numpy(astronaut[HR_CROP].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    cond, r0 = photo, (photo.flip(-1) - photo) * 0.1
    gen = torch.Generator().manual_seed(0)
    x_t, noise = torch.randn(r0.shape, generator=gen), torch.randn(r0.shape, generator=gen)
    coefs = torch.tensor([[0.9, -0.3, 0.2]])
    for t in (0.0, 57.0, 199.0):
        tt = torch.tensor([t])
        expected = StepModule.for_model(Oracle(sched, r0, "eps"), cfg)(x_t, cond, tt, coefs, noise)
        got = StepModule.for_model(Oracle(sched, r0, prediction), v_cfg)(x_t, cond, tt, coefs, noise)
        # fp32 rounding only: at t = 0, eps of an x_t far from the data is ~1e3 (1 / sqrt(1 - ab_0)).
        torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-5)
    # Without the config the v output would be taken for eps: the conversion is what makes them agree.
    plain = StepModule(Oracle(sched, r0, prediction))(x_t, cond, torch.tensor([57.0]), coefs, noise)
    assert (plain - expected).abs().max() > 1e-2
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        StepModule(Oracle(sched, r0, prediction), prediction=prediction)


@pytest.mark.slow
def test_v_bundle_runs_like_the_eager_sampler(astronaut: np.ndarray, tmp_path: Path) -> None:
    from esrdf.checkpoint import load_checkpoint, save_checkpoint
    from esrdf.data import bicubic_downsample
    from esrdf.diffusion.samplers import sample_residual_sr
    from esrdf.export.bundle_writer import export_bundle
    from esrdf.models import build_predictor, build_unet
    from esrdf.runtime import Upscaler

    torch.manual_seed(0)
    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, prediction="v"))
    predictor = build_predictor(cfg)
    torch.nn.init.normal_(predictor.final_conv.weight, std=0.02)
    unet = build_unet(cfg)
    with torch.no_grad():  # a v-model's output is small: scale the head so x_prev is not saturated
        unet.output_conv.weight.mul_(0.1)
    ckpt_dir = save_checkpoint(tmp_path / "ckpt", cfg, predictor.eval(), unet)
    bundle = export_bundle(ckpt_dir, tmp_path / "bundle", precision="both", tile=8, batch=1, progress=False)
    ckpt = load_checkpoint(ckpt_dir)
    lr = bicubic_downsample(astronaut[HR_CROP], 4).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    fields = list(np.random.default_rng(0).standard_normal((11, 3, 48, 64)).astype(np.float32))
    noises = [torch.from_numpy(f)[None] for f in fields[1:]]
    _, eager = sample_residual_sr(
        ckpt.predictor, ckpt.unet, make_schedule(cfg.schedule), torch.from_numpy(lr)[None], steps=10,
        eta=0.5, x_T=torch.from_numpy(fields[0])[None], noises=noises, prediction="v",
    )  # fmt: skip
    eager_np = np.clip(eager[0].numpy(), -1, 1)
    assert np.mean(np.abs(eager_np) < 1) > 0.25
    runs = {}
    for precision in ("fp32", "fp16"):
        runtime = Upscaler(bundle, tile=0, backend="onnxruntime", precision=precision)
        runs[precision] = runtime.upscale_array(
            lr, SamplingOptions(sampler="ddim", steps=10, eta=0.5, prior="paper"), injected_noise=fields
        )
    assert float(np.max(np.abs(runs["fp32"] - eager_np))) / 2 <= END_TO_END_FP32.max_abs
    mse = float(np.mean(((runs["fp16"] - runs["fp32"]) / 2) ** 2))
    assert 10 * np.log10(1 / mse) >= END_TO_END_FP16.min_psnr_db
