"""The torch modules behind the two exported graphs, shared by export and the eager torch engine.

They belong to the model package: ``esrdf.export`` traces them and ``esrdf.engines.torch_engine`` runs them,
so both import them from here and neither imports the other.

``StepModule`` is the U-Net with the sampler update folded in (docs/DESIGN.md section 1, "Two graphs"):

    out    = unet(concat[cond, x_t], t)                                       (paper Eq. 5-7)
    eps    = out, or converted from a v / x0 output                           (fp32, see below)
    x_prev = coefs[:, 0] * x_t + coefs[:, 1] * eps + coefs[:, 2] * noise      (fp32 arithmetic)

A U-Net that predicts v or x0 (``UNetConfig.prediction``) has its output turned into eps inside the graph
(``esrdf.diffusion.parameterisation.output_to_eps``) with sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t)
gathered by the integer t from constant float32 tables, so the graph's inputs, outputs and the runtime's
coefficients are the same for every parameterisation.

DDPM ancestral steps (paper Eq. 6) and DDIM steps with any eta are both affine in (x_t, eps, noise), so one
graph serves every sampler; the runtime picks the coefficients. Their shape, (B, 3), is part of the graph
contract, which ``esrdf.runtime.graph_spec`` declares (the engines check inputs against it); the model
package does not import the runtime. The update lives in its own submodule, ``sampler_update``, so its
ONNX nodes carry that name scope: ``esrdf.export.fp16`` finds them by it and keeps them in fp32.

Exporting and serving the same module makes the torch engine the parity oracle of the exported graphs.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from esrdf.config import Prediction
from esrdf.diffusion.parameterisation import output_to_eps

if TYPE_CHECKING:
    from esrdf.config import ModelConfig

UPDATE_SCOPE = "sampler_update"  # attribute name of the update submodule = its ONNX name scope


class SamplerUpdate(nn.Module):
    """x_prev = c_xt * x_t + c_eps * eps + c_noise * noise, always computed in float32.

    Every input is cast to float32 first: in a half-precision U-Net eps arrives in fp16, and rounding x_t
    to fp16 each step would accumulate over the N steps of the loop. For a v or x0 U-Net, ``output`` is
    converted to eps here, in the same fp32 scope.
    """

    sqrt_ab: torch.Tensor
    sqrt_one_minus_ab: torch.Tensor

    def __init__(self, prediction: Prediction = "eps", alphas_cumprod: np.ndarray | None = None) -> None:
        super().__init__()
        self.prediction = prediction
        if prediction != "eps":
            if alphas_cumprod is None:
                raise ValueError(f"a {prediction!r}-predicting U-Net needs alphas_cumprod for the step graph")
            ac = np.asarray(alphas_cumprod, dtype=np.float64)
            # Not persistent: derived from the schedule, so checkpoints and torch weights never carry them.
            self.register_buffer("sqrt_ab", torch.from_numpy(np.sqrt(ac)).float(), persistent=False)
            self.register_buffer(
                "sqrt_one_minus_ab", torch.from_numpy(np.sqrt(1 - ac)).float(), persistent=False
            )

    def forward(
        self,
        x_t: torch.Tensor,
        output: torch.Tensor,
        noise: torch.Tensor,
        coefs: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        x = x_t.float()
        eps = output.float()
        if self.prediction != "eps":
            index = t.round().long()  # t is the float32 timestep index
            sqrt_ab = self.sqrt_ab[index][:, None, None, None]
            sqrt_one_minus_ab = self.sqrt_one_minus_ab[index][:, None, None, None]
            eps = output_to_eps(self.prediction, eps, x, sqrt_ab, sqrt_one_minus_ab)
        c = coefs.float()[:, :, None, None]  # (B, 3) -> (B, 3, 1, 1), broadcast over (C, H, W)
        return c[:, 0:1] * x + c[:, 1:2] * eps + c[:, 2:3] * noise.float()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """Mixed precision like the fp16 ONNX graphs: autocast runs convs/matmuls in ``dtype`` and keeps
    group norm and softmax in fp32. ``None`` (export, the fp32 oracle) runs everything as is."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class StepModule(nn.Module):
    """One reverse-diffusion step on the residual r = hr - coarse: (x_t, cond, t, coefs, noise) -> x_prev.

    ``t`` is the float32 timestep index, shape (B,); ``coefs`` is (B, 3). ``compute_dtype`` (eager only)
    runs the U-Net under autocast; the update stays fp32 regardless.
    """

    def __init__(
        self,
        unet: nn.Module,
        compute_dtype: torch.dtype | None = None,
        prediction: Prediction = "eps",
        alphas_cumprod: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.compute_dtype = compute_dtype
        # attribute name == UPDATE_SCOPE: the fp16 pass keys on it
        self.sampler_update = SamplerUpdate(prediction, alphas_cumprod)

    @classmethod
    def for_model(
        cls, unet: nn.Module, config: ModelConfig | None, compute_dtype: torch.dtype | None = None
    ) -> StepModule:
        """The step of ``unet`` as ``config`` describes it (its parameterisation and schedule); ``None``
        means an eps U-Net, the paper's."""
        if config is None or config.unet.prediction == "eps":
            return cls(unet, compute_dtype)
        from esrdf.diffusion.schedule import make_schedule

        ac = make_schedule(config.schedule).alphas_cumprod
        return cls(unet, compute_dtype, config.unet.prediction, ac)

    def forward(
        self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, coefs: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        with _autocast(x_t.device, self.compute_dtype):
            output = self.unet(torch.cat([cond, x_t], dim=1), t)  # (B, 2C, H, W) -> (B, C, H, W)
        return self.sampler_update(x_t, output, noise, coefs, t)


class PredictorModule(nn.Module):
    """coarse = P(lr) (paper Section 4.2, Fig. 5), returned in float32 whatever ``compute_dtype`` is."""

    def __init__(self, predictor: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.predictor = predictor
        self.compute_dtype = compute_dtype

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        with _autocast(lr.device, self.compute_dtype):
            coarse = self.predictor(lr)
        return coarse.float()
