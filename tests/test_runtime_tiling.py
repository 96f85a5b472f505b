"""Tiling plans, blend weights and the counter-based noise field that makes tiles agree."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from esrdf.runtime.noise import noise_bits, noise_field
from esrdf.runtime.tiling import Tile, blend, plan_tiles, tile_weights

# ---------------------------------------------------------------- plans


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap"),
    [(37, 101, 16, 4), (64, 64, 64, 8), (65, 130, 64, 8), (5, 3, 16, 4), (1, 1, 8, 2), (100, 7, 12, 0)],
)
def test_plan_covers_image_with_fixed_shape_tiles(h, w, tile, overlap) -> None:
    plan = plan_tiles(h, w, tile, overlap)
    assert (plan.padded_height, plan.padded_width) == (max(h, tile), max(w, tile))
    covered = np.zeros((plan.padded_height, plan.padded_width), dtype=int)
    for t in plan.tiles:
        assert 0 <= t.y0 <= plan.padded_height - tile and 0 <= t.x0 <= plan.padded_width - tile
        covered[t.y0 : t.y0 + tile, t.x0 : t.x0 + tile] += 1
    assert covered.min() >= 1
    # the last tile in each axis is clamped to the edge
    assert max(t.y0 for t in plan.tiles) == plan.padded_height - tile
    assert max(t.x0 for t in plan.tiles) == plan.padded_width - tile


def test_untiled_plan_pads_to_multiple() -> None:
    plan = plan_tiles(37, 53, 0, 0, multiple_of=8)
    assert (plan.tile_height, plan.tile_width, plan.tiles) == (40, 56, (Tile(0, 0),))


@pytest.mark.parametrize(("tile", "overlap", "multiple"), [(16, 16, 1), (16, -1, 1), (18, 4, 4), (-8, 0, 1)])
def test_bad_tiling_is_refused(tile, overlap, multiple) -> None:
    with pytest.raises(ValueError):
        plan_tiles(40, 40, tile, overlap, multiple)


def test_edge_padding_of_small_odd_images(astronaut) -> None:
    lr = astronaut[:5, :3].transpose(2, 0, 1).astype(np.float32)
    plan = plan_tiles(5, 3, 8, 2)
    canvas = plan.pad(lr)
    assert canvas.shape == (3, 8, 8)
    np.testing.assert_array_equal(canvas[:, :5, :3], lr)
    np.testing.assert_array_equal(canvas[:, 5:, :3], np.repeat(lr[:, 4:5], 3, axis=1))  # edge, not reflect
    np.testing.assert_array_equal(canvas[:, :5, 3:], np.repeat(lr[:, :, 2:3], 5, axis=2))


# ---------------------------------------------------------------- blending


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "scale"),
    [((75, 97), 16, 4, 4), ((33, 20), 24, 8, 2), ((50, 64), 16, 0, 1), ((9, 14), 16, 4, 4)],
)
def test_blend_of_exact_crops_reconstructs_the_photo(astronaut, size, tile, overlap, scale) -> None:
    """Each tile is the exact HR crop of a real photo: the blend must give the photo back."""
    h, w = size
    hr = astronaut[: h * scale, 100 : 100 + w * scale].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    plan = plan_tiles(h, w, tile, overlap)
    # The HR canvas of a padded plan: reflect-pad the HR photo the same way (per HR pixel).
    pad = ((0, 0), (0, (plan.padded_height - h) * scale), (0, (plan.padded_width - w) * scale))
    hr_canvas = np.pad(hr, pad, mode="reflect")
    out = blend(plan, [(t, plan.cut(hr_canvas, t, scale)) for t in plan.tiles], scale)
    assert out.shape == (3, h * scale, w * scale)
    np.testing.assert_allclose(out, hr, atol=2e-6)
    as_uint8 = np.rint((out + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(as_uint8, astronaut[: h * scale, 100 : 100 + w * scale])


def test_blend_weights_are_positive_smooth_and_one_at_borders() -> None:
    plan = plan_tiles(40, 70, 16, 6)
    scale = 4
    for t in plan.tiles:
        w = tile_weights(plan, t, scale)
        assert w.shape == (64, 64) and w.min() > 0 and w.max() <= 1
        # smooth: neighbouring weights differ by at most the cosine ramp's slope over 24 HR pixels
        assert np.abs(np.diff(w, axis=0)).max() <= np.pi / (2 * 24) + 1e-6
        assert np.abs(np.diff(w, axis=1)).max() <= np.pi / (2 * 24) + 1e-6
        # no ramp towards an image border: the outermost rows/columns there equal their neighbours
        if t.y0 == 0:
            np.testing.assert_array_equal(w[0], w[1])
        if t.y0 + 16 == plan.padded_height:
            np.testing.assert_array_equal(w[-1], w[-2])
        if t.x0 == 0:
            np.testing.assert_array_equal(w[:, 0], w[:, 1])
        if t.x0 + 16 == plan.padded_width:
            np.testing.assert_array_equal(w[:, -1], w[:, -2])


def test_blend_hides_a_seam(astronaut) -> None:
    """Two tilings with disagreeing tiles (each tile brightened by its own offset): the blend changes
    smoothly across overlaps instead of jumping at a pasted edge."""
    scale, plan = 2, plan_tiles(48, 48, 16, 8)
    hr = astronaut[200:296, 200:296].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    offsets = np.linspace(-0.1, 0.1, len(plan.tiles))
    out = blend(
        plan, [(t, plan.cut(hr, t, scale) + o) for t, o in zip(plan.tiles, offsets, strict=True)], scale
    )
    step = np.abs(np.diff(out - hr, axis=2)).max()
    assert step < 0.2 / 16 * 2  # an offset of at most 0.2 spread over the 16-pixel HR overlap


# ---------------------------------------------------------------- noise


def reference_noise(seed: int, step: int, c: int, y: int, x: int) -> float:
    """The docstring's algorithm in plain Python integers (what a C++ or torch port implements)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    bits = mix(mix(mix(mix(mix(seed) ^ step) ^ c) ^ y) ^ x)
    u1 = ((bits >> 32) + 0.5) * 2.0**-32
    u2 = (bits & 0xFFFFFFFF) * 2.0**-32
    return float(np.float32(np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)))


