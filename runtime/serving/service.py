"""``UpscalerService``: the runtime as a component of a multi-threaded service.

    from esrdf.config import SamplingOptions
    from esrdf.runtime.serving.service import ServiceConfig, UpscalerService
    with UpscalerService("bundle/", ServiceConfig(workers=2, queue_size=32)) as service:
        future = service.submit(rgb_uint8, SamplingOptions(steps=20))  # any thread; never blocks on work
        hr = future.result()                                           # or service.upscale(...) inline

- **Pool.** ``workers`` threads, each owning one ``Upscaler`` (its own engine: by default ``backend="auto"``,
  OpenVINO bf16 or onnxruntime on the CPU, with the machine's cores split between workers; on CUDA its
  own engine and ``CudaGraphSampler``,
  whose static buffers must not be shared). Requests are sampled by the runtime's driver, unchanged.
- **Bounded queue, back-pressure.** At most ``queue_size`` requests wait. When it is full, ``submit``
  either rejects at once (``on_full="reject"``) or waits up to ``block_timeout_s`` for room
  (``on_full="block"``); both end in ``QueueFull``, so a caller (or an HTTP layer: 429/503) can tell
  overload from failure.
- **Request-scoped state.** A request's image, options, tiles and noise live in the call; workers keep
  nothing between requests but their engine, so memory stays flat over any number of requests
  (tests/test_service.py measures RSS over hundreds).
- **Errors are per request.** What can be checked cheaply (array type, dtype, shape, size; steps,
  sampler, eta) fails in ``submit`` as ``InvalidRequest``. Anything that fails while a worker processes a
  request (a PIL image that turns out truncated when decoded, an engine error) is set on that request's
  future as ``RequestFailed`` with the cause chained; the worker goes on with the next request.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from esrdf.config import SamplingOptions
from esrdf.runtime.images import DEFAULT_MAX_PIXELS
from esrdf.runtime.upscaler import Upscaler

OnFull = Literal["reject", "block"]


class ServiceError(RuntimeError):
    """Base of the service's own errors."""


class QueueFull(ServiceError):
    """Back-pressure: the request queue is full (at once, or after ``block_timeout_s``); retry later."""


class ServiceClosed(ServiceError):
    """The service was closed; it takes no new requests."""


class InvalidRequest(ServiceError, ValueError):
    """The request itself is wrong (image or options); retrying it will not help."""


class RequestFailed(ServiceError):
    """The request failed while being processed; ``__cause__`` holds the underlying error."""


@dataclass(frozen=True)
class ServiceConfig:
    """Pool, queue and engine settings. ``threads_per_worker=None`` splits the CPU cores between workers."""

    workers: int = 2
    queue_size: int = 32
    on_full: OnFull = "reject"
    block_timeout_s: float = 5.0
    threads_per_worker: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS  # LR pixels per request
    backend: str = (
        "auto"  # esrdf.runtime.backend_choice: OpenVINO bf16 where the CPU has it, else onnxruntime
    )
    device: str = "cpu"
    precision: str | None = None  # None: the backend's best that meets the parity bars
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1 or self.queue_size < 1:
            raise ValueError(f"workers and queue_size must be >= 1, got {self.workers}, {self.queue_size}")
        if self.on_full not in ("reject", "block"):
            raise ValueError(f"on_full must be 'reject' or 'block', got {self.on_full!r}")
        if self.block_timeout_s < 0:
            raise ValueError(f"block_timeout_s must be >= 0, got {self.block_timeout_s}")

    def worker_threads(self) -> int | None:
        """Intra-op threads of each worker's engine (CPU engines only; CUDA engines and torch take none)."""
        if self.device != "cpu" or self.backend not in ("auto", "onnxruntime", "openvino"):
            return None
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // self.workers)


def open_upscalers(bundle_dir: str | os.PathLike[str], config: ServiceConfig) -> list[Upscaler]:
    """One ``Upscaler`` (own engine; on CUDA own graph sampler) per worker, sharing the CPU cores.

    The bundle's hashes are checked once; the other workers reuse the verified files.
    """
    c = config
    return [
        Upscaler(
            bundle_dir,
            c.backend,
            c.device,
            c.precision,
            c.worker_threads(),
            c.tile,
            c.overlap,
            c.batch,
            verify=(i == 0),
            cuda_graph=c.cuda_graph,
        )  # fmt: skip
        for i in range(c.workers)
    ]


