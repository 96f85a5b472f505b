"""The two Triton models ``esrdf-serve`` binds through PyTriton, and their I/O contract.

Design (whole image in front, tiles behind):

    client --image--> "esrdf" (one instance per concurrent image; no batching: images differ in size)
                         | the driver tiles, pads and blends (serving.tile_batch.upscale_via_tiles);
                         | each batch of LR tiles goes to the tile model over loopback gRPC
                         v
                      "esrdf_tiles" (dynamic batching; one instance per worker, each with its own engine)
                         tiles of different requests, seeds and sizes merge into one engine batch;
                         rows sharing (steps, sampler, eta, prior) run as one pass of predictor + N steps

Clients send whole images to ``esrdf``; ``esrdf_tiles`` is also public, for clients that tile themselves.
Its rows carry their request's seed and their corner in that request's padded LR canvas, so a tile's noise
is the same window of the same field the in-process runtime draws (esrdf.runtime.noise): a request's
output equals ``Upscaler(bundle)(image, options)`` up to how the engine rounds differently batched rows
(same bytes when the batches are the same; see tests/test_serve.py).

``esrdf`` inputs (no batch dimension): ``image`` UINT8 [H, W, 3]; optional ``seed`` UINT64 [1] (default 0),
``steps`` INT32 [1], ``sampler`` BYTES [1] ("ddim" | "ddpm"), ``eta`` FP32 [1], ``prior`` BYTES [1]
("matched" | "paper"); each one left out (or steps 0) is the bundle's sampling default. Output: ``image``
UINT8 [scale*H, scale*W, 3].

``esrdf_tiles`` inputs per row: ``lr`` FP32 [C, tile, tile] in [-1, 1], ``corner`` INT64 [2] (LR canvas
y0, x0), ``seed`` UINT64 [1], ``steps`` INT32 [1], ``sampler`` BYTES [1], ``eta`` FP32 [1], ``prior`` BYTES
[1] (all given: tiles carry resolved options). Output: ``hr``
FP32 [C, scale*tile, scale*tile] (coarse + sampled residual, not yet clipped or blended).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from esrdf.config import ResolvedSampling, SamplingOptions
from esrdf.runtime.driver import engine_batches
from esrdf.runtime.engine import BatchSamplerFactory, BatchSamplerSource
from esrdf.runtime.images import DEFAULT_MAX_PIXELS, from_model_range, to_model_range
from esrdf.runtime.serving.tile_batch import PlanCache, SeededTile, sample_tile_rows, upscale_via_tiles
from esrdf.runtime.upscaler import Upscaler

IMAGE_MODEL = "esrdf"
TILE_MODEL = "esrdf_tiles"
Requests = Sequence[Any]  # pytriton.proxy.types.Request: a mapping of input name -> array
Responses = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class ImageRequest:
    """A decoded ``esrdf`` request."""

    rgb: np.ndarray  # H x W x 3 uint8
    options: SamplingOptions  # what the request gives; the rest comes from the bundle's sampling defaults


def _scalar(request: Any, name: str) -> Any:
    """The one value of an optional input, or None when the request leaves it out."""
    if name not in request:
        return None
    value = np.asarray(request[name]).reshape(-1)
    if value.size != 1:
        raise ValueError(f"input {name!r} must hold one value, got shape {np.shape(request[name])}")
    item = value[0]
    return item.decode() if isinstance(item, bytes) else item.item()


def decode_image_request(request: Any) -> ImageRequest:
    """Validate one ``esrdf`` request; ``ValueError`` with a message a client can act on."""
    rgb = np.asarray(request["image"])
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"input 'image' must be UINT8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    names = ("sampler", "steps", "eta", "seed", "prior")
    sampler, steps, eta, seed, prior = (_scalar(request, n) for n in names)
    options = SamplingOptions(
        sampler=None if sampler is None else str(sampler),
        steps=(int(steps) or None) if steps is not None else None,  # 0 or absent: the bundle's default
        eta=None if eta is None else float(eta),
        seed=None if seed is None else int(seed),
        prior=None if prior is None else str(prior),
    )
    return ImageRequest(np.ascontiguousarray(rgb), options)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TileModel:
    """One ``esrdf_tiles`` instance: a worker's engine sampling merged tile rows (``sample_tile_rows``)."""

    def __init__(self, upscaler: Upscaler, max_batch: int, cuda_graph: bool = True) -> None:
        self.upscaler = upscaler
        self.plans = PlanCache(upscaler.manifest.schedule.array())
        engine, m = upscaler.engine, upscaler.manifest
        graphs = None
        if cuda_graph and isinstance(engine, BatchSamplerSource):
            # This worker's own graph sampler (its static buffers are per worker). One CUDA graph per plan
            # at a fixed batch: every pass is padded to max_batch rows.
            graphs = engine.batch_sampler_factory(m.channels, m.scale, max_batch)
        self._sampler: BatchSamplerFactory = graphs or functools.partial(engine_batches, engine)

    def __call__(self, requests: Requests) -> Responses:
        sizes = [len(r["lr"]) for r in requests]
        lr = np.concatenate([np.asarray(r["lr"], dtype=np.float32) for r in requests])
        column = {
            n: np.concatenate([np.asarray(r[n]) for r in requests])
            for n in ("corner", "seed", "steps", "sampler", "eta", "prior")
        }
        rows = [
            SeededTile(int(y), int(x), int(s))
            for (y, x), s in zip(column["corner"], column["seed"][:, 0], strict=True)
        ]
        options = [
            ResolvedSampling(_text(s), int(n), float(e), row.seed, _text(p))
            for n, s, e, p, row in zip(
                column["steps"][:, 0], column["sampler"][:, 0], column["eta"][:, 0], column["prior"][:, 0],
                rows, strict=True,
            )
        ]  # fmt: skip
        hr = sample_tile_rows(self.upscaler.manifest, lr, rows, options, self.plans, self._sampler)
        return [{"hr": part} for part in np.split(hr, np.cumsum(sizes)[:-1])]


