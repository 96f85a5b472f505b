"""The torch engine on CUDA in fp16 with the conv and linear weights stored in fp16.

``TorchEngine(precision="fp16")`` already runs the eager modules like the fp16 ONNX graphs: autocast runs
convolutions and matmuls in fp16 and keeps group norm and softmax (and the sampler update of paper Eq. 6-7)
in fp32. It keeps the weights in fp32, though, so autocast re-casts all of them on every call: for the
paper U-Net (97.8M parameters) that is ~0.6 GB of memory traffic per denoising step, which weighs most at
batch 1. This subclass casts the conv and linear weights to fp16 once; autocast then
uses them as they are. The values are the ones autocast would have produced, so outputs are bit-identical
to ``TorchEngine(precision="fp16")``; norms, the sinusoidal time embedding and BatchNorm stay fp32.

It is the GPU path where TensorRT is missing, and what ``esrdf.engines.cuda_graph`` captures in the GPU check.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from esrdf.engines.torch_engine import TorchEngine

if TYPE_CHECKING:
    from esrdf.config import ModelConfig

# Layers whose fp16 weight autocast would produce anyway (autocast's fp16 op list: conv, linear, matmul).
_HALF_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def cast_matmul_weights_to_half(module: nn.Module) -> int:
    """Cast the weights and biases of conv/linear layers to fp16 in place; returns how many layers."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, _HALF_LAYERS):
            layer.half()
            count += 1
    return count


class TorchCudaEngine(TorchEngine):
    """``TorchEngine`` whose fp16 mode keeps fp16 weights (bit-identical outputs, less traffic per call)."""

    def __init__(
        self,
        predictor: nn.Module,
        unet: nn.Module,
        device: str | torch.device = "cuda",
        precision: str = "fp16",
        config: ModelConfig | None = None,
    ) -> None:
        if precision == "fp16":
            # TorchEngine moves the modules it is given in place; never halve a caller's fp32 modules.
            predictor, unet = copy.deepcopy(predictor), copy.deepcopy(unet)
        super().__init__(predictor, unet, device=device, precision=precision, config=config)
        if precision == "fp16":
            cast_matmul_weights_to_half(self._predictor)
            cast_matmul_weights_to_half(self._step)
