"""The torch engine: the eager modules behind ``esrdf.engines.protocol.Engine``.

It runs the very ``PredictorModule``/``StepModule`` that export traces (``esrdf.export.step_module``), so
it is the parity oracle of every exported graph, and the GPU path where TensorRT is missing.

- ``fp32``: plain float32, on the CPU or CUDA.
- ``fp16``: CUDA only. The networks run under ``torch.autocast``, whose CUDA policy keeps group norm and
  softmax in fp32 like the fp16 ONNX graphs; the sampler update stays fp32. (CPU autocast runs group norm
  in half precision, a different mixed-precision policy, so fp16 on the CPU is refused rather than faked;
  the fp16 ONNX graph under onnxruntime is the CPU way to check fp16 numerics.)

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

from esrdf.engines.registry import EngineError
from esrdf.export.step_module import PredictorModule, StepModule, check_coefs_shape

if TYPE_CHECKING:
    from esrdf.config import ModelConfig
    from esrdf.runtime.bundle import Bundle

PRECISIONS = {"fp32": None, "fp16": torch.float16}


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

    The engine takes ownership of the modules it is given and moves them to ``device`` in place (a copy
    would double the memory of a 98M-parameter U-Net); pass ``copy.deepcopy`` of modules you keep using.
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
        # Weights stay fp32 (autocast casts per op), so fp32 and fp16 engines can share one checkpoint.
        self._predictor = PredictorModule(predictor.float(), dtype).to(self.device).eval()
        # ``config`` says what the U-Net predicts (v and x0 are converted to eps in the step); None: eps.
        self._step = StepModule.for_model(unet.float(), config, dtype).to(self.device).eval()

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
        """The eager weights an export stored in the bundle (``torch/``), checked against the manifest."""
        from esrdf.runtime.bundle import Bundle, load_bundle, sha256_file

        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        info = bundle.manifest.export_info
        rel, digest = info.get("torch_weights"), info.get("torch_weights_sha256")
        if not isinstance(rel, str) or not isinstance(digest, str):
            raise EngineError(
                f"{bundle.root}: this bundle carries no torch weights (exported with --no-torch-weights); "
                "use --backend onnxruntime, or re-export without --no-torch-weights"
            )
        weights = bundle.root / rel
        if not weights.is_file() or sha256_file(weights) != digest:
            raise EngineError(
                f"{weights}: missing, or its sha256 does not match the manifest (modified or corrupted); "
                f"re-export the bundle with esrdf-export --force"
            )
        _check_weights_config(weights.parent, bundle.manifest.model_config)
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


def _check_weights_config(directory: Path, model_config: dict[str, Any]) -> None:
    """The weights' config.json must equal the manifest's model_config: graphs and weights belong together."""
    from esrdf.checkpoint import CONFIG_FILE

    stored = json.loads((directory / CONFIG_FILE).read_text())
    if stored != model_config:
        raise EngineError(
            f"{directory / CONFIG_FILE}: differs from the manifest's model_config; re-export the bundle"
        )