class ImageModel:
    """One ``esrdf`` instance: decodes a request, tiles it with the driver, sends tiles to ``esrdf_tiles``.

    ``tile_client_factory`` opens this instance's client of the tile model (pytriton's ``ModelClient``,
    which is not thread-safe: PyTriton runs each instance in its own thread, so each opens its own).
    """

    def __init__(
        self,
        reference: Upscaler,
        tile_client_factory: Callable[[], Any],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.manifest = reference.manifest
        self.tile, self.overlap, self.batch = reference.tile, reference.overlap, reference.batch
        self.max_pixels = max_pixels
        self.plans = PlanCache(self.manifest.schedule.array())
        self._client_factory = tile_client_factory
        self._client: Any = None  # opened in this instance's thread, on its first request

    def _tile_client(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def upscale(self, req: ImageRequest) -> np.ndarray:
        height, width = req.rgb.shape[:2]
        if height * width > self.max_pixels:
            raise ValueError(
                f"image has {height * width:,} pixels, over this server's limit of {self.max_pixels:,}"
            )
        o = req.options.resolve(self.manifest.schedule.timesteps, self.manifest.sampling_defaults())
        self.plans.plan(o)  # bad options fail here, before any tile is sent

        def send(lr_tiles: np.ndarray, corners: np.ndarray) -> np.ndarray:
            n = len(lr_tiles)
            result = self._tile_client().infer_batch(
                lr=lr_tiles, corner=corners, seed=np.full((n, 1), o.seed, dtype=np.uint64),
                steps=np.full((n, 1), o.steps, dtype=np.int32),
                sampler=np.full((n, 1), o.sampler.encode(), dtype=object),
                eta=np.full((n, 1), o.eta, dtype=np.float32),
                prior=np.full((n, 1), o.prior.encode(), dtype=object),
            )  # fmt: skip
            return np.asarray(result["hr"], dtype=np.float32)

        hr = upscale_via_tiles(
            self.manifest, to_model_range(req.rgb), send, self.tile, self.overlap, self.batch
        )
        return from_model_range(hr)

    def __call__(self, requests: Requests) -> Responses:
        return [{"image": self.upscale(decode_image_request(r))} for r in requests]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
