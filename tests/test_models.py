"""The ESRDF networks: exact paper sizes, shapes, the authors' layouts, attention maths, and torch.export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esrdf.config import UNetConfig, preset
from esrdf.models import build_predictor, build_unet, count_parameters
from esrdf.models.predictor import Predictor, bicubic_upsample
from esrdf.models.unet import (
    SelfAttention,
    SinusoidalTimeEmbedding,
    UNet,
    authors_module_map,
    convert_authors_state_dict,
)


def photo_tensor(image: np.ndarray, size: int, crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """HxWx3 uint8 photo -> (1, 3, size, size) float32 in [-1, 1], area-downsampled, optionally cropped."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    x = F.interpolate(x, size=(size, size), mode="area")
    if crop is not None:
        top, left, h, w = crop
        x = x[..., top : top + h, left : left + w]
    return x.contiguous()


def photo_batch(image: np.ndarray, size: int, h: int, w: int, n: int) -> torch.Tensor:
    """``n`` different h x w crops of one photo, stacked: (n, 3, h, w)."""
    full = photo_tensor(image, size)
    return torch.cat([full[..., 3 * i : 3 * i + h, 5 * i : 5 * i + w] for i in range(n)])


def unet_input(image: np.ndarray, h: int, w: int, n: int, seed: int = 0) -> torch.Tensor:
    """concat[cond, x_t]: a real photo as the condition and a noised version of it as x_t, (n, 6, h, w)."""
    cond = photo_batch(image, 128, h, w, n)
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed))
    return torch.cat([cond, 0.6 * cond + 0.8 * noise], dim=1)


def test_paper_parameter_counts_match_the_authors() -> None:
    cfg = preset("paper")
    assert count_parameters(build_predictor(cfg)) == 2_381_948
    with_unused = dataclasses.replace(cfg.predictor, authors_unused_conv=True)
    assert count_parameters(Predictor(with_unused)) == 2_383_679
    with torch.device("meta"):
        unet = build_unet(cfg)
    assert count_parameters(unet) == 97_807_491


def test_predictor_state_dict_uses_the_authors_names() -> None:
    # Layout read off the authors' Train-CNN/PixelPredictor.py, so their checkpoints load 1:1.
    arfu = [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "cbam.ca.fc.0.weight",
        "cbam.ca.fc.2.weight",
        "cbam.sa.conv.weight",
    ]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = {"bsconv.conv.weight", "bsconv.conv.bias", *(f"bsconv.bn.{k}" for k in bn)}
    for unit in ("arfu1", "arfu2", "arfu3", "arfm.arfu1", "arfm.arfu2", "arfm.arfu3"):
        expected |= {f"{unit}.{k}" for k in arfu}
    expected |= {
        "arfm.conv.weight",
        "arfm.conv.bias",
        "arfm.residual_conv.weight",
        "arfm.residual_conv.bias",
        "final_conv.weight",
        "final_conv.bias",
    }
    cfg = preset("paper").predictor
    assert set(Predictor(cfg).state_dict()) == expected
    with_unused = Predictor(dataclasses.replace(cfg, authors_unused_conv=True)).state_dict()
    assert set(with_unused) == expected | {"bicubic_conv.weight", "bicubic_conv.bias"}


@pytest.mark.parametrize(("scale", "h", "w"), [(2, 9, 13), (4, 7, 7), (4, 16, 12), (8, 5, 11)])
def test_predictor_output_shape_any_lr_size(astronaut: np.ndarray, scale: int, h: int, w: int) -> None:
    predictor = build_predictor(preset("tiny", scale=scale)).eval()
    lr = photo_batch(astronaut, 64, h, w, n=2)
    with torch.no_grad():
        coarse = predictor(lr)
    assert coarse.shape == (2, 3, scale * h, scale * w)
    assert torch.isfinite(coarse).all()


