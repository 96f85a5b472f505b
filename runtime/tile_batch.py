"""Tiles of many requests in one engine batch: the unit a server's dynamic batcher merges.

A server that batches whole images can only merge images of one size. Tiles all have one shape, so a
tile-level model can merge tiles of different requests, sizes and seeds into one engine call. What makes
a tile self-contained is what the driver (``esrdf.runtime.driver``) would otherwise hold in closures:

- its request's seed and its corner in that request's padded LR canvas: the noise of sampler step k is
  ``noise_field(seed, k, y0 * s, x0 * s, ...)`` (``esrdf.runtime.noise``), the same window the driver
  cuts, so a tile sampled here equals the tile the in-process runtime samples;
- its request's sampling options (steps, sampler, eta), i.e. its ``StepPlan`` (paper Eq. 6-7 in the
  affine form of ``esrdf.runtime.sampling``).

Rows of one batch with the same options run as one engine pass through the driver's own per-batch loop
(``sample_batch``: predictor, then N step calls; or a CUDA-graph replay); rows with different options
run as one pass per distinct option set. Nothing here is stateful beyond a per-worker plan cache.

The other half is ``remote_batch_fn``: a driver ``batch_fn`` that ships a request's tile batches to
such a tile model (over Triton, or any callable) instead of running them, so the request side reuses the
driver's tiling, padding and blending unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from esrdf.engines.protocol import Engine
from esrdf.runtime.bundle import Manifest
from esrdf.runtime.driver import (
    BatchFn,
    NoiseFn,
    sample_batch,  # the driver's per-batch sampler loop, reused rather than copied
    upload_step_inputs,
    upscale_array,
)
from esrdf.runtime.noise import noise_field
from esrdf.runtime.sampling import StepPlan, plan_steps
from esrdf.runtime.tiling import Tile

# (lr_tiles (B, C, th, tw), corners (B, 2) int64 LR canvas (y0, x0)) -> HR tiles (B, C, th*s, tw*s)
SendTiles = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SamplingOptions:
    """What selects a request's ``StepPlan``; hashable, so rows can be grouped and plans cached by it."""

    steps: int
    sampler: str = "ddim"
    eta: float = 0.0


@dataclass(frozen=True)
class SeededTile(Tile):
    """A tile of one request: its corner in that request's padded LR canvas, and that request's seed."""

    seed: int


class PlanCache:
    """``StepPlan`` per ``SamplingOptions`` for one schedule; plans are read-only, so threads share them."""

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        self._alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self._plans: dict[SamplingOptions, StepPlan] = {}
        self._lock = threading.Lock()

    def plan(self, options: SamplingOptions) -> StepPlan:
        with self._lock:
            plan = self._plans.get(options)
        if plan is None:
            # ValueError for bad options (steps > T, unknown sampler, eta outside [0, 1]) reaches the caller.
            plan = plan_steps(self._alphas_cumprod, options.sampler, options.steps, options.eta)
            with self._lock:
                self._plans[options] = plan
        return plan


def seeded_noise(scale: int, channels: int, tile_height: int, tile_width: int) -> NoiseFn:
    """The driver's seeded noise window (``driver._noise_source``), with the seed taken from each tile."""
    th, tw = tile_height * scale, tile_width * scale

    def noise(k: int, tile: Tile) -> np.ndarray:
        seed = tile.seed if isinstance(tile, SeededTile) else 0
        return noise_field(seed, k, tile.y0 * scale, tile.x0 * scale, th, tw, channels)

    return noise


