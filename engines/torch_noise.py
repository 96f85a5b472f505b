"""``esrdf.runtime.noise``'s counter-based field in torch: all N + 1 fields of all tiles of a batch at once.

The numpy original hashes (seed, step, channel, y, x) with splitmix64 and turns the 64 bits into one
Box-Muller normal. Here the same integer hash runs on int64 tensors (torch has no uint64 arithmetic on CUDA;
``+``, ``*`` and ``^`` wrap identically in two's complement, and the right shifts are made logical), and it
is broadcast over a (fields, tiles, channels, rows, cols) lattice, so a whole request's noise is one pass of
about 60 elementwise kernels whatever N and B are, instead of ~70 small kernels per field and tile (very
long requests, e.g. DDPM's 1000 steps, take a few passes, to bound the temporaries). Only
tensor ops, no host sync: it is captured inside the CUDA graph of the sampler loop
(``esrdf.engines.cuda_graph``) and re-run with a new seed and new tile offsets written into the same tensors.

Bit-identity with ``esrdf.runtime.noise.noise_field``: the integer bits are exact on every device. The
float64 ``log``/``cos`` of Box-Muller come from torch's kernels instead of numpy's libm; on the CPU they
agree bit for bit on every case of tests/test_torch_noise.py, and an ulp of float64 difference could only
show after the float32 rounding in a rare tie (the same caveat ``esrdf.runtime.noise`` states between libms).
"""

from __future__ import annotations

import math

import torch

_U64 = 1 << 64
_LOW32 = 0xFFFFFFFF
_TWO_POW_M32 = 2.0**-32
# Fields per pass are capped so the int64/float64 temporaries stay ~128 MiB each: DDPM's 1000 steps at
# batch 8 would otherwise need several GiB of them at once (the float32 result itself is 4 bytes a value).
MAX_PASS_ELEMENTS = 1 << 24


def as_int64(value: int) -> int:
    """The int64 with the same 64 bits as the uint64 ``value``."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_GAMMA = as_int64(0x9E3779B97F4A7C15)
_MUL1 = as_int64(0xBF58476D1CE4E5B9)
_MUL2 = as_int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 holding uint64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function (``esrdf.runtime.noise._mix``) on int64 tensors."""
    z = z + _GAMMA
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def seed_tensor(seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint64 seed as the 0-d int64 tensor with the same bits."""
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor(as_int64(seed), dtype=torch.int64, device=device)


def noise_bits(
    seed: torch.Tensor,
    num_fields: int,
    offsets: torch.Tensor,
    height: int,
    width: int,
    channels: int = 3,
    first_field: int = 0,
) -> torch.Tensor:
    """int64 (K, B, C, h, w): the uint64 hash bits of fields ``first_field`` .. + K-1 for B windows.

    ``seed`` is a 0-d int64 tensor (``seed_tensor``); ``offsets`` int64 (2, B) holds each window's HR
    (y0, x0) in the padded full-image canvas.
    """
    device = seed.device
    steps = torch.arange(first_field, first_field + num_fields, device=device, dtype=torch.int64)
    h = _mix(_mix(seed) ^ steps)  # (K,)
    per_channel = _mix(h[:, None] ^ torch.arange(channels, device=device, dtype=torch.int64))  # (K, C)
    ys = offsets[0][:, None] + torch.arange(height, device=device, dtype=torch.int64)  # (B, h)
    per_row = _mix(per_channel[:, None, :, None] ^ ys[None, :, None, :])  # (K, B, C, h)
    xs = offsets[1][:, None] + torch.arange(width, device=device, dtype=torch.int64)  # (B, w)
    return _mix(per_row[..., None] ^ xs[None, :, None, None, :])  # (K, B, C, h, w)


def noise_fields(
    seed: torch.Tensor,
    num_fields: int,
    offsets: torch.Tensor,
    height: int,
    width: int,
    channels: int = 3,
) -> torch.Tensor:
    """float32 (K, B, C, h, w): field k of window b is ``noise_field(seed, k, y0_b, x0_b, h, w, C)``.

    Field 0 is x_T's unit noise, field k >= 1 the noise of the k-th update (the driver's order).
    """
    batch = offsets.shape[1]
    out = torch.empty((num_fields, batch, channels, height, width), dtype=torch.float32, device=seed.device)
    per_pass = max(1, MAX_PASS_ELEMENTS // max(1, batch * channels * height * width))
    for first in range(0, num_fields, per_pass):
        count = min(per_pass, num_fields - first)
        bits = noise_bits(seed, count, offsets, height, width, channels, first)
        u1 = (_shr(bits, 32).double() + 0.5) * _TWO_POW_M32  # in (0, 1): log is finite
        u2 = (bits & _LOW32).double() * _TWO_POW_M32  # in [0, 1)
        del bits
        out[first : first + count] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return out
