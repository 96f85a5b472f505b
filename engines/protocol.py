"""The one small protocol every executable engine satisfies: onnxruntime, TensorRT, and eager torch.

The runtime drives any of them the same way; it never knows which it has. Arrays live wherever the engine
keeps them (numpy for onnxruntime on the CPU, torch tensors for torch and TensorRT); ``upload`` and
``download`` cross that boundary, so the sampler loop never copies between steps.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    """Runs the two graphs of ``esrdf.runtime.graph_spec``: predictor and step."""

    name: str

    def upload(self, array: np.ndarray) -> Any:
        """Host float32 array -> this engine's array type (a no-op for CPU engines)."""
        ...

    def download(self, array: Any) -> np.ndarray:
        """This engine's array -> host float32 numpy array."""
        ...

    def predictor(self, lr: Any) -> Any:
        """coarse = P(lr); (B, C, h, w) -> (B, C, s*h, s*w)."""
        ...

    def step(self, x_t: Any, cond: Any, t: Any, coefs: Any, noise: Any) -> Any:
        """x_prev = coefs[:,0] * x_t + coefs[:,1] * eps(concat[cond, x_t], t) + coefs[:,2] * noise."""
        ...
