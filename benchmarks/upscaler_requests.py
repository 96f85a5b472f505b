"""Requests through the public API, timed as users run them: ``Upscaler(bundle)(uint8 image)``.

Each case is one ``Upscaler`` (backend, precision, LR tile, batch B, overlap 0) called on a real-photo
uint8 image exactly B tiles wide, with the bundle's default sampling (``Upscaler.sampling()``). On CUDA that
is the path ``esrdf-run`` and ``UpscalerService`` take: uint8 -> [-1, 1] float on the host, tiles into the
graph sampler's pinned staging, one whole-loop CUDA-graph replay with the noise drawn on the device, HR
tiles back, blend, uint8.

- ``end_to_end``: ``time.perf_counter`` around the call (host image in -> host image out).
- ``gpu_only``: CUDA events around a replay of the same graph (same engine, shape key, plan and seed) in a
  graph sampler of its own, without the copies or any host work: the floor the request could reach.
- ``ratio``: end_to_end p50 / gpu_only p50 (the goal is 1.2 or less).

On the CPU (the GPU check's smoke run) only ``end_to_end`` is timed: no graphs there.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from esrdf.bench.latency import time_call
from esrdf.runtime.bundle import MANIFEST_NAME, Bundle, write_manifest
from esrdf.runtime.images import to_model_range

E2E_GOAL_RATIO = 1.2  # issue 12's goal: end to end within 1.2x of GPU-only


def bundle_dir(bundle: Bundle) -> Path:
    """A folder ``Upscaler`` can open: the bundle's own, or the checkpoint view's parent with its manifest
    written beside the checkpoint (``esrdf.bench.checkpoint_bundle``: no graphs, the torch weights)."""
    if not (bundle.root / MANIFEST_NAME).is_file():
        write_manifest(bundle.root, bundle.manifest)
    return bundle.root


def request_image(photo: np.ndarray, batch: int, lr_tile: int) -> np.ndarray:
    """(lr_tile, batch * lr_tile, 3) uint8: B distinct photo crops side by side (B tiles, overlap 0)."""
    h, w = photo.shape[:2]
    ys = np.linspace(0, h - lr_tile, batch).round().astype(int)
    xs = np.linspace(w - lr_tile, 0, batch).round().astype(int)
    crops = [photo[y : y + lr_tile, x : x + lr_tile] for y, x in zip(ys, xs, strict=True)]
    return np.ascontiguousarray(np.concatenate(crops, axis=1))


def same_request_sampler(upscaler: Any, image: np.ndarray) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """A graph sampler of its own on the Upscaler's engine, run once on the request's tiles, plan and seed
    with device noise: (sampler, LR tiles, plan, its HR tiles). On CUDA that call captured the graph."""
    from esrdf.engines.cuda_graph import CudaGraphSampler

    tile, scale = upscaler.tile, upscaler.scale
    lr = to_model_range(image)  # (3, tile, B * tile)
    batch = lr.shape[2] // tile
    tiles = np.stack([lr[:, :, b * tile : (b + 1) * tile] for b in range(batch)])
    offsets = np.array([(0, b * tile * scale) for b in range(batch)], dtype=np.int64)
    sampling, plan = upscaler.sampling(), upscaler.step_plan()
    device = getattr(upscaler.engine, "device", "cuda")
    graphs = CudaGraphSampler(upscaler.engine, upscaler.manifest.channels, scale, device)
    return graphs, tiles, plan, graphs.sample_seeded(tiles, sampling.seed, offsets, plan)


def gpu_only_timing(upscaler: Any, image: np.ndarray, warmup: int, repeats: int, max_seconds: float) -> Any:
    """CUDA-event timing of the request's graph replay alone (see the module docstring)."""
    graphs, tiles, plan, _hr = same_request_sampler(upscaler, image)
    graph = graphs.captured_graph(tiles.shape, plan, "device")
    if graph is None:
        raise RuntimeError(f"the graph was not captured: {graphs.status()}")
    return time_call(graph.replay, warmup, repeats, cuda=True, max_seconds=max_seconds)


def upscaler_cases(
    directory: Path,
    backend: str,
    device: str,
    precision: str,
    batches: tuple[int, ...],
    lr_tile: int,
    photo: np.ndarray,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 10.0,
) -> list[dict[str, Any]]:
    """One row per batch: end-to-end and (CUDA) GPU-only timings of Upscaler requests, and their ratio."""
    from esrdf.runtime.upscaler import Upscaler

    rows = []
    for batch in batches:
        start = time.monotonic()
        upscaler = Upscaler(
            directory,
            backend=backend,
            device=device,
            precision=precision,
            tile=lr_tile,
            overlap=0,
            batch=batch,
        )
        image = request_image(photo, batch, lr_tile)
        sampling = upscaler.sampling()
        out = upscaler(image)
        if out.dtype != np.uint8 or out.shape != (
            lr_tile * upscaler.scale,
            image.shape[1] * upscaler.scale,
            3,
        ):
            raise RuntimeError(f"Upscaler returned {out.dtype} {out.shape} for a {image.shape} uint8 image")
        request = functools.partial(upscaler, image)
        e2e = time_call(request, warmup, repeats, cuda=False, max_seconds=max_seconds)
        row: dict[str, Any] = {
            "backend": backend,
            "precision": precision,
            "device": device,
            "batch": batch,
            "lr_tile": lr_tile,
            "sampling": {"sampler": sampling.sampler, "steps": sampling.steps, "eta": sampling.eta},
            "prior": getattr(sampling, "prior", None),
            "end_to_end": e2e.as_dict(),
        }
        if device == "cuda":
            gpu = gpu_only_timing(upscaler, image, warmup, repeats, max_seconds)
            row |= {
                "gpu_only": gpu.as_dict(),
                "ratio": round(e2e.p50_ms / gpu.p50_ms, 3),
                "within_goal": e2e.p50_ms / gpu.p50_ms <= E2E_GOAL_RATIO,
            }
        row["seconds"] = round(time.monotonic() - start, 2)
        rows.append(row)
    return rows


def eager_speedups(rows: list[dict[str, Any]], latency: list[dict[str, Any]]) -> None:
    """Add ``vs_eager_fp32`` (eager request p50 / end-to-end p50) where the suite timed the eager sampler
    at the same batch and step count (the goal at batch 1 is 5x or more)."""
    eager = {
        (r["batch"], r.get("steps")): r["p50_ms"]
        for r in latency
        if r.get("backend") == "eager" and r.get("stage") == "request" and "p50_ms" in r
    }
    for row in rows:
        ref = eager.get((row["batch"], row["sampling"]["steps"]))
        if ref is not None:
            row["vs_eager_fp32"] = round(ref / row["end_to_end"]["p50_ms"], 2)


def upscaler_table(part: dict[str, Any]) -> str:
    """Markdown table of the GPU check's "upscaler" part."""
    rows = part.get("rows", [])
    if not rows:
        return ""
    lines = [
        "\nUpscaler requests (uint8 in, uint8 out; default sampling)\n",
        "| backend | precision | batch | steps | end-to-end p50 ms | GPU-only p50 ms | ratio | vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gpu = r.get("gpu_only", {}).get("p50_ms", "-")
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['sampling']['steps']} | "
            f"{r['end_to_end']['p50_ms']} | {gpu} | {r.get('ratio', '-')} | {r.get('vs_eager_fp32', '-')} |"
        )
    return "\n".join(lines) + "\n"
