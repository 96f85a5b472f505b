"""The whole sampler loop for a batch of tiles as one CUDA graph (DESIGN.md section 3, "CUDA graphs").

One request for a batch of LR tiles is (paper Section 3 with the residual formulation of Section 4)

    c = predictor(lr);  x = z_0;  x = step(x, c, t_k, coefs_k, z_{k+1}) for k < N;  out = c + x

which is 1 + N engine calls of fixed shapes. ``CudaGraphSampler`` captures all of it, for one shape key
(batch, tile, steps, sampler, eta, noise mode), in one ``torch.cuda.CUDAGraph`` after a warm-up on a side
stream, and replays it per request: the host copies the tiles and noise into the key's static buffers
(the "copy-in"), one ``replay()`` runs predictor, N steps and ``c + x`` into a static output, and the host
copies that out. Launch overhead drops from 1 + N engine calls (hundreds of kernels each) to one launch.

- Static buffers are allocated once per key and owned, with the graph, by one cache entry: evicting or
  reallocating them drops the graph, so a graph never outlives the buffers it was captured on. The
  engine's ``buffers_generation`` (TensorRT bumps it when it reallocates activation memory) is checked
  on every replay too.
- Noise: ``noise="host"`` copies the N + 1 noise fields into a static buffer (the driver's noise, seeded
  or injected: what makes parity tests exact); ``noise="device"`` draws them inside the graph with
  ``torch_noise_field``, a torch port of ``esrdf.runtime.noise`` (same integer hash, bit for bit; the
  float64 Box-Muller can differ from numpy's libm by an ulp, see that module), from a seed and the tiles'
  offsets in static buffers, so nothing but the tiles crosses PCIe.
- If capture fails, the capture is ended, a warning is logged, and that key runs as plain stream
  execution (the same loop, eagerly) from then on.
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

from esrdf.runtime.driver import fixed_batches
from esrdf.runtime.engine import BatchSampler, BatchSamplerFactory, Engine, NoiseFn, Tick
from esrdf.runtime.sampling import StepPlan
from esrdf.runtime.tiling import Tile

log = logging.getLogger(__name__)

NoiseMode = Literal["host", "device"]
DEFAULT_WARMUP = 2  # cuDNN/cuBLAS/TensorRT finish lazy initialisation in the first call; 2 is margin
DEFAULT_MAX_GRAPHS = 8

# splitmix64 constants of esrdf.runtime.noise, as the int64 values with the same bits (torch has no uint64
# arithmetic on CUDA; +, *, ^ wrap identically in two's complement, and the shifts below are made logical).
_U64 = 1 << 64


def _as_int64(value: int) -> int:
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 holding uint64 bits (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function (``esrdf.runtime.noise._mix``) on int64 tensors."""
    z = z + _GAMMA
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def torch_noise_field(
    seed: torch.Tensor,
    step_index: int,
    y0: torch.Tensor,
    x0: torch.Tensor,
    height: int,
    width: int,
    channels: int = 3,
) -> torch.Tensor:
    """float32 [B, C, h, w]: ``esrdf.runtime.noise.noise_field`` for B windows at (y0[b], x0[b]), in torch.

    ``seed`` is a 0-d int64 tensor (the uint64 seed's bits, see ``seed_tensor``); ``y0``/``x0`` are int64
    [B]. Only tensor ops, no host sync: it can be captured in a CUDA graph and re-run with new seeds and
    offsets written into the same tensors.
    """
    device = seed.device
    h = _mix(_mix(seed) ^ step_index)
    per_channel = _mix(h ^ torch.arange(channels, device=device, dtype=torch.int64))  # (C,)
    ys = y0[:, None] + torch.arange(height, device=device, dtype=torch.int64)[None, :]  # (B, h)
    per_row = _mix(per_channel[None, :, None] ^ ys[:, None, :])  # (B, C, h)
    xs = x0[:, None] + torch.arange(width, device=device, dtype=torch.int64)[None, :]  # (B, w)
    bits = _mix(per_row[:, :, :, None] ^ xs[:, None, None, :])  # (B, C, h, w)
    u1 = (_shr(bits, 32).double() + 0.5) * 2.0**-32
    u2 = (bits & 0xFFFFFFFF).double() * 2.0**-32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * np.pi * u2)).float()


