"""The embeddable API: ``Upscaler(bundle_dir)(image, SamplingOptions(steps=..., seed=...))``.

    from esrdf.config import SamplingOptions
    from esrdf.runtime import Upscaler
    upscaler = Upscaler("bundle/")                  # backend="auto": OpenVINO bf16 where the CPU has it
    hr = upscaler(lr_uint8_hwc, SamplingOptions(steps=20, seed=0))   # numpy HxWx3 uint8 in, numpy out
    hr_pil = upscaler(pil_image)                                     # PIL in, PIL out; default sampling

``backend="auto"`` (the default) opens the engine ``esrdf.runtime.backend_choice`` names for this machine
and ``precision`` (None: that backend's best that meets the parity bars); ``choice`` says what was picked
and why. An explicit backend is used as given.

Thread safety: an ``Upscaler`` is immutable after construction. Each call keeps its state (tiles, noise,
the sampler's x_t) in locals; the onnxruntime engine builds a fresh IOBinding per engine call and the
OpenVINO engine takes an infer request per call from a pool, so several threads may call one
``Upscaler`` at once. There is no global state: two Upscalers with different
bundles or settings coexist in one process.

On CUDA (torch or tensorrt backends) each batch of tiles runs as one CUDA-graph replay of the whole sampler
loop: the ``Upscaler`` asks its engine for that hook (``esrdf.runtime.engine.BatchSamplerSource``), so the
runtime itself never imports torch. The graphs share static buffers, so calls to one such ``Upscaler``
take turns on the graph sampler's lock; a service that wants concurrency on one GPU makes one
``Upscaler`` per worker. ``cuda_graph=False`` runs the same loop as plain stream execution.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import overload

import numpy as np
from PIL import Image

from esrdf.config import ResolvedSampling, SamplingOptions
from esrdf.runtime.backend_choice import AUTO, BackendChoice, resolve_backend
from esrdf.runtime.backends import open_engine
from esrdf.runtime.bundle import Bundle, BundleError, Manifest, load_bundle
from esrdf.runtime.driver import ProgressFn, fixed_shape, upscale_array
from esrdf.runtime.engine import BatchSamplerFactory, BatchSamplerSource, Engine
from esrdf.runtime.images import from_model_range, pil_to_array, to_model_range
from esrdf.runtime.sampling import StepPlan, plan_steps


class Upscaler:
    """A loaded bundle and an open engine; call it on images."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        backend: str = AUTO,
        device: str = "cpu",
        precision: str | None = None,
        threads: int | None = None,
        tile: int | None = None,
        overlap: int | None = None,
        batch: int | None = None,
        verify: bool = True,
        cuda_graph: bool = True,
    ) -> None:
        self.bundle: Bundle = load_bundle(bundle_dir, verify=verify)
        if self.manifest.value_range != [-1.0, 1.0] or self.manifest.channels != 3:
            raise BundleError(
                f"{bundle_dir}: graphs for {self.manifest.channels} channels in {self.manifest.value_range}; "
                "this runtime upscales RGB images in [-1, 1]"
            )
        self.choice: BackendChoice = resolve_backend(backend, device, precision, self.bundle)
        self.engine: Engine = open_engine(
            self.bundle, self.choice.backend, device, self.choice.precision, threads
        )
        fixed_batch, fixed_tile = fixed_shape(self.manifest)
        exported = self.manifest.export
        self.tile = _first_given(tile, fixed_tile, exported.tile)
        # An engine may prefer a batch of its own where the graphs leave it free: OpenVINO on the CPU runs
        # best at 1 tile per call (esrdf.engines.openvino_engine.PREFERRED_BATCH), else the export's batch.
        preferred = getattr(self.engine, "preferred_batch", None)
        self.batch = _first_given(batch, fixed_batch, preferred, exported.batch)
        # Default seam: 1/8 of the tile (8 LR pixels for 64-pixel tiles); work grows as 1/(tile - overlap)^2.
        self.overlap = 0 if self.tile == 0 else (self.tile // 8 if overlap is None else overlap)
        if self.tile and not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile={self.tile}), got {overlap}")
        # CUDA engines sample each batch as one graph replay, at one fixed batch (one graph per key).
        self._batches: BatchSamplerFactory | None = None
        if isinstance(self.engine, BatchSamplerSource):
            channels = self.manifest.channels
            self._batches = self.engine.batch_sampler_factory(channels, self.scale, self.batch, cuda_graph)

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def scale(self) -> int:
        return self.manifest.scale

    def sampling(self, options: SamplingOptions | None = None) -> ResolvedSampling:
        """``options`` with what they leave out filled (``SamplingOptions.resolve``, for this schedule)."""
        return (options or SamplingOptions()).resolve(self.manifest.schedule.timesteps)

    def step_plan(self, options: SamplingOptions | None = None) -> StepPlan:
        """The per-step coefficients of ``options``; ``ValueError`` for a bad sampler, steps or eta."""
        s = self.sampling(options)
        return plan_steps(self.manifest.schedule.array(), s.sampler, s.steps, s.eta)

    def upscale_array(
        self,
        lr: np.ndarray,
        options: SamplingOptions | None = None,
        injected_noise: Sequence[np.ndarray] | None = None,
        progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """(C, h, w) float32 in [-1, 1] -> (C, scale*h, scale*w) float32 in [-1, 1]."""
        sampling = self.sampling(options)
        plan = plan_steps(self.manifest.schedule.array(), sampling.sampler, sampling.steps, sampling.eta)
        return upscale_array(
            self.engine,
            self.manifest,
            lr,
            plan,
            seed=sampling.seed,
            tile=self.tile,
            overlap=self.overlap,
            batch=self.batch,
            injected_noise=injected_noise,
            progress=progress,
            sampler=self._batches,
        )

    @overload
    def __call__(
        self, image: np.ndarray, options: SamplingOptions | None = ..., progress: ProgressFn | None = ...
    ) -> np.ndarray: ...

    @overload
    def __call__(
        self, image: Image.Image, options: SamplingOptions | None = ..., progress: ProgressFn | None = ...
    ) -> Image.Image: ...

    def __call__(
        self,
        image: np.ndarray | Image.Image,
        options: SamplingOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> np.ndarray | Image.Image:
        """Upscale HxWx3 uint8 (or a PIL image) by ``scale``; the same options give the same image."""
        rgb = pil_to_array(image) if isinstance(image, Image.Image) else _check_rgb(image)
        hr = self.upscale_array(to_model_range(rgb), options, progress=progress)
        out = from_model_range(hr)
        return Image.fromarray(out) if isinstance(image, Image.Image) else out


def _first_given(*candidates: int | None) -> int:
    """The first candidate that is not None: the caller's, the graphs' fixed size, then the export's."""
    return next(c for c in candidates if c is not None)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"expected a HxWx3 uint8 array or a PIL image, got {got}")
    return image
