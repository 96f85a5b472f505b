"""The torch engine: the eager modules behind ``esrdf.runtime.engine.Engine``.

It runs the very ``PredictorModule``/``StepModule`` that export traces (``esrdf.models.step_module``), so
it is the parity oracle of every exported graph, and the GPU path where TensorRT is missing: ``Upscaler``,
``esrdf-run``, ``UpscalerService`` and the GPU check all get this one engine.

- ``fp32``: plain float32, on the CPU or CUDA.
- ``fp16``: CUDA only. The conv and linear weights are cast to fp16 once, when the engine is made, and held
  on the device; the networks run under ``torch.autocast``, which uses those weights as they are and keeps
  group norm and softmax in fp32 like the fp16 ONNX graphs; norms, BatchNorm and the sinusoidal time
  embedding keep fp32 weights, and the sampler update stays fp32. The fp16 weights are exactly the values
  autocast would have cast on every call, so outputs equal an fp32-weight autocast run bit for bit, without
  re-reading ~0.6 GB of fp32 weights per denoising step of the paper U-Net (97.8M parameters). (CPU
  autocast runs group norm in half precision, a different mixed-precision policy, so fp16 on the CPU is
  refused rather than faked; the fp16 ONNX graph under onnxruntime is the CPU way to check fp16 numerics.)

fp32 on CUDA is IEEE fp32: cuDNN would otherwise run fp32 convs in TF32 (its default), which moved the
tiny model's step output by 1.1e-3 of its scale on an H200, ten times the fp32 graph bar; TF32 is switched
off for the duration of each call. (cuDNN's flags are process-wide; calls restore them on exit.)

Arrays are torch tensors on the engine's device; ``upload``/``download`` cross to numpy. Calls run under
``torch.inference_mode`` and keep no state, so one engine may serve several threads.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from esrdf.models.step_module import PredictorModule, StepModule
from esrdf.runtime.engine import BatchSamplerFactory, EngineError, loading_engine_file
from esrdf.runtime.graph_spec import NUM_STEP_COEFS

if TYPE_CHECKING:
    from esrdf.config import ModelConfig
    from esrdf.runtime.bundle import Bundle

PRECISIONS = {"fp32": None, "fp16": torch.float16}
# Layers whose fp16 weight autocast would produce anyway (autocast's fp16 op list: conv, linear, matmul).
_HALF_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise EngineError(f"unknown device {device!r}; expected cpu or cuda")
    return dev


def _compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise EngineError(
            "the torch engine runs fp16 on CUDA only (CPU autocast keeps no norms in fp32); "
            "use --precision fp32, or the onnxruntime backend for the fp16 graphs"
        )
    return PRECISIONS[precision]


class TorchEngine:
    """Eager predictor and step modules on one device, satisfying ``Engine``.

    The engine takes ownership of the modules it is given and moves them to ``device`` in place (and, for
    fp16, halves their conv and linear weights in place: a copy would double the memory of a 98M-parameter
    U-Net); pass ``copy.deepcopy`` of modules you keep using.
    """

    name = "torch"

    def __init__(
        self,
        predictor: nn.Module,
        unet: nn.Module,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        config: ModelConfig | None = None,
    ) -> None:
        self.device = _device(device)
        self.precision = precision
        dtype = _compute_dtype(precision, self.device)
        self._predictor = PredictorModule(predictor.float(), dtype).to(self.device).eval()
        # ``config`` says what the U-Net predicts (v and x0 are converted to eps in the step); None: eps.
        self._step = StepModule.for_model(unet.float(), config, dtype).to(self.device).eval()
        if dtype is torch.float16:
            cast_matmul_weights_to_half(self._predictor)
            cast_matmul_weights_to_half(self._step)

    @classmethod
    def from_checkpoint(
        cls, ckpt_dir: str | os.PathLike[str], device: str = "cpu", precision: str = "fp32"
    ) -> TorchEngine:
        """Both networks of a checkpoint directory (EMA U-Net weights when present)."""
        from esrdf.checkpoint import load_checkpoint

        ckpt = load_checkpoint(Path(ckpt_dir))
        if ckpt.unet is None:
            raise EngineError(
                f"{ckpt_dir}: a predictor-only checkpoint; the torch engine needs the U-Net too"
            )
        return cls(ckpt.predictor, ckpt.unet, device=device, precision=precision, config=ckpt.config)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | os.PathLike[str], device: str = "cpu", precision: str = "fp32"
    ) -> TorchEngine:
        """The eager weights an export stored in the bundle (``torch/``; ``load_bundle`` checks their sha256
        like the graphs')."""
        from esrdf.runtime.bundle import Bundle, load_bundle

        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        if bundle.manifest.torch_weights is None:
            raise EngineError(
                f"{bundle.root}: this bundle carries no torch weights (exported with --no-torch-weights); "
                "use --backend onnxruntime, or re-export without --no-torch-weights"
            )
        weights = bundle.root / bundle.manifest.torch_weights.file
        _check_weights_config(weights.parent, bundle.manifest.model_config)
        with loading_engine_file(weights):
            return cls.from_checkpoint(weights.parent, device=device, precision=precision)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def download(self, array: Any) -> np.ndarray:
        return np.asarray(array.detach().float().cpu().numpy())

    def _numerics(self) -> contextlib.AbstractContextManager[object]:
        """IEEE fp32 convolutions on CUDA for the fp32 engine (see the module docstring)."""
        if self.device.type != "cuda" or self.precision != "fp32":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        )

    def predictor(self, lr: Any) -> torch.Tensor:
        with torch.inference_mode(), self._numerics():
            return self._predictor(lr)

    def step(self, x_t: Any, cond: Any, t: Any, coefs: Any, noise: Any) -> torch.Tensor:
        check_coefs_shape(coefs)
        with torch.inference_mode(), self._numerics():
            return self._step(x_t, cond, t, coefs, noise)

    def batch_sampler_factory(
        self, channels: int, scale: int, batch: int, use_graphs: bool = True
    ) -> BatchSamplerFactory | None:
        """On CUDA, the whole sampler loop of a batch as one CUDA-graph replay (``esrdf.engines.cuda_graph``;
        ``use_graphs=False``: the same loop as stream execution); on the CPU, None (the driver's loop)."""
        if self.device.type != "cuda":
            return None
        from esrdf.engines.cuda_graph import graph_batch_sampler_factory

        return graph_batch_sampler_factory(self, channels, scale, self.device, batch, use_graphs)


def cast_matmul_weights_to_half(module: nn.Module) -> int:
    """Cast the weights and biases of conv/linear layers to fp16 in place; returns how many layers."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, _HALF_LAYERS):
            layer.half()
            count += 1
    return count


def check_coefs_shape(coefs: torch.Tensor) -> None:
    """Refuse coefficient tensors that the graph contract (``graph_spec.step_spec``) does not allow."""
    if coefs.ndim != 2 or coefs.shape[1] != NUM_STEP_COEFS:
        raise ValueError(f"coefs must be (batch, {NUM_STEP_COEFS}), got {tuple(coefs.shape)}")


def _check_weights_config(directory: Path, model_config: dict[str, Any]) -> None:
    """The weights' config.json must equal the manifest's model_config: graphs and weights belong together."""
    from esrdf.checkpoint import CONFIG_FILE

    stored = json.loads((directory / CONFIG_FILE).read_text())
    if stored != model_config:
        raise EngineError(
            f"{directory / CONFIG_FILE}: differs from the manifest's model_config; re-export the bundle"
        )
