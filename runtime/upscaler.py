"""The embeddable API: ``Upscaler(bundle_dir)(image, SamplingOptions(steps=..., seed=...))``.

    from esrdf.config import SamplingOptions
    from esrdf.runtime import Upscaler
    upscaler = Upscaler("bundle/")                  # backend="auto": OpenVINO bf16 where the CPU has it
    hr = upscaler(lr_uint8_hwc, SamplingOptions(steps=20, seed=0))   # numpy HxWx3 uint8 in, numpy out
    hr_pil = upscaler(pil_image)                                     # PIL in, PIL out; the bundle's sampling

What a call's ``SamplingOptions`` leave out comes from the bundle's sampling defaults (its manifest's
``sampling`` section: sampler, steps, eta and the x_T prior), then from the built-in rule.

What goes in comes out as the same kind (``esrdf.runtime.images.Picture``): numpy (H, W), (H, W, 3) and
(H, W, 4) arrays of uint8 or uint16, and PIL images of modes L, LA, RGB, RGBA and I;16 (P, CMYK and the
rest come back as RGB, or RGBA where a palette has transparency). The model sees RGB: a gray image runs
on its replicated channels and comes back as the mean of the output channels; alpha is upscaled apart,
bicubic; uint16 stays 16-bit through the float path. Float arrays are refused (``TypeError`` naming the
accepted kinds).

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
from PIL import Image, ImageOps

from esrdf.config import ResolvedSampling, SamplingOptions
from esrdf.runtime.backend_choice import AUTO, BackendChoice, resolve_backend
from esrdf.runtime.backends import open_engine
from esrdf.runtime.bundle import Bundle, BundleError, Manifest, load_bundle
from esrdf.runtime.driver import ProgressFn, fixed_shape, upscale_array
from esrdf.runtime.engine import BatchSamplerFactory, BatchSamplerSource, Engine, loading_engine_file
from esrdf.runtime.images import (
    Picture,
    from_model_range,
    picture_from_pil,
    picture_to_pil,
    to_model_range,
)
from esrdf.runtime.preflight import resolve_tiling
from esrdf.runtime.sampling import StepPlan, plan_for


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
        # OpenVINO's bf16 runs the fp32 graphs; the bundle must hold the graphs the engine reads.
        graphs = "fp32" if self.choice.precision == "bf16" else self.choice.precision
        if self.choice.backend == "torch":  # the eager engine runs the bundle's weights, not its graphs
            graphs = None
        # Settings the graphs cannot take fail here, once, before the engine loads (RunSettingsError).
        self.tile, self.overlap, self.batch = resolve_tiling(self.bundle, graphs, tile, overlap, batch)
        with loading_engine_file(self.bundle.root):  # any engine's stray load error: one line
            self.engine: Engine = open_engine(
                self.bundle, self.choice.backend, device, self.choice.precision, threads
            )
        # An engine may prefer a batch of its own where the graphs leave it free: OpenVINO on the CPU runs
        # best at 1 tile per call (esrdf.engines.openvino_engine.PREFERRED_BATCH), else the export's batch.
        preferred = getattr(self.engine, "preferred_batch", None)
        if batch is None and fixed_shape(self.manifest)[0] is None and preferred is not None:
            self.batch = preferred
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
        """``options`` with what they leave out filled: from the bundle's sampling defaults, then by the
        built-in rule (``SamplingOptions.resolve``, for this schedule)."""
        defaults = self.manifest.sampling_defaults()
        return (options or SamplingOptions()).resolve(self.manifest.schedule.timesteps, defaults)

    def step_plan(self, options: SamplingOptions | None = None) -> StepPlan:
        """The per-step coefficients and x_T std of ``options``; ``ValueError`` for a bad sampler, steps, eta
        or prior."""
        return plan_for(self.manifest.schedule.array(), self.sampling(options))

    def upscale_array(
        self,
        lr: np.ndarray,
        options: SamplingOptions | None = None,
        injected_noise: Sequence[np.ndarray] | None = None,
        progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """(C, h, w) float32 in [-1, 1] -> (C, scale*h, scale*w) float32 in [-1, 1]."""
        sampling = self.sampling(options)
        plan = plan_for(self.manifest.schedule.array(), sampling)
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

    def upscale_picture(
        self, picture: Picture, options: SamplingOptions | None = None, progress: ProgressFn | None = None
    ) -> Picture:
        """A ``Picture`` upscaled by ``scale``, the same kind: colour through the model (16 bits kept through
        the float path), alpha upscaled apart with bicubic (Real-ESRGAN does the same), gray kept gray."""
        hr = self.upscale_array(to_model_range(picture.color), options, progress=progress)
        color = from_model_range(hr, picture.color.dtype.type)
        alpha = None if picture.alpha is None else upscale_alpha(picture.alpha, self.scale)
        return Picture(color, alpha, picture.gray)

    def tile_count(self, height: int, width: int) -> int:
        """How many tiles an LR image of this size is cut into (progress reports count them)."""
        from esrdf.runtime.tiling import plan_tiles

        return len(plan_tiles(height, width, self.tile, self.overlap, self.manifest.lr_multiple_of).tiles)

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
        """Upscale an image by ``scale`` and return the same kind (module docstring); the same options give
        the same image."""
        if isinstance(image, Image.Image):
            upright = ImageOps.exif_transpose(image)  # as files are read (``load_picture``)
            return picture_to_pil(self.upscale_picture(picture_from_pil(upright), options, progress))
        return picture_to_array(self.upscale_picture(array_to_picture(image), options, progress))


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """HxW alpha (uint8 or uint16) -> (scale*H)x(scale*W), bicubic on floats, clipped, same dtype."""
    h, w = alpha.shape
    plane = Image.fromarray(alpha.astype(np.float32), mode="F").resize(
        (w * scale, h * scale), Image.Resampling.BICUBIC
    )
    top = np.iinfo(alpha.dtype).max
    return np.clip(np.rint(np.asarray(plane)), 0, top).astype(alpha.dtype)


ACCEPTED_ARRAYS = "(H, W), (H, W, 3) or (H, W, 4) uint8 or uint16 arrays, or PIL images"


def array_to_picture(image: np.ndarray) -> Picture:
    """(H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, uint8 or uint16 -> ``Picture``; else ``TypeError``."""
    ok_shape = isinstance(image, np.ndarray) and (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
    )
    if not ok_shape or image.dtype not in (np.uint8, np.uint16):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"expected HxWx3 uint8 or another of {ACCEPTED_ARRAYS}; got {got}")
    if image.ndim == 2:
        return Picture(np.repeat(image[..., None], 3, axis=-1), None, gray=True)
    color = np.ascontiguousarray(image[..., :3])
    return Picture(color, np.ascontiguousarray(image[..., 3]) if image.shape[2] == 4 else None)


def picture_to_array(picture: Picture) -> np.ndarray:
    """The inverse of ``array_to_picture``: (H, W), (H, W, 3) or (H, W, 4), of the picture's dtype."""
    if picture.gray:
        return picture.gray_plane()
    if picture.alpha is not None:
        return np.ascontiguousarray(np.dstack([picture.color, picture.alpha]))
    return picture.color
