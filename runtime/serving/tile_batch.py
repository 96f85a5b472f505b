"""Tiles of many requests in one engine batch: the unit a server's dynamic batcher merges.

A server that batches whole images can only merge images of one size. Tiles all have one shape, so a
tile-level model can merge tiles of different requests, sizes and seeds into one engine call. What makes
a tile self-contained is what the driver (``esrdf.runtime.driver``) would otherwise hold in closures:

- its request's seed and its corner in that request's padded LR canvas: the noise of sampler step k is
  ``noise_field(seed, k, y0 * s, x0 * s, ...)`` (``esrdf.runtime.noise``), the same window the driver
  cuts, so a tile sampled here equals the tile the in-process runtime samples;
- its request's sampling options (sampler, steps, eta of an ``esrdf.config.ResolvedSampling``), i.e. its
  ``StepPlan`` (paper Eq. 6-7 in the affine form of ``esrdf.runtime.sampling``).

Rows of one batch with the same options run as one engine pass through the driver's per-batch hook (by
default ``engine_batches``: predictor, then N step calls; on CUDA the engine's graph replay); rows with
different options run as one pass per distinct option set. Nothing here is stateful beyond a per-worker
plan cache.

The other half is ``remote_sampler``: a driver hook that ships a request's tile batches to such a tile
model (over Triton, or any callable) instead of running them, so the request side reuses the driver's
tiling, padding and blending unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from esrdf.config import ResolvedSampling
from esrdf.runtime.bundle import Manifest
from esrdf.runtime.driver import sample_tiles, tile_image
from esrdf.runtime.engine import BatchSampler, BatchSamplerFactory, NoiseFn
from esrdf.runtime.noise import noise_field
from esrdf.runtime.sampling import StepPlan, plan_for
from esrdf.runtime.tiling import Tile

# (lr_tiles (B, C, th, tw), corners (B, 2) int64 LR canvas (y0, x0)) -> HR tiles (B, C, th*s, tw*s)
SendTiles = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SeededTile(Tile):
    """A tile of one request: its corner in that request's padded LR canvas, and that request's seed."""

    seed: int


class PlanCache:
    """``StepPlan`` per (sampler, steps, eta) for one schedule; plans are read-only, so threads share them."""

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        self._alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self._plans: dict[tuple[str, int, float, str], StepPlan] = {}
        self._lock = threading.Lock()

    def plan(self, sampling: ResolvedSampling) -> StepPlan:
        key = sampling.plan_key  # not the seed: it picks the noise, not the coefficients
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            # ValueError for bad options (steps > T, unknown sampler, eta outside [0, 1]) reaches the caller.
            plan = plan_for(self._alphas_cumprod, sampling)
            with self._lock:
                self._plans[key] = plan
        return plan


def seeded_noise(scale: int, channels: int, tile_height: int, tile_width: int) -> NoiseFn:
    """The driver's seeded noise window (``driver._noise_source``), with the seed taken from each tile."""
    th, tw = tile_height * scale, tile_width * scale

    def noise(k: int, tile: Tile) -> np.ndarray:
        seed = tile.seed if isinstance(tile, SeededTile) else 0
        return noise_field(seed, k, tile.y0 * scale, tile.x0 * scale, th, tw, channels)

    return noise


def sample_tile_rows(
    manifest: Manifest,
    lr_tiles: np.ndarray,
    rows: Sequence[SeededTile],
    options: Sequence[ResolvedSampling],
    plans: PlanCache,
    sampler: BatchSamplerFactory,
) -> np.ndarray:
    """(B, C, th, tw) LR tiles of any mix of requests -> (B, C, th*s, tw*s) HR tiles (coarse + residual).

    Row i is sampled with ``options[i]`` and ``rows[i]``'s seed and corner; rows sharing options run as
    one pass of the hook ``sampler`` makes (``esrdf.runtime.driver.engine_batches`` on the worker's engine,
    or the engine's CUDA-graph hook, which runs fixed-size chunks).
    """
    if lr_tiles.ndim != 4 or not len(rows) == len(options) == lr_tiles.shape[0]:
        raise ValueError(
            f"{lr_tiles.shape[0]} tiles need as many rows and options, got {len(rows)}, {len(options)}"
        )
    _b, channels, th, tw = lr_tiles.shape
    scale = manifest.scale
    noise = seeded_noise(scale, channels, th, tw)
    out = np.empty((lr_tiles.shape[0], channels, th * scale, tw * scale), dtype=np.float32)
    groups: dict[tuple[str, int, float, str], list[int]] = {}
    for i, opt in enumerate(options):
        groups.setdefault(opt.plan_key, []).append(i)
    for members in groups.values():
        sample = sampler(plans.plan(options[members[0]]), noise, lambda: None)
        out[members] = sample(lr_tiles[members], [rows[i] for i in members])
    return out


def remote_sampler(send: SendTiles) -> BatchSampler:
    """A driver hook that sends each batch's LR tiles and corners to ``send``; returns its HR tiles.

    The seed and sampling options travel with the request (``send`` closes over them); no noise is drawn
    here, because the tile side draws the same field from seed and corner.
    """

    def sample(lr_tiles: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
        corners = np.array([[t.y0, t.x0] for t in tiles], dtype=np.int64)  # (B, 2)
        return send(np.ascontiguousarray(lr_tiles, dtype=np.float32), corners)

    return sample


def upscale_via_tiles(
    manifest: Manifest, lr: np.ndarray, send: SendTiles, tile: int = 0, overlap: int = 0, batch: int = 1
) -> np.ndarray:
    """(C, h, w) LR in [-1, 1] -> (C, s*h, s*w): the driver's tiling and blending; ``send`` samples tiles."""
    if tile == 0:
        raise ValueError("tile-level sampling needs fixed-size tiles (tile > 0)")
    tiles, canvas, _fixed_batch = tile_image(manifest, lr, tile, overlap, batch)
    return sample_tiles(tiles, canvas, batch, remote_sampler(send), manifest.scale, manifest.channels)
