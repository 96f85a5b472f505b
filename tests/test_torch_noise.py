"""``esrdf.engines.torch_noise`` on CPU torch against ``esrdf.runtime.noise``: every field of every window,
bit for bit, for seeds at the uint64 edges, odd window shapes and far-out tile offsets.

(The CUDA run of the same comparison is in tests/test_gpu.py, gpu-marked.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esrdf.engines.torch_noise import noise_bits, noise_fields, seed_tensor
from esrdf.runtime.noise import noise_bits as numpy_noise_bits
from esrdf.runtime.noise import noise_field


def numpy_fields(seed: int, count: int, offsets: np.ndarray, height: int, width: int, channels: int):
    """(K, B, C, h, w) from the numpy original, one window at a time: the reference."""
    return np.stack(
        [
            np.stack([noise_field(seed, k, int(y), int(x), height, width, channels) for y, x in offsets])
            for k in range(count)
        ]
    )


@pytest.mark.parametrize(
    ("seed", "count", "offsets", "height", "width", "channels"),
    [
        (0, 1, [[0, 0]], 8, 8, 3),
        (20260193, 5, [[0, 0], [0, 128], [96, 32], [4096, 70001]], 17, 23, 3),
        (2**64 - 1, 3, [[2**40, 5], [7, 2**33]], 4, 31, 1),
        (2**63, 21, [[128, 256], [128, 384]], 32, 32, 3),
    ],
)
def test_all_fields_of_all_windows_equal_the_numpy_field_bit_for_bit(
    seed, count, offsets, height, width, channels
):
    offsets = np.asarray(offsets, dtype=np.int64)
    got = noise_fields(seed_tensor(seed), count, torch.from_numpy(offsets.T.copy()), height, width, channels)
    want = numpy_fields(seed, count, offsets, height, width, channels)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.array_equal(got.numpy(), want)
    bits = noise_bits(seed_tensor(seed), count, torch.from_numpy(offsets.T.copy()), height, width, channels)
    y, x = offsets[-1]
    want_bits = numpy_noise_bits(seed, count - 1, int(y), int(x), height, width, channels)
    assert np.array_equal(bits[-1, -1].numpy().view(np.uint64), want_bits)  # the integer hash, exactly


def test_fields_are_standard_normal_and_distinct_per_step_and_window():
    offsets = torch.tensor([[0, 0], [0, 64]])  # (2, B): two side-by-side windows
    fields = noise_fields(seed_tensor(7), 3, offsets, 64, 64).numpy()
    assert abs(fields.mean()) < 0.02 and abs(fields.std() - 1.0) < 0.02
    assert not np.array_equal(fields[0], fields[1]) and not np.array_equal(fields[0, 0], fields[0, 1])


def test_seed_tensor_keeps_the_uint64_bits_and_refuses_the_rest():
    assert int(seed_tensor(2**64 - 1)) == -1 and int(seed_tensor(5)) == 5
    with pytest.raises(ValueError, match="seed"):
        seed_tensor(2**64)
    with pytest.raises(ValueError, match="seed"):
        seed_tensor(-1)


def test_long_requests_are_drawn_in_several_passes_with_the_same_values(monkeypatch):
    from esrdf.engines import torch_noise

    offsets = np.array([[0, 0], [32, 96]], dtype=np.int64)
    want = numpy_fields(99, 7, offsets, 16, 16, 3)
    monkeypatch.setattr(torch_noise, "MAX_PASS_ELEMENTS", 2 * 3 * 16 * 16 * 3)  # 3 fields a pass: 3 + 3 + 1
    got = noise_fields(seed_tensor(99), 7, torch.from_numpy(offsets.T.copy()), 16, 16)
    assert np.array_equal(got.numpy(), want)
