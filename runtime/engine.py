"""The one small protocol every executable engine satisfies: onnxruntime, TensorRT, and eager torch.

The protocol belongs to the runtime that drives engines; ``esrdf.engines`` implements it, and the runtime
opens one by name through ``esrdf.runtime.backends`` without importing any engine module up front.
The runtime drives any of them the same way; it never knows which it has. Arrays live wherever the engine
keeps them (numpy for onnxruntime on the CPU, torch tensors for torch and TensorRT); ``upload`` and
``download`` cross that boundary, so the sampler loop never copies between steps.

The driver samples each batch of tiles through a narrow hook, ``BatchSampler``: LR tiles in, HR tiles out,
closed over everything else it needs. By default that is the driver's own loop of engine calls
(``esrdf.runtime.driver.engine_batches``); an engine that can run a whole batch as one unit (the CUDA
engines, which capture the loop in a CUDA graph) offers its own through ``BatchSamplerSource``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np

from esrdf.runtime.bundle import BundleError
from esrdf.runtime.sampling import StepPlan
from esrdf.runtime.tiling import Tile


class EngineError(RuntimeError):
    """An engine that cannot be opened here: missing library, missing device, or an unusable graph."""


def load_failure(path: str | os.PathLike[str], exc: BaseException) -> EngineError:
    """One line naming the engine file that would not load, and the library's first line of why.

    Libraries raise their own types (onnxruntime's ``InvalidProtobuf``, TensorRT's ``None`` engine,
    safetensors' ``SafetensorError``) with multi-line texts; every engine reports them in this one form.
    """
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    reason = f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__
    return EngineError(
        f"{os.fspath(path)}: cannot be loaded by this engine ({reason}); the file is corrupt or was "
        "written by an incompatible exporter: re-export the bundle"
    )


@contextmanager
def loading_engine_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Wrap an engine's read of one graph, plan or weights file: any failure becomes ``load_failure``.

    The one place every engine (onnxruntime, torch, TensorRT, OpenVINO) turns a library's load error into
    the runtime's ``EngineError``, so the CLI and services report all of them the same way.
    """
    try:
        yield
    except (EngineError, BundleError):  # already one line, with its own hint (e.g. rebuild a stale plan)
        raise
    except Exception as exc:  # the libraries' error types differ per engine and per version
        raise load_failure(path, exc) from exc


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


NoiseFn = Callable[[int, Tile], np.ndarray]  # (noise index, tile) -> (C, tile_h*s, tile_w*s); 0 is x_T
Tick = Callable[[], None]  # one engine call's worth of progress
# (B, C, th, tw) LR tiles and their B tiles -> (B, C, th*s, tw*s) HR tiles (coarse + sampled residual)
BatchSampler = Callable[[np.ndarray, Sequence[Tile]], np.ndarray]
# A request's plan, noise and progress -> the hook that samples that request's batches
BatchSamplerFactory = Callable[[StepPlan, NoiseFn, Tick], BatchSampler]


@runtime_checkable
class BatchSamplerSource(Protocol):
    """An engine that runs a whole batch (predictor, N steps, c + x) as one unit, e.g. one CUDA graph."""

    def batch_sampler_factory(
        self, channels: int, scale: int, batch: int, use_graphs: bool = True
    ) -> BatchSamplerFactory | None:
        """Hooks that run every call at exactly ``batch`` tiles (one graph per shape); None: use the driver's
        own loop of engine calls here (e.g. the engine is on the CPU)."""
        ...
