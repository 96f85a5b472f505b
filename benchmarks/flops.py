"""FLOP counts of the two graphs, a measured GEMM ceiling, and achieved FLOP/s.

Counts come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add of
convolutions and matrix products (the ops that dominate: the U-Net of paper Eq. 5 is convolutions and
attention matmuls) and nothing for elementwise ops, norms or activations. So "achieved FLOP/s" below is
counted FLOPs over measured time: a lower bound on the work the hardware did.

The hardware limit is measured rather than taken from a datasheet (clock and SIMD width of a shared or
virtualised CPU are rarely known): the best rate of a large matrix product and of a large 3x3 convolution
in the same dtype, on the same device and threads. Distance to the limit is achieved / that ceiling; a
graph can exceed it slightly where its library's kernels beat torch's on this CPU (onnxruntime's MLAS vs
MKL on AMD, say), which the report then shows as a fraction above 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class GraphFlops:
    """FLOPs of one call of a graph at one shape."""

    graph: str  # "predictor" or "step"
    batch: int
    lr_tile: int
    hr_tile: int
    flops: int

    @property
    def gflop(self) -> float:
        return self.flops / 1e9


def conv2d_flops(
    batch: int, c_in: int, c_out: int, kernel: int, out_h: int, out_w: int, groups: int = 1
) -> int:
    """Analytic FLOPs of a 2-D convolution as FlopCounterMode counts them: 2 per multiply-add.

    Each of the B * C_out * H_out * W_out outputs is a dot product of length (C_in / groups) * k * k; the
    bias add is not counted (FlopCounterMode counts the convolution only).
    """
    return 2 * batch * c_out * out_h * out_w * (c_in // groups) * kernel * kernel


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Total FLOPs of ``module(*inputs)`` under FlopCounterMode (no grad, nothing printed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def predictor_flops(
    predictor: nn.Module, batch: int, lr_tile: int, scale: int, channels: int = 3
) -> GraphFlops:
    """One predictor pass c = P(lr) (paper Section 4.2) on ``batch`` LR tiles of ``lr_tile`` pixels."""
    import torch

    lr = torch.zeros(batch, channels, lr_tile, lr_tile)  # FLOPs do not depend on values, only on shapes
    return GraphFlops("predictor", batch, lr_tile, lr_tile * scale, count_flops(predictor, lr))


def step_flops(unet: nn.Module, batch: int, lr_tile: int, scale: int, channels: int = 3) -> GraphFlops:
    """One U-Net step eps(concat[c, x_t], t) (paper Eq. 5) on ``batch`` HR tiles of ``lr_tile * scale``.

    The step graph's affine update (3 elementwise products) adds no counted FLOPs.
    """
    import torch

    hr = lr_tile * scale
    x = torch.zeros(batch, 2 * channels, hr, hr)
    t = torch.zeros(batch)
    return GraphFlops("step", batch, lr_tile, hr, count_flops(unet, x, t))


def model_flops(
    predictor: nn.Module, unet: nn.Module, batches: Sequence[int], lr_tile: int, scale: int
) -> list[GraphFlops]:
    """Predictor and step FLOPs at every batch size (FLOPs are linear in the batch; counted anyway)."""
    rows = []
    for batch in batches:
        rows.append(predictor_flops(predictor, batch, lr_tile, scale))
        rows.append(step_flops(unet, batch, lr_tile, scale))
    return rows


def _best_gflops(fn: Callable[[], Any], flops: float, seconds: float, device: torch.device) -> float:
    """Best FLOP/s of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()  # lazy library init and thread-pool start are not part of the ceiling
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = max(best, flops / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return round(best / 1e9, 1)


def _ceiling_kernels(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[Callable[[], Any], float]]:
    """Dense kernels whose best rate bounds what the graphs can reach: a matmul and a 3x3 convolution
    (different libraries: on AMD CPUs MKL's sgemm can trail oneDNN's convolutions), each with its FLOPs."""
    import torch
    import torch.nn.functional as F

    n, c, hw = 2048, 256, 64
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    x = torch.randn(1, c, hw, hw, device=device).to(dtype)
    w = torch.randn(c, c, 3, 3, device=device).to(dtype)
    kernels: dict[str, tuple[Callable[[], Any], float]] = {
        f"matmul {n}x{n}": (lambda: a @ b, 2.0 * n**3),
        f"conv3x3 {c}->{c} at {hw}x{hw}": (lambda: F.conv2d(x, w, padding=1), 2.0 * c * c * 9 * hw * hw),
    }
    return kernels


def measured_gemm_peak(device: str = "cpu", dtype: str = "float32", seconds: float = 1.0) -> dict[str, Any]:
    """The best FLOP/s of large dense kernels on ``device`` in ``dtype``: the practical ceiling.

    With ``torch.no_grad`` and the same thread count as the benchmark; ``kernels`` keeps each kernel's rate.
    """
    import torch

    dev = torch.device(device)
    kernels = _ceiling_kernels(dev, getattr(torch, dtype))
    with torch.no_grad():
        rates = {
            name: _best_gflops(fn, flops, seconds / len(kernels), dev)
            for name, (fn, flops) in kernels.items()
        }
    return {
        "device": str(dev),
        "dtype": dtype,
        "gflops": max(rates.values()),
        "kernels": rates,
        "how": f"best of each kernel over ~{seconds / len(kernels):g} s, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def achieved_gflops(flops: int, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")