def seed_tensor(seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint64 seed as the 0-d int64 tensor with the same bits."""
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor(_as_int64(seed), dtype=torch.int64, device=device)


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

    ``noise[0]`` is x_T, ``noise[k]`` the k-th update's noise (the driver's order). ``generation`` counts
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
        return {
            "lr": (k.batch, c, k.lr_height, k.lr_width),
            "noise": (k.steps + 1, *hr),
            "t": (k.steps, k.batch),
            "coefs": (k.steps, k.batch, 3),
            "out": hr,
            "seed": (),
            "offsets": (2, k.batch),
        }

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
    """Predictor, N steps and c + x on the static buffers; the body that is captured or run eagerly."""
    b = bufs.tensors
    if bufs.key.noise == "device":
        _, _c, height, width = b["out"].shape
        for k in range(bufs.key.steps + 1):
            field_k = torch_noise_field(
                b["seed"], k, b["offsets"][0], b["offsets"][1], height, width, bufs.channels
            )
            b["noise"][k].copy_(field_k)
    coarse = engine.predictor(b["lr"])
    x = b["noise"][0]
    for k in range(bufs.key.steps):
        x = engine.step(x, coarse, b["t"][k], b["coefs"][k], b["noise"][k + 1])
    torch.add(coarse, x, out=b["out"])


def capture_sampler_graph(engine: Engine, bufs: StaticBuffers, warmup: int = DEFAULT_WARMUP) -> Any:
    """Warm up on a side stream, then capture ``sampler_loop`` into a CUDA graph; None (logged) on failure."""
    try:
        side = torch.cuda.Stream(bufs.device)
        side.wait_stream(torch.cuda.current_stream(bufs.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                sampler_loop(engine, bufs)
        torch.cuda.current_stream(bufs.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph ends the capture on the way out, also when the body raised.
        with torch.cuda.graph(graph):
            sampler_loop(engine, bufs)
        return graph
    except Exception as exc:  # any failure: the request still runs, as stream execution
        log.warning(
            "CUDA graph capture failed for %s (%s: %s); running this shape as stream execution",
            bufs.key,
            type(exc).__name__,
            exc,
        )
        return None


@dataclass
class _Entry:
    bufs: StaticBuffers
    graph: Any = None
    captured_at: tuple[int, int] | None = None  # (buffers generation, engine buffers_generation)
    stream_only: bool = False


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

    def _run(self, entry: _Entry) -> np.ndarray:
        with torch.no_grad():
            if self.use_graphs and not entry.stream_only:
                if entry.graph is None or entry.captured_at != self._generation(entry):
                    entry.graph = None  # drop a stale graph before anything reallocates under it
                    entry.graph = capture_sampler_graph(self.engine, entry.bufs, self.warmup)
                    entry.captured_at = self._generation(entry)
                    entry.stream_only = entry.graph is None
                    self.captures += entry.graph is not None
                if entry.graph is not None:
                    entry.graph.replay()
                    return entry.bufs.fetch_out()
            sampler_loop(self.engine, entry.bufs)
            return entry.bufs.fetch_out()

    def _load_plan(self, bufs: StaticBuffers, plan: StepPlan) -> None:
        batch = bufs.key.batch
        bufs.load("t", np.repeat(plan.t[:, None], batch, axis=1))
        bufs.load("coefs", np.repeat(plan.coefs[:, None, :], batch, axis=1))

    def sample(self, lr_tiles: np.ndarray, noises: np.ndarray, plan: StepPlan) -> np.ndarray:
        """(B, C, h, w) LR tiles and (N+1, B, C, sh, sw) noise (x_T first) -> (B, C, sh, sw) = c + x_0."""
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
            entry.bufs.load("seed", np.array(_as_int64(seed), dtype=np.int64))
            entry.bufs.load("offsets", np.asarray(offsets, dtype=np.int64).T)
            self._load_plan(entry.bufs, plan)
            return self._run(entry)

    def clear(self) -> None:
        """Drop every graph with its buffers."""
        with self._lock:
            self._entries.clear()

    def batch_sampler(self, plan: StepPlan, noise: NoiseFn, tick: Tick) -> BatchSampler:
        """The driver's per-batch hook (``esrdf.runtime.engine.BatchSampler``) as graph replays.

        It takes the driver's noise function (seeded or injected), so results equal the driver's own loop;
        progress ticks come all at once after the replay (the graph runs the batch as one unit).
        """

        def sample(lr_tiles: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
            fields = range(plan.num_steps + 1)
            noises = np.stack([np.stack([noise(k, tile) for tile in tiles]) for k in fields])  # (N+1, B, ...)
            noises[0] *= np.float32(plan.init_noise_std)  # x_T's prior std, as the driver's initial_noise
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
