"""The whole sampler loop for a batch of tiles as one CUDA graph (README, "The GPU path").

One request for a batch of LR tiles is (paper Section 3 with the residual formulation of Section 4)

    c = predictor(lr);  x = s z_0;  x = step(x, c, t_k, coefs_k, z_{k+1}) for k < N;  out = c + x

(s: ``StepPlan.init_noise_std``, the x_T scale), which is 1 + N engine calls of fixed shapes.
``CudaGraphSampler`` captures all of it, for one shape key (batch, tile, steps, sampler, eta, noise mode),
in one ``torch.cuda.CUDAGraph`` after a warm-up on a side stream, and replays it per request.

What the graph covers, and what it does not:
- Inside: device noise (all N + 1 fields of all B tiles, ``esrdf.engines.torch_noise``), x_T's scale, the
  predictor, the N steps and ``c + x`` into a static output. One ``replay()`` launches all of it.
- Outside, in Python, per request: the copy-in of the LR tiles, the seed and the tiles' offsets (and, for
  host noise, the fields) from pinned host staging buffers into the static device buffers, with
  ``non_blocking`` copies on the stream; and the copy-out of the HR tiles into pinned staging, one
  synchronise, then a numpy copy. Tiling, blending and the uint8 conversion stay in the runtime on the host.

- Static buffers are allocated once per key and owned, with the graph, by one cache entry: evicting or
  reallocating them drops the graph, so a graph never outlives the buffers it was captured on. The
  engine's ``buffers_generation`` (TensorRT bumps it when it reallocates activation memory) is checked
  on every replay too.
- Noise: a seeded request (the driver's ``SeededNoise``) draws its fields on the device from a seed and
  the tiles' offsets, so nothing but the tiles crosses PCIe; injected noise (parity runs) is copied from the
  host (``noise="host"``). Both give the same fields (``esrdf.engines.torch_noise``).
- Captures are serialised process-wide (``torch.cuda.graph``'s capture empties the allocator cache and
  synchronises), run on the warm-up's side stream with ``capture_error_mode="thread_local"``, so another
  thread's CUDA calls cannot invalidate them. A failed capture is logged and counted (``status()``); that
  request runs as stream execution and a later request retries, after 1, 2, 4, ... requests (at most
  ``MAX_RETRY_INTERVAL``), so a transient failure does not leave the key 3x slower for good.
- Replay is bit-exact with stream execution of the same loop on the same inputs (tests/test_gpu.py).

Thread safety: one ``CudaGraphSampler`` per worker, each with its own engine. Its lock serialises
``sample`` calls, because every call of a key reuses that key's static buffers. Several threads may share
one sampler (they take turns); for parallel GPU work give each worker its own engine and sampler.

torch is imported only here and in the GPU engines. The runtime never imports this module: the torch and
TensorRT engines offer its hooks through ``batch_sampler_factory`` (``esrdf.runtime.engine``), and the
``Upscaler`` asks its engine for them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from esrdf.engines.torch_noise import as_int64, noise_fields
from esrdf.runtime.driver import fixed_batches
from esrdf.runtime.engine import BatchSampler, BatchSamplerFactory, Engine, NoiseFn, Tick
from esrdf.runtime.noise import SeededNoise
from esrdf.runtime.sampling import StepPlan
from esrdf.runtime.tiling import Tile

log = logging.getLogger(__name__)

NoiseMode = Literal["host", "device"]
DEFAULT_WARMUP = 2  # cuDNN/cuBLAS/TensorRT finish lazy initialisation in the first call; 2 is margin
DEFAULT_MAX_GRAPHS = 8
MAX_RETRY_INTERVAL = 64  # requests between capture retries of a key whose captures keep failing
# One capture at a time in the process: a CUDA-graph capture is process-wide state in the driver and in
# torch's allocator (its __enter__ synchronises and empties the cache), so two workers capturing at once
# would corrupt each other. Module-level because that is the scope of what it guards.
_CAPTURE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ShapeKey:
    """What a captured graph is specialised to; a request with another key gets another graph."""

    batch: int
    lr_height: int
    lr_width: int
    steps: int
    sampler: str
    eta: float
    noise: NoiseMode = "host"

    @classmethod
    def of(cls, lr_shape: Sequence[int], plan: StepPlan, noise: NoiseMode = "host") -> ShapeKey:
        batch, _c, height, width = lr_shape
        return cls(batch, height, width, plan.num_steps, plan.sampler, plan.eta, noise)


@dataclass
class StaticBuffers:
    """Device tensors a graph reads and writes at fixed addresses, plus pinned host staging for copies.

    ``noise[0]`` is x_T's unit noise, ``noise[k]`` the k-th update's (the driver's order; host-noise keys
    only: device-noise keys hold ``seed`` and ``offsets`` instead). ``generation`` counts
    reallocations: a graph captured at another generation points at freed memory and must not replay.
    """

    key: ShapeKey
    channels: int
    scale: int
    device: torch.device
    generation: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    staging: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reallocate()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        k, c, s = self.key, self.channels, self.scale
        hr = (k.batch, c, k.lr_height * s, k.lr_width * s)
        shapes = {
            "lr": (k.batch, c, k.lr_height, k.lr_width),
            "t": (k.steps, k.batch),
            "coefs": (k.steps, k.batch, 3),
            "init_std": (),
            "out": hr,
        }
        if k.noise == "host":
            shapes["noise"] = (k.steps + 1, *hr)
        else:
            shapes |= {"seed": (), "offsets": (2, k.batch)}
        return shapes

    def reallocate(self) -> None:
        """(Re)allocate every buffer; bumps ``generation``, which invalidates graphs captured before."""
        self.tensors, self.staging = {}, {}
        for name, shape in self.shapes().items():
            dtype = torch.int64 if name in ("seed", "offsets") else torch.float32
            self.tensors[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        self.generation += 1

    def _staging(self, name: str) -> torch.Tensor:
        """Pinned host twin of a buffer, made on first use (device-noise keys never stage noise)."""
        if name not in self.staging:
            dev = self.tensors[name]
            # Page-locked, so the copies are true async DMA and need no bounce through pageable memory.
            pinned = self.device.type == "cuda"
            self.staging[name] = torch.zeros(dev.shape, dtype=dev.dtype, pin_memory=pinned)
        return self.staging[name]

    def load(self, name: str, array: np.ndarray) -> None:
        """Host array -> static device buffer, through pinned staging (the copy is ordered on the stream)."""
        host = self._staging(name)
        np.copyto(host.numpy(), np.asarray(array).reshape(host.shape), casting="same_kind")
        self.tensors[name].copy_(host, non_blocking=True)

    def fetch_out(self) -> np.ndarray:
        out = self._staging("out")
        out.copy_(self.tensors["out"], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out.numpy().copy()


def sampler_loop(engine: Engine, bufs: StaticBuffers) -> None:
    """Noise, predictor, N steps and c + x on the static buffers; the body that is captured or run eagerly."""
    b, key = bufs.tensors, bufs.key
    if key.noise == "device":  # (N+1, B, C, H, W) in one pass of a few dozen kernels
        _, _c, height, width = b["out"].shape
        noises = noise_fields(b["seed"], key.steps + 1, b["offsets"], height, width, bufs.channels)
    else:
        noises = b["noise"]
    coarse = engine.predictor(b["lr"])
    x = noises[0] * b["init_std"]  # x_T ~ N(0, s^2 I): s is the bundle's prior (1: the paper's N(0, I))
    for k in range(key.steps):
        x = engine.step(x, coarse, b["t"][k], b["coefs"][k], noises[k + 1])
    torch.add(coarse, x, out=b["out"])


def capture_sampler_graph(engine: Engine, bufs: StaticBuffers, warmup: int = DEFAULT_WARMUP) -> Any:
    """Warm up on a side stream, then capture ``sampler_loop`` on that stream into a CUDA graph.

    Raises what the capture raised (the caller reports it and retries later). Holds the process-wide
    capture lock throughout, so no other thread captures, or warms up into a capture, meanwhile.
    """
    with _CAPTURE_LOCK:
        side = torch.cuda.Stream(bufs.device)
        side.wait_stream(torch.cuda.current_stream(bufs.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                sampler_loop(engine, bufs)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph ends the capture on the way out, also when the body raised. thread_local: only
        # this thread's unsafe CUDA calls (not another worker's) can invalidate the capture.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            sampler_loop(engine, bufs)
        torch.cuda.current_stream(bufs.device).wait_stream(side)
        return graph


@dataclass
class _Entry:
    bufs: StaticBuffers
    graph: Any = None
    captured_at: tuple[int, int] | None = None  # (buffers generation, engine buffers_generation)
    failures: int = 0  # captures of this key that failed in a row
    wait: int = 0  # requests to run as stream execution before the next capture attempt


class CudaGraphSampler:
    """Runs batches of tiles through the whole sampler loop, one CUDA graph per ``ShapeKey``.

    ``use_graphs=False`` (``--no-cuda-graph``) or a non-CUDA device runs the same loop as stream
    execution. At most ``max_graphs`` keys keep buffers and graphs; the least recently used is dropped.
    """

    def __init__(
        self,
        engine: Engine,
        channels: int,
        scale: int,
        device: str | torch.device = "cuda",
        use_graphs: bool = True,
        warmup: int = DEFAULT_WARMUP,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        self.engine = engine
        self.channels, self.scale = channels, scale
        self.device = torch.device(device)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        if use_graphs and not self.use_graphs:
            log.info("CUDA graphs need a CUDA device; %s runs as stream execution", self.device)
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.warmup, self.max_graphs = warmup, max_graphs
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self.capture_failures = 0  # failed captures so far, all keys
        self.last_capture_error: str | None = None
        self._entries: OrderedDict[ShapeKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, key: ShapeKey) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(StaticBuffers(key, self.channels, self.scale, self.device))
            self._entries[key] = entry
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)  # graph and buffers go together
        self._entries.move_to_end(key)
        return entry

    def _generation(self, entry: _Entry) -> tuple[int, int]:
        return entry.bufs.generation, int(getattr(self.engine, "buffers_generation", 0))

    def _capture(self, entry: _Entry) -> None:
        """(Re)capture ``entry``'s graph; on failure log, count, and schedule a retry with back-off."""
        entry.graph = None  # drop a stale graph before anything reallocates under it
        try:
            entry.graph = capture_sampler_graph(self.engine, entry.bufs, self.warmup)
        except Exception as exc:  # any failure: this request still runs, as stream execution
            entry.failures += 1
            entry.wait = min(2 ** (entry.failures - 1), MAX_RETRY_INTERVAL)
            self.capture_failures += 1
            self.last_capture_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "CUDA graph capture failed for %s (%s); this request runs as stream execution, "
                "retrying after %d more request(s)",
                entry.bufs.key,
                self.last_capture_error,
                entry.wait,
            )
            return
        entry.captured_at = self._generation(entry)
        entry.failures = 0
        self.captures += 1

    def _run(self, entry: _Entry) -> np.ndarray:
        with torch.no_grad():
            if self.use_graphs:
                stale = entry.graph is not None and entry.captured_at != self._generation(entry)
                if entry.graph is None or stale:
                    if entry.wait > 0:
                        entry.wait -= 1
                        entry.graph = None
                    else:
                        self._capture(entry)
                if entry.graph is not None:
                    entry.graph.replay()
                    return entry.bufs.fetch_out()
            sampler_loop(self.engine, entry.bufs)
            return entry.bufs.fetch_out()

    def status(self) -> dict[str, Any]:
        """Captures, failed captures, the last capture error and the keys on stream execution (reports)."""
        with self._lock:
            waiting = [str(k) for k, e in self._entries.items() if e.graph is None and e.failures]
        return {
            "captures": self.captures,
            "capture_failures": self.capture_failures,
            "last_capture_error": self.last_capture_error,
            "stream_only_keys": waiting,
        }

    def _load_plan(self, bufs: StaticBuffers, plan: StepPlan) -> None:
        batch = bufs.key.batch
        bufs.load("init_std", np.array(plan.init_noise_std, dtype=np.float32))
        bufs.load("t", np.repeat(plan.t[:, None], batch, axis=1))
        bufs.load("coefs", np.repeat(plan.coefs[:, None, :], batch, axis=1))

    def sample(self, lr_tiles: np.ndarray, noises: np.ndarray, plan: StepPlan) -> np.ndarray:
        """(B, C, h, w) LR tiles, (N+1, B, C, sh, sw) unit noise (x_T's first) -> (B, C, sh, sw) = c + x_0."""
        key = ShapeKey.of(lr_tiles.shape, plan, "host")
        with self._lock:
            entry = self._entry(key)
            bufs = entry.bufs
            if noises.shape != bufs.tensors["noise"].shape:
                raise ValueError(f"noises must be {tuple(bufs.tensors['noise'].shape)}, got {noises.shape}")
            bufs.load("lr", lr_tiles)
            bufs.load("noise", noises)
            self._load_plan(bufs, plan)
            return self._run(entry)

    def sample_seeded(
        self, lr_tiles: np.ndarray, seed: int, offsets: np.ndarray, plan: StepPlan
    ) -> np.ndarray:
        """Like ``sample`` with the noise drawn on the device: field k of tile b is the window of
        ``noise_field(seed, k, ...)`` at HR offsets ``offsets[b] = (y0, x0)``."""
        key = ShapeKey.of(lr_tiles.shape, plan, "device")
        with self._lock:
            entry = self._entry(key)
            entry.bufs.load("lr", lr_tiles)
            entry.bufs.load("seed", np.array(as_int64(seed), dtype=np.int64))
            entry.bufs.load("offsets", np.asarray(offsets, dtype=np.int64).T)
            self._load_plan(entry.bufs, plan)
            return self._run(entry)

    def captured_graph(self, lr_shape: Sequence[int], plan: StepPlan, noise: NoiseMode = "device") -> Any:
        """The captured graph of a key, or None (not captured, or on stream execution): benchmarks time
        its replay alone, the GPU-only time of a request."""
        entry = self._entries.get(ShapeKey.of(lr_shape, plan, noise))
        return None if entry is None else entry.graph

    def clear(self) -> None:
        """Drop every graph with its buffers."""
        with self._lock:
            self._entries.clear()

    def batch_sampler(self, plan: StepPlan, noise: NoiseFn, tick: Tick) -> BatchSampler:
        """The driver's per-batch hook (``esrdf.runtime.engine.BatchSampler``) as graph replays.

        Seeded noise (``SeededNoise``) is drawn on the device from the seed and the tiles' offsets; any other
        noise function (injected fields, parity runs) is evaluated on the host and copied. Either way the
        result equals the driver's own loop. Progress ticks come all at once after the replay (the graph
        runs the batch as one unit).
        """

        def sample(lr_tiles: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
            if isinstance(noise, SeededNoise):
                out = self.sample_seeded(lr_tiles, noise.seed, noise.offsets(tiles), plan)
            else:
                fields = range(plan.num_steps + 1)
                noises = np.stack(
                    [np.stack([noise(k, tile) for tile in tiles]) for k in fields]
                )  # (N+1, B, ...)
                out = self.sample(lr_tiles, noises, plan)
            for _ in range(plan.num_steps + 1):
                tick()
            return out

        return sample

    def batch_sampler_factory(self, batch: int) -> BatchSamplerFactory:
        """Hooks that run each call at exactly ``batch`` tiles (``fixed_batches``), so one captured graph
        serves every batch of a (tile, steps) key, the last, shorter one included."""
        return lambda plan, noise, tick: fixed_batches(self.batch_sampler(plan, noise, tick), batch)


def graph_batch_sampler_factory(
    engine: Engine, channels: int, scale: int, device: str | torch.device, batch: int, use_graphs: bool = True
) -> BatchSamplerFactory:
    """What a CUDA engine offers the runtime (``esrdf.runtime.engine.BatchSamplerSource``): one
    ``CudaGraphSampler`` on ``engine``, whose driver hooks run every call at exactly ``batch`` tiles."""
    graphs = CudaGraphSampler(engine, channels, scale, device, use_graphs=use_graphs)
    return graphs.batch_sampler_factory(batch)
