"""Counter-based Gaussian noise: every value is a pure function of (seed, step, channel, y, x).

Tiles of an image are sampled independently, yet their overlaps must see the same noise, or the blended
result would depend on the tiling (docs/DESIGN.md section 1, "Noise").
Drawing each value from a hash of its global coordinates gives exactly that without ever materialising the
N + 1 full-size fields, and the same algorithm is short enough to reproduce bit for bit in C++ or torch.

Algorithm (all integer arithmetic on uint64, wrapping mod 2**64; ``>>`` is a logical shift):

    mix(z):   z = z + 0x9E3779B97F4A7C15
              z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
              z = (z ^ (z >> 27)) * 0x94D049BB133111EB
              return z ^ (z >> 31)                                  (the splitmix64 output function)
    h = mix(seed); h = mix(h ^ step); h = mix(h ^ channel); h = mix(h ^ y); bits = mix(h ^ x)
    u1 = ((bits >> 32) + 0.5) * 2**-32                              (in (0, 1): log is finite)
    u2 = (bits & 0xFFFFFFFF) * 2**-32                               (in [0, 1))
    z  = float32( sqrt(-2 ln u1) * cos(2 pi u2) )                   (Box-Muller, evaluated in float64)

``step`` is the sampler's noise index: 0 is x_T, k >= 1 the noise of the k-th update. ``y``/``x`` are HR
pixel coordinates in the (padded) full-image canvas. The integer part is exact everywhere; the float64
log/cos may differ by an ulp between libms, which survives the float32 rounding only in rare ties.

We hand-write the hash because numpy's Generator has no stateless per-coordinate access (Philox's
``advance`` positions one stream, not a 5-D lattice), and torch's generators differ from numpy's anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from esrdf.runtime.tiling import Tile

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO_POW_M32 = 2.0**-32


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array (wrapping arithmetic is what numpy uint64 does)."""
    z = z + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _u64(value: int, what: str) -> np.ndarray:
    if not 0 <= value < 2**64:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return np.array(value, dtype=np.uint64)


def noise_bits(
    seed: int, step_index: int, y0: int, x0: int, height: int, width: int, channels: int = 3
) -> np.ndarray:
    """uint64 [C, h, w] hash of each coordinate (the integer half of ``noise_field``)."""
    if height < 0 or width < 0 or y0 < 0 or x0 < 0:
        raise ValueError(f"noise window must be non-negative, got y0={y0} x0={x0} h={height} w={width}")
    with np.errstate(over="ignore"):
        h = _mix(_mix(_u64(seed, "seed")) ^ _u64(step_index, "step_index"))
        per_channel = _mix(h ^ np.arange(channels, dtype=np.uint64))  # (C,)
        ys = np.arange(y0, y0 + height, dtype=np.uint64)
        per_row = _mix(per_channel[:, None] ^ ys[None, :])  # (C, h)
        xs = np.arange(x0, x0 + width, dtype=np.uint64)
        return _mix(per_row[:, :, None] ^ xs[None, None, :])  # (C, h, w)


def noise_field(
    seed: int, step_index: int, y0: int, x0: int, height: int, width: int, channels: int = 3
) -> np.ndarray:
    """float32 [C, h, w] standard-normal noise for the window at (y0, x0) of field ``step_index``."""
    bits = noise_bits(seed, step_index, y0, x0, height, width, channels)
    u1 = ((bits >> np.uint64(32)).astype(np.float64) + 0.5) * _TWO_POW_M32
    u2 = (bits & _LOW32).astype(np.float64) * _TWO_POW_M32
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


@dataclass(frozen=True)
class SeededNoise:
    """The driver's noise of a seeded request: field ``k`` of a tile is the window of ``noise_field`` at the
    tile's HR offsets. Unit variance: whoever makes x_T scales field 0 by ``StepPlan.init_noise_std``.

    A named type rather than a closure so that a CUDA engine can recognise seeded noise and draw the very
    same fields on the device (``esrdf.engines.torch_noise``) instead of copying them from the host;
    injected noise (a parity run) stays a plain function and is copied.
    """

    seed: int
    scale: int
    channels: int
    height: int  # HR tile size
    width: int

    def __call__(self, step_index: int, tile: Tile) -> np.ndarray:
        y0, x0 = tile.y0 * self.scale, tile.x0 * self.scale
        return noise_field(self.seed, step_index, y0, x0, self.height, self.width, self.channels)

    def offsets(self, tiles: Sequence[Tile]) -> np.ndarray:
        """int64 (B, 2): each tile's HR (y0, x0) in the padded canvas."""
        return np.array([(t.y0 * self.scale, t.x0 * self.scale) for t in tiles], dtype=np.int64).reshape(
            -1, 2
        )