def test_predictor_starts_at_bicubic_and_learns_the_residual(astronaut: np.ndarray) -> None:
    torch.manual_seed(0)
    # Two 64x64 patches around the face, and their 16x16 antialiased-bicubic LR versions.
    hr = torch.cat(
        [photo_tensor(astronaut, 256, (40, 90, 64, 64)), photo_tensor(astronaut, 256, (120, 60, 64, 64))]
    )
    lr = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    predictor = build_predictor(preset("tiny"))
    bicubic = bicubic_upsample(lr, 4)
    # The skip path is exactly the authors' F.interpolate(scale_factor=s) bicubic.
    torch.testing.assert_close(
        bicubic, F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    )
    with torch.no_grad():
        torch.testing.assert_close(predictor(lr), bicubic, rtol=0, atol=0)

    optimizer = torch.optim.Adam(predictor.parameters(), lr=2e-3)
    bicubic_l1 = (bicubic - hr).abs().mean().item()
    for _ in range(25):
        loss = (predictor(lr) - hr).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predictor.eval()
    with torch.no_grad():
        trained_l1 = (predictor(lr) - hr).abs().mean().item()
    assert trained_l1 < 0.95 * bicubic_l1


def test_predictor_is_deterministic_and_batch_independent(astronaut: np.ndarray) -> None:
    cfg = preset("tiny").predictor
    torch.manual_seed(3)
    first = Predictor(cfg, zero_init_head=False).eval()
    torch.manual_seed(3)
    second = Predictor(cfg, zero_init_head=False).eval()
    lr = photo_batch(astronaut, 96, 20, 24, n=3)
    with torch.no_grad():
        out = first(lr)
        torch.testing.assert_close(second(lr), out, rtol=0, atol=0)
        singles = torch.cat([first(lr[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, out, rtol=1e-5, atol=1e-5)
    # The learned branch is live: with the authors' default init the output is not just bicubic.
    assert (out - bicubic_upsample(lr, 4)).abs().max() > 1e-3


@pytest.mark.parametrize(("h", "w"), [(32, 48), (20, 36)])
def test_unet_output_shape_non_square_batches(astronaut: np.ndarray, h: int, w: int) -> None:
    unet = build_unet(preset("tiny")).eval()
    x = unet_input(astronaut, h, w, n=3)
    with torch.no_grad():
        eps = unet(x, torch.tensor([0.0, 57.0, 199.0]))
    assert eps.shape == (3, 3, h, w)
    assert torch.isfinite(eps).all()


def test_unet_is_deterministic_and_batch_independent(astronaut: np.ndarray) -> None:
    cfg = preset("tiny").unet
    torch.manual_seed(5)
    first = UNet(cfg).eval()
    torch.manual_seed(5)
    second = UNet(cfg).eval()
    x, t = unet_input(astronaut, 32, 32, n=3), torch.tensor([4.0, 90.0, 180.0])
    with torch.no_grad():
        out = first(x, t)
        torch.testing.assert_close(second(x, t), out, rtol=0, atol=0)
        singles = torch.cat([first(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, out, rtol=1e-5, atol=1e-5)


def test_time_embedding_matches_the_sinusoid_formula_and_moves_the_output(astronaut: np.ndarray) -> None:
    dim = 16
    t = np.array([0.0, 1.0, 37.0, 199.0])
    angles = t[:, None] * 10000.0 ** (-np.arange(0, dim, 2) / dim)[None, :]
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    got = SinusoidalTimeEmbedding(dim)(torch.tensor(t, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
    assert torch.cdist(got, got).fill_diagonal_(1.0).min() > 0.1

    unet = build_unet(preset("tiny")).eval()
    x = unet_input(astronaut, 32, 32, n=2)
    with torch.no_grad():
        early, late = unet(x, torch.tensor([0.0, 0.0])), unet(x, torch.tensor([199.0, 199.0]))
    assert (early - late).abs().max() > 1e-3


def test_self_attention_matches_4d_sdpa(astronaut: np.ndarray) -> None:
    torch.manual_seed(1)
    attn = SelfAttention(48, groups=8).eval()
    x = F.pixel_unshuffle(photo_batch(astronaut, 128, 48, 64, n=2), 4)  # (2, 48, 12, 16) real-image features
    b, c, h, w = x.shape
    with torch.no_grad():
        q, k, v = attn.qkv(attn.norm(x)).chunk(3, dim=1)
        q, k, v = (y.reshape(b, 1, c, h * w).transpose(2, 3) for y in (q, k, v))  # (B, 1, HW, C)
        ref = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        torch.testing.assert_close(attn(x), x + attn.proj(ref), rtol=1e-5, atol=1e-5)


def test_attention_sits_at_the_configured_resolutions() -> None:
    def attends(level: torch.nn.Module) -> bool:
        return all(isinstance(block.attn, SelfAttention) for block in level.children())

    def attention_levels(cfg: UNetConfig) -> tuple[list[bool], list[bool]]:
        with torch.device("meta"):
            unet = UNet(cfg)
        down = [attends(level) for level in unet.down_blocks]
        up = [attends(level) for level in unet.up_blocks]
        assert isinstance(unet.mid_attn_block.attn, SelfAttention)
        return down, up

    paper = preset("paper").unet  # 128 -> 64 -> 32 -> 16 -> 8: attention at level 3 only
    assert attention_levels(paper) == ([False, False, False, True, False], [False, True, False, False, False])
    # The authors' DIV2K config trains at 160: no level reaches 16, so only the middle attends.
    div2k = dataclasses.replace(paper, train_size=160)
    assert attention_levels(div2k) == ([False] * 5, [False] * 5)


def test_authors_unet_keys_convert_onto_ours() -> None:
    paper = preset("paper").unet
    mapping = authors_module_map(paper)
    # Spot checks read off the authors' flat downs/ups layout (Diffusion_model/unet.py).
    assert mapping["downs.0"] == "input_conv"
    assert mapping["downs.3.conv"] == "downsamples.0"
    assert mapping["downs.12.conv"] == "downsamples.3"
    assert mapping["downs.10.attn.qkv"] == "down_blocks.3.0.attn.qkv"
    assert mapping["ups.3.conv"] == "upsample_convs.0"
    assert mapping["ups.6.attn.out"] == "up_blocks.1.2.attn.proj"
    assert mapping["ups.18.res_block.res_conv"] == "up_blocks.4.2.skip"
    assert mapping["mid.0.res_block.mlp.1"] == "mid_attn_block.time_proj"

    cfg = preset("tiny").unet
    ours = UNet(cfg).state_dict()
    inverse = {v: k for k, v in authors_module_map(cfg).items()}
    theirs = {f"{inverse[key.rpartition('.')[0]]}.{key.rpartition('.')[2]}": v for key, v in ours.items()}
    theirs["time_mlp.0.inv_freq"] = torch.zeros(8)  # a derived buffer they store and we drop
    assert len(theirs) == 163  # the authors' tiny-shaped UNet's state dict has 163 entries
    restored = UNet(cfg)
    restored.load_state_dict(convert_authors_state_dict(theirs, cfg), strict=True)
    with pytest.raises(KeyError, match="downs.99.conv.weight"):
        convert_authors_state_dict({"downs.99.conv.weight": torch.zeros(1)}, cfg)


def test_tiny_networks_export_with_dynamic_batch_and_size(astronaut: np.ndarray) -> None:
    from torch.export import Dim, export

    cfg = preset("tiny")
    # The authors' default init, so the learned branch contributes to what is compared.
    unet, predictor = build_unet(cfg).eval(), Predictor(cfg.predictor, zero_init_head=False).eval()
    m = cfg.unet.multiple_of
    batch, h, w = Dim("batch", min=1, max=64), Dim("h", min=1, max=128), Dim("w", min=1, max=128)
    unet_program = export(
        unet,
        (unet_input(astronaut, 32, 48, n=2), torch.tensor([1.0, 7.0])),
        dynamic_shapes=({0: batch, 2: m * h, 3: m * w}, {0: batch}),
    )
    lr_h, lr_w = Dim("lr_h", min=2, max=512), Dim("lr_w", min=2, max=512)
    predictor_program = export(
        predictor, (photo_batch(astronaut, 64, 12, 10, n=2),), dynamic_shapes=({0: batch, 2: lr_h, 3: lr_w},)
    )

    x, t = unet_input(astronaut, 24, 40, n=3, seed=1), torch.tensor([0.0, 5.0, 199.0])
    lr = photo_batch(astronaut, 64, 7, 9, n=3)
    with torch.no_grad():
        torch.testing.assert_close(unet_program.module()(x, t), unet(x, t), rtol=1e-5, atol=1e-5)
        coarse = predictor_program.module()(lr)
        assert coarse.shape == (3, 3, 28, 36)
        torch.testing.assert_close(coarse, predictor(lr), rtol=1e-5, atol=1e-5)