@dataclass(frozen=True)
class ServiceStats:
    submitted: int  # accepted into the queue
    rejected: int  # QueueFull
    completed: int
    failed: int  # RequestFailed
    queued: int  # waiting now


@dataclass(frozen=True)
class _Request:
    id: int
    image: np.ndarray | Image.Image
    options: SamplingOptions
    future: Future[Any]


_STOP = None  # queue sentinel: one per worker on close


class UpscalerService:
    """A pool of ``Upscaler`` workers behind a bounded queue; ``submit`` from any number of threads."""

    def __init__(
        self, bundle_dir: str | os.PathLike[str], config: ServiceConfig | None = None, start: bool = True
    ) -> None:
        self.config = c = config or ServiceConfig()
        # Engines open here, in the caller's thread, so a bad bundle fails the constructor, not a worker.
        self.upscalers = open_upscalers(bundle_dir, c)
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=c.queue_size)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._counts = {"submitted": 0, "rejected": 0, "completed": 0, "failed": 0}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(u,), name=f"esrdf-worker-{i}", daemon=True)
            for i, u in enumerate(self.upscalers)
        ]
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the workers (``start=False`` lets a caller queue requests or warm up first)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for t in self._threads:
            t.start()

    def submit(self, image: np.ndarray | Image.Image, options: SamplingOptions | None = None) -> Future[Any]:
        """Queue one request; its future gives what ``Upscaler.__call__`` would (array in, array out).

        Raises ``InvalidRequest`` for a bad image or options, ``QueueFull`` under back-pressure and
        ``ServiceClosed`` after ``close``.
        """
        options = options or SamplingOptions()
        self._validate(image, options)
        future: Future[Any] = Future()
        request = _Request(next(self._ids), image, options, future)
        with self._lock:
            if self._closed:
                raise ServiceClosed("the service is closed")
        try:
            if self.config.on_full == "reject":
                self._queue.put_nowait(request)
            else:
                self._queue.put(request, timeout=self.config.block_timeout_s)
        except queue.Full:
            self._count("rejected")
            waited = (
                "" if self.config.on_full == "reject" else f" after waiting {self.config.block_timeout_s} s"
            )
            raise QueueFull(
                f"request queue full ({self.config.queue_size} waiting){waited}; retry later"
            ) from None
        self._count("submitted")
        return future

    def upscale(
        self,
        image: np.ndarray | Image.Image,
        options: SamplingOptions | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``submit(...).result(timeout)``: wait for this request's output (or its error)."""
        return self.submit(image, options).result(timeout)

    def stats(self) -> ServiceStats:
        with self._lock:
            return ServiceStats(**self._counts, queued=self._queue.qsize())

    def close(self, cancel_pending: bool = False) -> None:
        """Stop taking requests, finish (or cancel) the queued ones, and join the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if cancel_pending:
            self._cancel_queued()
        if not self._started:
            self.start()  # queued requests still get an answer (a result, or CancelledError)
        for _ in self._threads:
            self._queue.put(_STOP)  # blocks only while the queue is full of work the workers are draining
        for t in self._threads:
            t.join()
        self._cancel_queued()  # a submit that raced with close() found no worker left: it gets cancelled

    def __enter__(self) -> UpscalerService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel_queued(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.future.cancel()

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _validate(self, image: object, options: SamplingOptions) -> None:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
                raise InvalidRequest(f"expected a HxWx3 uint8 image, got {image.dtype} {image.shape}")
            pixels = image.shape[0] * image.shape[1]
        elif isinstance(image, Image.Image):
            pixels = image.width * image.height  # decoded (and perhaps found corrupt) by the worker
        else:
            raise InvalidRequest(f"expected a HxWx3 uint8 array or a PIL image, got {type(image).__name__}")
        if pixels > self.config.max_pixels:
            raise InvalidRequest(f"image has {pixels:,} pixels, over the limit of {self.config.max_pixels:,}")
        seed = self.upscalers[0].sampling(options).seed
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise InvalidRequest(f"seed must be an integer in [0, 2**64), got {seed!r}")
        try:
            self.upscalers[0].step_plan(options)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def _work(self, upscaler: Upscaler) -> None:
        while True:
            request = self._queue.get()
            if request is _STOP:
                return
            if not request.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = upscaler(request.image, request.options)
            except Exception as exc:  # noqa: BLE001 - any failure belongs to this request alone
                error = RequestFailed(f"request {request.id} failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                self._count("failed")
                request.future.set_exception(error)
            else:
                self._count("completed")
                request.future.set_result(result)
            finally:
                del request  # drop the image and result references before blocking on the next get
