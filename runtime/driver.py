"""The sampler driver: predictor, then N step-engine calls, over batches of fixed-shape tiles.

For each batch of LR tiles (paper Section 3 with the residual formulation of Section 4):

    c   = predictor(lr)                                   coarse HR, the main path
    x   = z_0                                             x_T ~ N(0, I), noise field 0
    x   = step(x, c, t_k, coefs_k, z_{k+1})   k = 0..N-1  one reverse step per call (Eq. 6-7, affine form)
    out = c + x                                           coarse + sampled residual

then the HR tiles are blended (``esrdf.runtime.tiling``) and clipped to [-1, 1]. The driver holds no state
between calls: everything lives in the call's locals, so one engine can serve concurrent requests.
The engine (``esrdf.engines.protocol.Engine``) decides where arrays live; the driver only uploads host
inputs and downloads the two outputs of each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from esrdf.engines.protocol import Engine
from esrdf.runtime.bundle import Manifest
from esrdf.runtime.graph_spec import PREDICTOR
from esrdf.runtime.noise import noise_field
from esrdf.runtime.sampling import StepPlan
from esrdf.runtime.tiling import Blender, Tile, TilePlan, plan_tiles

ProgressFn = Callable[[int, int], None]  # (engine calls done, engine calls in total)
NoiseFn = Callable[[int, Tile], np.ndarray]  # (noise index, tile) -> (C, tile_h*s, tile_w*s)
# (engine, lr_tiles, tiles, noise, per-step (t, coefs) uploads, tick) -> HR tiles; ``sample_batch`` is the
# default, and a CUDA-graph replay (esrdf.runtime.cuda_graph.driver_batch_fn) can stand in for it.
BatchFn = Callable[
    [Engine, np.ndarray, Sequence[Tile], NoiseFn, list[tuple[Any, Any]], Callable[[], None]], np.ndarray
]


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
        return lambda k, tile: noise_field(seed, k, tile.y0 * scale, tile.x0 * scale, th, tw, channels)
    expected = (channels, tiles.padded_height * scale, tiles.padded_width * scale)
    if len(injected) != count or any(np.shape(f) != expected for f in injected):
        raise ValueError(f"injected_noise must be {count} fields (x_T and one per step) of shape {expected}")
    return lambda k, tile: tiles.cut(np.asarray(injected[k], dtype=np.float32), tile, scale)


def sample_batch(
    engine: Engine,
    lr_tiles: np.ndarray,
    tiles: Sequence[Tile],
    noise: NoiseFn,
    step_inputs: list[tuple[Any, Any]],
    tick: Callable[[], None],
) -> np.ndarray:
    """(B, C, th, tw) LR tiles -> (B, C, th*s, tw*s) HR tiles: coarse + sampled residual."""
    coarse = engine.predictor(engine.upload(lr_tiles))
    tick()
    x = engine.upload(np.stack([noise(0, tile) for tile in tiles]))
    for k, (t, coefs) in enumerate(step_inputs):
        z = engine.upload(np.stack([noise(k + 1, tile) for tile in tiles]))
        x = engine.step(x, coarse, t, coefs, z)
        tick()
    return engine.download(coarse) + engine.download(x)


def upload_step_inputs(engine: Engine, plan: StepPlan, n: int) -> list[tuple[Any, Any]]:
    """Per step: t as float32 [n] and coefs as float32 [n, 3], on the engine."""
    return [
        (
            engine.upload(np.full(n, plan.t[k], dtype=np.float32)),
            engine.upload(np.repeat(plan.coefs[k : k + 1], n, axis=0)),
        )
        for k in range(plan.num_steps)
    ]


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
    batch_fn: BatchFn | None = None,
    pad_last_batch: bool = False,
) -> np.ndarray:
    """(C, h, w) float32 LR in [-1, 1] -> (C, scale*h, scale*w) float32 HR in [-1, 1].

    ``tile=0`` runs the image as one tile (padded up to the graph's size multiple). ``injected_noise``
    replaces the seeded field with N + 1 full fields of shape (C, scale*H, scale*W) over the padded
    canvas (the image itself when no padding is needed): field 0 is x_T, field k the k-th update's noise.
    This is what makes parity with the eager sampler exact. ``batch_fn`` replaces the per-batch loop
    (``sample_batch``), e.g. with a captured CUDA graph; ``pad_last_batch`` keeps every call at
    ``batch`` tiles (one shape key) even where the graphs accept any batch.
    """
    channels, scale = manifest.channels, manifest.scale
    if lr.ndim != 3 or lr.shape[0] != channels:
        raise ValueError(f"expected a ({channels}, h, w) image, got shape {lr.shape}")
    fixed_batch, fixed_tile = fixed_shape(manifest)
    if fixed_tile is not None and tile != fixed_tile:
        raise ValueError(f"this bundle's graphs take {fixed_tile}-pixel LR tiles only; got tile={tile}")
    if batch < 1 or (fixed_batch is not None and batch != fixed_batch):
        raise ValueError(f"batch must be {fixed_batch or 'a positive integer'}, got {batch}")
    tiles = plan_tiles(lr.shape[1], lr.shape[2], tile, overlap, manifest.lr_multiple_of)
    canvas = tiles.pad(np.asarray(lr, dtype=np.float32))
    noise = _noise_source(seed, scale, channels, tiles, injected_noise, plan.num_steps + 1)
    batches = [list(tiles.tiles[i : i + batch]) for i in range(0, len(tiles.tiles), batch)]
    total, done = len(batches) * (plan.num_steps + 1), [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    blender = Blender(tiles, scale, channels)
    step_inputs: dict[int, list[tuple[Any, Any]]] = {}
    for group in batches:
        # A fixed-shape engine (or graph) gets the last batch padded with repeats of its last tile; the extra
        # outputs are dropped.
        padded = group + [group[-1]] * (batch - len(group)) if fixed_batch or pad_last_batch else group
        n = len(padded)
        if n not in step_inputs:  # upload t and coefs once per batch size, not once per batch
            step_inputs[n] = upload_step_inputs(engine, plan, n)
        lr_tiles = np.stack([tiles.cut(canvas, t) for t in padded])
        hr_tiles = (batch_fn or sample_batch)(engine, lr_tiles, padded, noise, step_inputs[n], tick)
        for t, hr in zip(group, hr_tiles, strict=False):
            blender.add(t, hr)
    return np.clip(blender.result(), -1.0, 1.0)
