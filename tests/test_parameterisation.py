"""eps / v / x0 prediction (esrdf.diffusion.parameterisation) with analytic oracles on real photos.

For a known residual r0, the exact output of each parameterisation is known in closed form (Salimans & Ho
2022): eps = (r_t - sqrt(ab) r0) / sqrt(1 - ab), v = sqrt(ab) eps - sqrt(1 - ab) r0, x0 = r0. Each oracle
must give a near-zero training loss, convert back to the same eps, and make every sampler return r0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from esrdf.config import ConfigError, ModelConfig, Prediction, ScheduleConfig, preset
from esrdf.diffusion.objective import diffusion_loss
from esrdf.diffusion.parameterisation import PREDICTIONS, output_to_eps, training_target
from esrdf.diffusion.samplers import ddim_sample, ddpm_sample, unet_eps_fn
from esrdf.diffusion.schedule import Schedule, make_schedule

PAPER = preset("paper").schedule
COSINE = ScheduleConfig(kind="cosine", timesteps=200)


def _crops(photo: np.ndarray, size: int) -> torch.Tensor:
    crops = [photo[y : y + size, x : x + size] for y, x in ((100, 180), (300, 300))]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def pair(astronaut: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, r0): two real crops, and a residual-sized real image difference."""
    cond = _crops(astronaut, 32)
    return cond, (_crops(astronaut[::-1], 32) - cond) * 0.1


class Oracle(torch.nn.Module):
    """The exact output of a ``prediction`` U-Net for the known residual r0, called as unet(concat, t)."""

    def __init__(self, schedule: Schedule, r0: torch.Tensor, prediction: Prediction) -> None:
        super().__init__()
        self.schedule, self.r0, self.prediction = schedule, r0, prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r_t = x[:, 3:].double()
        ab = torch.tensor(self.schedule.alphas_cumprod)[t.long()].reshape(-1, 1, 1, 1)
        eps = (r_t - ab.sqrt() * self.r0.double()) / (1 - ab).sqrt()
        return training_target(self.prediction, self.r0.double(), eps, ab.sqrt(), (1 - ab).sqrt()).float()


def test_v_target_golden() -> None:
    # ab = 0.36: sqrt 0.6, sqrt(1 - ab) 0.8; r0 = 0.05, eps = 1 -> v = 0.6 - 0.04 = 0.56.
    r0, eps = torch.tensor([0.05]), torch.tensor([1.0])
    assert training_target("v", r0, eps, 0.6, 0.8).item() == pytest.approx(0.56)
    assert training_target("x0", r0, eps, 0.6, 0.8).item() == pytest.approx(0.05)
    x_t = 0.6 * r0 + 0.8 * eps
    for prediction in PREDICTIONS:
        target = training_target(prediction, r0, eps, 0.6, 0.8)
        assert output_to_eps(prediction, target, x_t, 0.6, 0.8).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown prediction"):
        training_target("score", r0, eps, 0.6, 0.8)  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_oracle_loss_is_near_zero_for_each_parameterisation(pair, prediction: Prediction) -> None:
    cond, r0 = pair
    sched = make_schedule(PAPER)
    oracle = Oracle(sched, r0, prediction)
    loss = diffusion_loss(oracle, sched, r0, cond, generator=torch.Generator().manual_seed(0),
                          prediction=prediction)  # fmt: skip
    assert loss.item() < 1e-5
    # The eps oracle is not a v or x0 oracle: the target really changes with the parameterisation.
    other = "x0" if prediction != "x0" else "eps"
    wrong = diffusion_loss(Oracle(sched, r0, other), sched, r0, cond,
                           generator=torch.Generator().manual_seed(0), prediction=prediction)  # fmt: skip
    assert wrong.item() > 0.01


@pytest.mark.parametrize("name", ["paper", "cosine"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_converted_outputs_sample_like_eps(pair, name: str, prediction: Prediction) -> None:
    """unet_eps_fn turns a v / x0 oracle into the eps oracle; DDIM and DDPM then return r0 exactly."""
    cond, r0 = pair
    sched = make_schedule(PAPER if name == "paper" else COSINE)
    x_T = torch.randn(r0.shape, generator=torch.Generator().manual_seed(1))
    eps_fn = unet_eps_fn(Oracle(sched, r0, prediction), sched, prediction)
    reference = unet_eps_fn(Oracle(sched, r0, "eps"))
    t = torch.full((2,), 150.0)
    torch.testing.assert_close(eps_fn(x_T, cond, t), reference(x_T, cond, t), atol=2e-5, rtol=0)
    for out in (
        ddim_sample(eps_fn, sched, x_T, cond, 10, eta=0.0),
        ddim_sample(eps_fn, sched, x_T, cond, 25, eta=1.0, generator=torch.Generator().manual_seed(2)),
        ddpm_sample(eps_fn, sched, x_T, cond, generator=torch.Generator().manual_seed(3)),
    ):
        torch.testing.assert_close(out, r0, atol=5e-4 if name == "cosine" else 2e-5, rtol=0)


def test_converting_needs_the_schedule() -> None:
    with pytest.raises(ValueError, match="needs the schedule"):
        unet_eps_fn(lambda x, t: x[:, 3:], prediction="v")


def test_prediction_round_trips_and_old_configs_mean_eps() -> None:
    cfg = dataclasses.replace(preset("small"), unet=dataclasses.replace(preset("small").unet, prediction="v"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["unet"]["prediction"]  # a config.json written before the key existed
    assert ModelConfig.from_dict(old).unet.prediction == "eps"
    with pytest.raises(ConfigError, match="prediction"):
        ModelConfig.from_dict(cfg.to_dict() | {"unet": cfg.to_dict()["unet"] | {"prediction": "score"}})
    with pytest.raises(ConfigError, match="missing key 'res_blocks'"):
        ModelConfig.from_dict(
            cfg.to_dict() | {"unet": {k: v for k, v in old["unet"].items() if k != "res_blocks"}}
        )
    assert math.isfinite(make_schedule(COSINE).sqrt_recip_alphas_cumprod[-1])  # the cosine test is meaningful