def test_noise_matches_the_documented_algorithm() -> None:
    field = noise_field(seed=12345, step_index=3, y0=1000, x0=2000, height=4, width=5)
    for c, y, x in [(0, 0, 0), (1, 2, 3), (2, 3, 4), (0, 3, 1)]:
        assert field[c, y, x] == reference_noise(12345, 3, c, 1000 + y, 2000 + x)
    # Pinned values guard the algorithm against silent change; C++ and torch ports test against these.
    assert int(noise_bits(0, 0, 0, 0, 1, 1)[0, 0, 0]) == 0x78AE5A9A6B5FD45E
    pinned = noise_field(42, 1, 0, 0, 2, 2)
    assert pinned[:, 0, 0].tolist() == [-0.2179601490497589, -0.5143166184425354, -0.7314462661743164]
    assert pinned[0, 1, 1] == np.float32(0.1552502065896988)


def test_noise_windows_agree_on_overlaps() -> None:
    full = noise_field(7, 2, 0, 0, 96, 80)
    for y0, x0, h, w in [(0, 0, 32, 32), (17, 41, 50, 39), (95, 79, 1, 1)]:
        np.testing.assert_array_equal(noise_field(7, 2, y0, x0, h, w), full[:, y0 : y0 + h, x0 : x0 + w])
    np.testing.assert_array_equal(noise_field(7, 2, 5, 5, 10, 10), noise_field(7, 2, 5, 5, 10, 10))


def test_noise_is_standard_normal_and_uncorrelated() -> None:
    a = noise_field(0, 0, 0, 0, 256, 256)
    assert a.dtype == np.float32 and a.shape == (3, 256, 256)
    flat = a.ravel().astype(np.float64)
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    others = {
        "x neighbour": (a[:, :, 1:], a[:, :, :-1]),
        "y neighbour": (a[:, 1:, :], a[:, :-1, :]),
        "channel": (a[1], a[0]),
        "step": (noise_field(0, 1, 0, 0, 256, 256), a),
        "seed": (noise_field(1, 0, 0, 0, 256, 256), a),
    }
    for what, (u, v) in others.items():
        r = np.corrcoef(u.ravel(), v.ravel())[0, 1]
        assert abs(r) < 0.01, f"{what}: correlation {r}"


def test_noise_rejects_out_of_range_inputs() -> None:
    with pytest.raises(ValueError, match="seed"):
        noise_field(-1, 0, 0, 0, 2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        noise_field(0, 0, -3, 0, 2, 2)