def sample_tile_rows(
    engine: Engine,
    manifest: Manifest,
    lr_tiles: np.ndarray,
    rows: Sequence[SeededTile],
    options: Sequence[SamplingOptions],
    plans: PlanCache,
    batch_fn_for: Callable[[StepPlan], BatchFn | None] | None = None,
    pad_to: int | None = None,
) -> np.ndarray:
    """(B, C, th, tw) LR tiles of any mix of requests -> (B, C, th*s, tw*s) HR tiles (coarse + residual).

    Row i is sampled with ``options[i]`` and ``rows[i]``'s seed and corner; rows sharing options run as
    one engine pass. ``batch_fn_for(plan)`` may supply a replacement for the driver's loop (a CUDA-graph
    replay, ``esrdf.runtime.cuda_graph.driver_batch_fn``); None keeps the driver's own. ``pad_to`` runs
    every pass at exactly that many rows (chunks, the last padded with repeats), as a fixed-batch engine
    or one captured graph per plan needs.
    """
    if lr_tiles.ndim != 4 or not len(rows) == len(options) == lr_tiles.shape[0]:
        raise ValueError(
            f"{lr_tiles.shape[0]} tiles need as many rows and options, got {len(rows)}, {len(options)}"
        )
    _b, channels, th, tw = lr_tiles.shape
    scale = manifest.scale
    noise = seeded_noise(scale, channels, th, tw)
    out = np.empty((lr_tiles.shape[0], channels, th * scale, tw * scale), dtype=np.float32)
    groups: dict[SamplingOptions, list[int]] = {}
    for i, opt in enumerate(options):
        groups.setdefault(opt, []).append(i)
    for opt, members in groups.items():
        plan = plans.plan(opt)
        batch_fn = (batch_fn_for(plan) if batch_fn_for else None) or sample_batch
        size = pad_to or len(members)
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            index = chunk + [chunk[-1]] * (size - len(chunk))  # padding repeats the last row
            step_inputs = upload_step_inputs(engine, plan, len(index))
            hr = batch_fn(engine, lr_tiles[index], [rows[i] for i in index], noise, step_inputs, lambda: None)
            out[chunk] = hr[: len(chunk)]
    return out


class HostArrays:
    """The ``Engine`` the driver is handed when a ``remote_batch_fn`` samples the tiles elsewhere.

    The driver only uploads per-step ``t``/``coefs`` through it (host numpy here) and hands it to the
    batch function, which ignores it; ``predictor``/``step`` are never reached and say so if they are.
    """

    name = "host-arrays"

    def upload(self, array: np.ndarray) -> np.ndarray:
        return array

    def download(self, array: Any) -> np.ndarray:
        return np.asarray(array, dtype=np.float32)

    def predictor(self, lr: Any) -> Any:
        raise RuntimeError("HostArrays runs no graphs: pass a batch_fn that samples the tiles")

    def step(self, x_t: Any, cond: Any, t: Any, coefs: Any, noise: Any) -> Any:
        raise RuntimeError("HostArrays runs no graphs: pass a batch_fn that samples the tiles")


def remote_batch_fn(send: SendTiles, num_steps: int) -> BatchFn:
    """A driver ``batch_fn`` that sends each batch's LR tiles and corners to ``send``; returns its HR tiles.

    The seed and sampling options travel with the request (``send`` closes over them); the noise function
    the driver passes is not called, because the tile side draws the same field from seed and corner.
    """

    def sample_batch(
        engine: Engine,
        lr_tiles: np.ndarray,
        tiles: Sequence[Tile],
        noise: NoiseFn,
        step_inputs: list[tuple[Any, Any]],
        tick: Callable[[], None],
    ) -> np.ndarray:
        corners = np.array([[t.y0, t.x0] for t in tiles], dtype=np.int64)  # (B, 2)
        hr = send(np.ascontiguousarray(lr_tiles, dtype=np.float32), corners)
        for _ in range(num_steps + 1):
            tick()
        return hr

    return sample_batch


def upscale_via_tiles(
    manifest: Manifest,
    lr: np.ndarray,
    plan: StepPlan,
    send: SendTiles,
    seed: int = 0,
    tile: int = 0,
    overlap: int = 0,
    batch: int = 1,
) -> np.ndarray:
    """(C, h, w) LR in [-1, 1] -> (C, s*h, s*w): the driver's tiling and blending; ``send`` samples tiles."""
    if tile == 0:
        raise ValueError("tile-level sampling needs fixed-size tiles (tile > 0)")
    return upscale_array(
        HostArrays(), manifest, lr, plan, seed=seed, tile=tile, overlap=overlap, batch=batch,
        batch_fn=remote_batch_fn(send, plan.num_steps),
    )  # fmt: skip
