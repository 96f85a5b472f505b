"""Timing and memory of one benchmark case, and the inputs every backend is timed on.

Clocks: ``time.perf_counter`` around each call on the CPU; on CUDA a pair of CUDA events around each call
(recorded on the current stream, then synchronised), so the time is the GPU's, not the launch's. Each case
runs ``warmup`` untimed calls (lazy initialisation, allocator growth, CUDA-graph capture), then up to
``repeats`` timed ones, either case by case (``time_call``) or in rounds over all cases
(``time_interleaved``, what the suite uses); a time budget stops early once ``min_repeats`` are in, so one
run fits a time budget. p50 and p95 are numpy percentiles (linear interpolation) of the timed calls.

Peak memory on the CPU is the process's peak resident set (``VmHWM``) during a case's first (cold) call:
Linux resets it when "5" is written to ``/proc/self/clear_refs``; where that fails, ``resource.getrusage``'s
lifetime peak is reported and labelled so. It includes every loaded model; ``rss_growth_mib`` is what the
call added (buffers, arena growth), so a backend's footprint is the RSS its opening added plus the growth
of its cases' first calls. ``tracemalloc`` (Python and numpy allocations only, and slow) runs in one separate,
untimed call. On CUDA: ``torch.cuda.max_memory_allocated`` after a reset.

Inputs are real photo content (scikit-image's astronaut, else scikit-learn's china, else the astronaut of
the ``$ESRDF_TEST_PHOTOS`` cache, else a synthetic pattern): LR tiles are crops of the photo downscaled with
PIL bicubic, the training degradation.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from esrdf.runtime.sampling import StepPlan

CLEAR_REFS = Path("/proc/self/clear_refs")
PHOTOS_ENV = "ESRDF_TEST_PHOTOS"  # an .npz of the held-out photos (see benchmarks/gpu_check.py)
PROC_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the timed repeats."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    clock: str  # "perf_counter" or "cuda_events"

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(samples_ms: list[float], warmup: int, clock: str) -> Timing:
    if not samples_ms:
        raise ValueError("no timed calls")
    ms = np.asarray(samples_ms, dtype=np.float64)
    return Timing(
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        repeats=int(ms.size),
        warmup=warmup,
        clock=clock,
    )


def _cuda_ms(fn: Callable[[], Any]) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def _cpu_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def time_call(
    fn: Callable[[], Any],
    warmup: int,
    repeats: int,
    cuda: bool = False,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> Timing:
    """Warm up, then time up to ``repeats`` calls (at least ``min(min_repeats, repeats)``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    measure = _cuda_ms if cuda else _cpu_ms
    for _ in range(warmup):
        measure(fn)  # timed the same way so CUDA work is finished before the first timed call
    samples: list[float] = []
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    for _ in range(repeats):
        samples.append(measure(fn))
        if deadline is not None and len(samples) >= min_repeats and time.monotonic() > deadline:
            break
    return summarize(samples, warmup, "cuda_events" if cuda else "perf_counter")


def call_synced(fn: Callable[[], Any], cuda: bool = False) -> float:
    """One call, finished on the device before returning; its milliseconds."""
    return _cuda_ms(fn) if cuda else _cpu_ms(fn)


def time_interleaved(
    calls: Sequence[tuple[Callable[[], Any], bool]],
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    rounds: int = 2,
    min_repeats: int = 3,
) -> list[Timing]:
    """Time several (call, on CUDA?) cases in ``rounds`` rounds of blocks: each round runs every case once
    for a block of its repeats.

    On a shared machine the background load drifts over minutes; rounds spread that drift over every case
    alike. Each block starts with one untimed settle call: a thread pool that just ran (onnxruntime's and
    OpenMP's workers spin-wait after their work) steals the cores from the next case's first call, which
    doubled a 23 ms onnxruntime step on the 2-core CPU dev machine. Stops after ``repeats`` timed calls per
    case, or after a round once ``budget_s`` has passed and ``min_repeats`` are in. (Warm-up is the
    caller's: ``warmup`` is only recorded.)
    """
    if not calls:
        return []
    samples: list[list[float]] = [[] for _ in calls]
    block = max(1, -(-repeats // max(1, rounds)))  # ceil(repeats / rounds)
    start = time.monotonic()
    while len(samples[0]) < repeats:
        for (fn, cuda), out in zip(calls, samples, strict=True):
            call_synced(fn, cuda)  # settle: the previous case's spinning workers get off the cores
            out += [call_synced(fn, cuda) for _ in range(min(block, repeats - len(out)))]
        over = budget_s is not None and time.monotonic() - start > budget_s
        if over and len(samples[0]) >= min(min_repeats, repeats):
            break
    clock = ["cuda_events" if cuda else "perf_counter" for _fn, cuda in calls]
    return [summarize(s, warmup, c) for s, c in zip(samples, clock, strict=True)]


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def rss_mib() -> float | None:
    """This process's resident set now (Linux), in MiB."""
    kib = _status_kib("VmRSS")
    return None if kib is None else round(kib / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0); False where not possible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def peak_memory(cuda: bool = False) -> Iterator[dict[str, Any]]:
    """Fill the yielded dict with the peak memory of the block: GPU allocations, or process RSS."""
    result: dict[str, Any] = {}
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return
    scoped = reset_peak_rss()
    before = _status_kib("VmRSS")
    yield result
    peak = _status_kib("VmHWM") if scoped else None
    if peak is None:
        scoped, peak = False, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    result["peak_rss_mib"] = round(peak / 1024, 1)
    result["rss_scope"] = "this case" if scoped else "process lifetime (ru_maxrss)"
    if scoped and before is not None:
        result["rss_growth_mib"] = round(max(0, peak - before) / 1024, 1)


def traced_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak Python/numpy heap (tracemalloc) of one call; native allocations (ORT, torch) are not seen."""
    tracemalloc.start()
    try:
        fn()
        return round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    finally:
        tracemalloc.stop()


def workload_photo() -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 real photo for timing inputs, and where it came from.

    Where scikit-image and scikit-learn are missing (the offline GPU machine), the astronaut of the photo
    cache ``$ESRDF_TEST_PHOTOS`` (an .npz the GPU check saves on a CPU machine, which the tests read too).
    """
    with contextlib.suppress(ImportError):
        from skimage import data

        return np.ascontiguousarray(data.astronaut()[..., :3]), "skimage.data.astronaut"
    with contextlib.suppress(ImportError):
        from sklearn.datasets import load_sample_image

        return np.ascontiguousarray(load_sample_image("china.jpg")), "sklearn china.jpg"
    cache = os.environ.get(PHOTOS_ENV)
    if cache and Path(cache).is_file():
        with np.load(cache) as photos:
            if "astronaut" in photos.files:
                return np.ascontiguousarray(photos["astronaut"][..., :3]), f"{cache}: astronaut"
    y, x = np.mgrid[0:512, 0:512] / 512.0
    img = np.stack([np.sin(9 * x + 4 * y), np.cos(7 * y - 3 * x), np.sin(25 * x * y)], axis=-1)
    return ((img + 1) * 127.5).astype(np.uint8), "synthetic pattern (scikit-image and scikit-learn missing)"


def lr_tiles(photo: np.ndarray, batch: int, lr_tile: int, scale: int) -> np.ndarray:
    """``batch`` distinct (3, lr_tile, lr_tile) float32 tiles in [-1, 1] of the photo downscaled 1/scale."""
    h, w = photo.shape[:2]
    lr = np.asarray(
        Image.fromarray(photo).resize(
            (max(lr_tile, w // scale), max(lr_tile, h // scale)), Image.Resampling.BICUBIC
        )
    )
    ys = np.linspace(0, lr.shape[0] - lr_tile, batch).round().astype(int)
    xs = np.linspace(lr.shape[1] - lr_tile, 0, batch).round().astype(int)
    tiles = np.stack([lr[y : y + lr_tile, x : x + lr_tile] for y, x in zip(ys, xs, strict=True)])
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0


def step_feeds(lr: np.ndarray, scale: int, plan: StepPlan, seed: int = 0) -> dict[str, np.ndarray]:
    """The first step's inputs for these tiles: cond = bicubic upsampling (real content), x_t and noise
    N(0, I), t and coefs from the plan's first (highest-t) step. Identical for every backend."""
    batch, channels, h, w = lr.shape
    cond = np.stack(
        [
            np.stack(
                [
                    np.asarray(Image.fromarray(c).resize((w * scale, h * scale), Image.Resampling.BICUBIC))
                    for c in tile
                ]
            )
            for tile in lr
        ]
    ).clip(-1.0, 1.0)
    rng = np.random.default_rng(seed)
    shape = (batch, channels, h * scale, w * scale)
    return {
        "x_t": rng.standard_normal(shape, dtype=np.float32),
        "cond": cond.astype(np.float32),
        "t": np.full(batch, plan.t[0], dtype=np.float32),
        "coefs": np.repeat(plan.coefs[:1], batch, axis=0),
        "noise": rng.standard_normal(shape, dtype=np.float32),
    }


def case_row(
    backend: str,
    stage: str,
    batch: int,
    lr_tile: int,
    scale: int,
    timing: Timing,
    memory: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """One JSON row: the timing, throughput in tiles/s and HR megapixels/s, memory, and ``extra``."""
    seconds = timing.p50_ms / 1000.0
    hr = lr_tile * scale
    return {
        "backend": backend,
        "stage": stage,
        "batch": batch,
        "lr_tile": lr_tile,
        "hr_tile": hr,
        **extra,
        **timing.as_dict(),
        "tiles_per_s": round(batch / seconds, 4),
        "hr_megapixels_per_s": round(batch * hr * hr / 1e6 / seconds, 4),
        **memory,
    }
