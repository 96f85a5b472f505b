"""The sampler driver: predictor, then N step-engine calls, over batches of fixed-shape tiles.

For each batch of LR tiles (paper Section 3 with the residual formulation of Section 4):

    c   = predictor(lr)                                   coarse HR, the main path
    x   = s z_0                                           x_T ~ N(0, s^2 I), noise field 0, s = init_noise_std
    x   = step(x, c, t_k, coefs_k, z_{k+1})   k = 0..N-1  one reverse step per call (Eq. 6-7, affine form)
    out = c + x                                           coarse + sampled residual

then the HR tiles are blended (``esrdf.runtime.tiling``) and clipped to [-1, 1]. ``s`` is the plan's x_T std:
1 for the paper's prior, sqrt(1 - alpha_bar_{T-1}) for the matched one; the eager sampler scales its field 0
the same way, so injected noise means the same to both. The driver holds no state between calls:
everything lives in the call's locals, so one engine can serve concurrent requests.

Each batch goes through one narrow hook, a ``BatchSampler`` (``esrdf.runtime.engine``): LR tiles and their
tiles in, HR tiles out, closed over the engine, the step plan, the noise and the progress tick. The default
hook, ``engine_batches``, is the loop above as engine calls; the engine (``esrdf.runtime.engine.Engine``)
decides where arrays live, and the driver only uploads host inputs and downloads the two outputs of each
batch. A CUDA engine offers a hook that replays the whole loop as one CUDA graph instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from esrdf.runtime.bundle import Manifest
from esrdf.runtime.engine import BatchSampler, BatchSamplerFactory, Engine, NoiseFn, Tick
from esrdf.runtime.graph_spec import PREDICTOR
from esrdf.runtime.noise import SeededNoise
from esrdf.runtime.sampling import StepPlan
from esrdf.runtime.tiling import Blender, Tile, TilePlan, plan_tiles

ProgressFn = Callable[[int, int], None]  # (engine calls done, engine calls in total)


def fixed_shape(manifest: Manifest) -> tuple[int | None, int | None]:
    """(batch, LR tile) the predictor graph fixes, or None for dynamic axes."""
    for g in manifest.graphs:
        if g.role == PREDICTOR:
            batch, _c, height, width = g.inputs[0].dims  # (batch, C, lr_height, lr_width)
            if (isinstance(height, int) or isinstance(width, int)) and height != width:
                raise ValueError(f"predictor graph fixes a non-square tile {height}x{width}; not supported")
            tile = height if isinstance(height, int) else None
            return (batch if isinstance(batch, int) else None), tile
    return None, None


def _noise_source(
    seed: int, scale: int, channels: int, tiles: TilePlan, injected: Sequence[np.ndarray] | None, count: int
) -> NoiseFn:
    """Noise for (index, tile): from the seeded counter-based field, or sliced from injected full fields."""
    th, tw = tiles.tile_height * scale, tiles.tile_width * scale
    if injected is None:
        return SeededNoise(seed, scale, channels, th, tw)
    expected = (channels, tiles.padded_height * scale, tiles.padded_width * scale)
    if len(injected) != count or any(np.shape(f) != expected for f in injected):
        raise ValueError(f"injected_noise must be {count} fields (x_T and one per step) of shape {expected}")
    return lambda k, tile: tiles.cut(np.asarray(injected[k], dtype=np.float32), tile, scale)


def upload_step_inputs(engine: Engine, plan: StepPlan, n: int) -> list[tuple[Any, Any]]:
    """Per step: t as float32 [n] and coefs as float32 [n, 3], on the engine."""
    return [
        (
            engine.upload(np.full(n, plan.t[k], dtype=np.float32)),
            engine.upload(np.repeat(plan.coefs[k : k + 1], n, axis=0)),
        )
        for k in range(plan.num_steps)
    ]


def initial_noise(plan: StepPlan, fields: Sequence[np.ndarray]) -> np.ndarray:
    """x_T of a batch: the unit-variance field 0 of each tile times the plan's ``init_noise_std``, in float32
    (the eager sampler's ``x_T * prior_std`` rounds the same way)."""
    x = np.stack(fields)
    return x if plan.init_noise_std == 1.0 else x * np.float32(plan.init_noise_std)


def engine_batches(engine: Engine, plan: StepPlan, noise: NoiseFn, tick: Tick) -> BatchSampler:
    """The default hook: per batch, one predictor call and N step calls on ``engine``, one tick each.

    (B, C, th, tw) LR tiles -> (B, C, th*s, tw*s) HR tiles: coarse + sampled residual. The per-step ``t`` and
    ``coefs`` are uploaded once per batch size, not once per batch.
    """
    step_inputs: dict[int, list[tuple[Any, Any]]] = {}

    def sample(lr_tiles: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
        n = len(tiles)
        if n not in step_inputs:
            step_inputs[n] = upload_step_inputs(engine, plan, n)
        coarse = engine.predictor(engine.upload(lr_tiles))
        tick()
        x = engine.upload(initial_noise(plan, [noise(0, tile) for tile in tiles]))
        for k, (t, coefs) in enumerate(step_inputs[n]):
            z = engine.upload(np.stack([noise(k + 1, tile) for tile in tiles]))
            x = engine.step(x, coarse, t, coefs, z)
            tick()
        return engine.download(coarse) + engine.download(x)

    return sample


def fixed_batches(sample: BatchSampler, size: int) -> BatchSampler:
    """``sample`` called on exactly ``size`` tiles each time, as a fixed-batch graph (or one captured CUDA
    graph per shape) needs: chunks of ``size``, the last padded with repeats of its last tile, whose extra
    outputs are dropped (rows never mix: every op of both graphs is per sample)."""

    def padded(lr_tiles: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
        parts = []
        for start in range(0, len(tiles), size):
            chunk, lr = list(tiles[start : start + size]), lr_tiles[start : start + size]
            extra = size - len(chunk)
            if extra:
                chunk += [chunk[-1]] * extra
                lr = np.concatenate([lr, np.repeat(lr[-1:], extra, axis=0)])
            parts.append(sample(lr, chunk)[: size - extra])
        return np.concatenate(parts)

    return padded


def tile_image(
    manifest: Manifest, lr: np.ndarray, tile: int, overlap: int, batch: int
) -> tuple[TilePlan, np.ndarray, int | None]:
    """Check image, tile and batch against the bundle's graphs; (tile plan, padded LR canvas, fixed batch).

    The fixed batch is the one the graphs were exported with, or None where their batch axis is dynamic.
    """
    channels = manifest.channels
    if lr.ndim != 3 or lr.shape[0] != channels:
        raise ValueError(f"expected a ({channels}, h, w) image, got shape {lr.shape}")
    fixed_batch, fixed_tile = fixed_shape(manifest)
    if fixed_tile is not None and tile != fixed_tile:
        raise ValueError(f"this bundle's graphs take {fixed_tile}-pixel LR tiles only; got tile={tile}")
    if batch < 1 or (fixed_batch is not None and batch != fixed_batch):
        raise ValueError(f"batch must be {fixed_batch or 'a positive integer'}, got {batch}")
    tiles = plan_tiles(lr.shape[1], lr.shape[2], tile, overlap, manifest.lr_multiple_of)
    return tiles, tiles.pad(np.asarray(lr, dtype=np.float32)), fixed_batch


def sample_tiles(
    tiles: TilePlan, canvas: np.ndarray, batch: int, sample: BatchSampler, scale: int, channels: int
) -> np.ndarray:
    """Cut the canvas into batches of ``batch`` tiles, sample each with ``sample``, blend, clip to [-1, 1]."""
    blender = Blender(tiles, scale, channels)
    for start in range(0, len(tiles.tiles), batch):
        group = tiles.tiles[start : start + batch]
        hr_tiles = sample(np.stack([tiles.cut(canvas, t) for t in group]), group)
        for t, hr in zip(group, hr_tiles, strict=True):
            blender.add(t, hr)
    return np.clip(blender.result(), -1.0, 1.0)


def upscale_array(
    engine: Engine,
    manifest: Manifest,
    lr: np.ndarray,
    plan: StepPlan,
    seed: int = 0,
    tile: int = 0,
    overlap: int = 0,
    batch: int = 1,
    injected_noise: Sequence[np.ndarray] | None = None,
    progress: ProgressFn | None = None,
    sampler: BatchSamplerFactory | None = None,
) -> np.ndarray:
    """(C, h, w) float32 LR in [-1, 1] -> (C, scale*h, scale*w) float32 HR in [-1, 1].

    ``tile=0`` runs the image as one tile (padded up to the graph's size multiple). ``injected_noise``
    replaces the seeded field with N + 1 full fields of shape (C, scale*H, scale*W) over the padded
    canvas (the image itself when no padding is needed): field 0 is x_T, field k the k-th update's noise.
    This is what makes parity with the eager sampler exact. ``sampler`` makes the per-batch hook from the
    plan, the noise and the progress tick (e.g. an engine's CUDA-graph replay); by default it is
    ``engine_batches`` on ``engine``.
    """
    tiles, canvas, fixed_batch = tile_image(manifest, lr, tile, overlap, batch)
    noise = _noise_source(seed, manifest.scale, manifest.channels, tiles, injected_noise, plan.num_steps + 1)
    total, done = -(-len(tiles.tiles) // batch) * (plan.num_steps + 1), [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    sample = (sampler or functools.partial(engine_batches, engine))(plan, noise, tick)
    if fixed_batch is not None:  # fixed-shape graphs take exactly that many tiles per call
        sample = fixed_batches(sample, fixed_batch)
    return sample_tiles(tiles, canvas, batch, sample, manifest.scale, manifest.channels)
