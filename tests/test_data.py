"""The training dataset on real photos: shapes, range, the bicubic degradation, odd image modes, bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esrdf.data import (
    DataError,
    ImageFolderDataset,
    StepBatchSampler,
    bicubic_downsample,
    load_rgb,
    load_rgb_cached,
    offline_training_photos,
    to_tensor,
)


@pytest.fixture(scope="module")
def photo_crops(training_photos: list[Path]) -> list[np.ndarray]:
    """Three real photos, downsized to ~320 px so decoding stays fast."""
    picks = [training_photos[i] for i in np.linspace(0, len(training_photos) - 1, 3).astype(int)]
    return [load_rgb(p, max_side=320) for p in picks]


@pytest.fixture()
def photo_dir(tmp_path: Path, photo_crops: list[np.ndarray]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(photo_crops):
        Image.fromarray(img).save(folder / f"photo{i}.png")
    return folder


def test_pairs_have_lr_hr_shapes_range_and_bicubic_relation(photo_dir: Path) -> None:
    ds = ImageFolderDataset(photo_dir, crop=64, scale=4, seed=3)
    assert ds.num_skipped == 0 and len(ds.images) == 3
    lr, hr = ds[11]
    assert lr.shape == (3, 16, 16) and hr.shape == (3, 64, 64)
    assert lr.dtype == hr.dtype == torch.float32
    assert hr.min() >= -1 and hr.max() <= 1 and hr.std() > 0.02  # a real photo patch, not flat
    # LR is PIL's antialiased bicubic of exactly this HR crop.
    expected_lr = to_tensor(bicubic_downsample(ds.hr_crop(11), 4))
    assert torch.equal(lr, expected_lr)
    assert torch.equal(hr, to_tensor(ds.hr_crop(11)))
    # Sample i depends on (seed, i) only.
    assert torch.equal(ds[11][1], hr)
    assert not torch.equal(ds[12][1], hr)
    other_seed = ImageFolderDataset(photo_dir, crop=64, scale=4, seed=4)
    assert not torch.equal(other_seed[11][1], hr)


def test_decode_cache_gives_the_same_arrays_and_follows_changes(photo_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = ImageFolderDataset(photo_dir, crop=64, scale=4, seed=3, max_side=200)
    cold = ImageFolderDataset(photo_dir, crop=64, scale=4, seed=3, max_side=200, cache_dir=cache)
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == 3 and not list(cache.glob(".*"))  # one per photo, no temporary left
    warm = ImageFolderDataset(photo_dir, crop=64, scale=4, seed=3, max_side=200, cache_dir=cache)
    for a, b, c in zip(plain.images, cold.images, warm.images, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c) and max(a.shape[:2]) == 200
    assert torch.equal(plain[5][1], warm[5][1])
    photo = photo_dir / "photo0.png"
    # The cache is read, not re-decoded: a planted entry is what comes back ...
    marker = np.zeros((70, 80, 3), np.uint8)
    key = next(e for e in entries if np.array_equal(np.load(e), plain.images[0]))
    np.save(key, marker)
    assert np.array_equal(load_rgb_cached(photo, 200, cache), marker)
    # ... until the photo changes (size or mtime), or another max_side is asked for.
    assert load_rgb_cached(photo, 100, cache).shape[:2] != marker.shape[:2]
    Image.fromarray(load_rgb(photo)[::-1]).save(photo)
    assert np.array_equal(load_rgb_cached(photo, 200, cache), load_rgb(photo, 200))


def test_flips_cover_all_four_orientations(photo_dir: Path) -> None:
    ds = ImageFolderDataset(photo_dir, crop=64, scale=2, seed=0)
    flat = ImageFolderDataset(photo_dir, crop=64, scale=2, seed=0, flips=False)
    seen = set()
    for i in range(40):
        a, b = ds.hr_crop(i), flat.hr_crop(i)
        for name, candidate in (("id", b), ("h", b[:, ::-1]), ("v", b[::-1]), ("hv", b[::-1, ::-1])):
            if np.array_equal(a, candidate):
                seen.add(name)
                break
        else:
            pytest.fail(f"sample {i} is not a flip of the same crop")
    assert seen == {"id", "h", "v", "hv"}


def _write_odd_modes(folder: Path, img: np.ndarray) -> dict[str, Path]:
    gray = Image.fromarray(img).convert("L")
    rgba = Image.fromarray(img).convert("RGBA")
    alpha = np.zeros(img.shape[:2], np.uint8)
    alpha[:, : img.shape[1] // 2] = 255  # left half opaque, right half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # mode I;16
    files = {
        "gray": folder / "gray.png",
        "rgba": folder / "rgba.png",
        "i16": folder / "sixteen.png",
        "palette": folder / "palette.png",
        "gray_alpha": folder / "gray_alpha.png",
        "cmyk": folder / "cmyk.jpg",
    }
    gray.save(files["gray"])
    rgba.save(files["rgba"])
    sixteen.save(files["i16"])
    Image.fromarray(img).quantize(64).save(files["palette"])
    rgba.convert("LA").save(files["gray_alpha"])
    Image.fromarray(img).convert("CMYK").save(files["cmyk"])
    return files


def test_odd_modes_are_converted_and_bad_files_skipped_with_a_count(
    tmp_path: Path, photo_crops: list[np.ndarray]
):
    img = photo_crops[0]
    files = _write_odd_modes(tmp_path, img)
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(img).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match=r"skipped 2 of 8 image file\(s\)") as record:
        ds = ImageFolderDataset(tmp_path, crop=64, scale=4)
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    assert ds.num_skipped == 2
    assert {s.path.name for s in ds.skipped} == {"truncated.jpg", "notes.png"}
    assert len(ds.images) == 6
    for arr in ds.images:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3

    gray = np.asarray(Image.fromarray(img).convert("L"))
    assert np.array_equal(load_rgb(files["gray"])[..., 1], gray)
    # 16-bit is scaled to 8 bits, not clipped: x * 257 / 257 == x.
    assert np.abs(load_rgb(files["i16"])[..., 0].astype(int) - gray).max() <= 1
    # Transparent pixels are composited on white; opaque ones keep their colour.
    rgba = load_rgb(files["rgba"])
    half = img.shape[1] // 2
    assert (rgba[:, half:] == 255).all()
    assert np.array_equal(rgba[:, :half], img[:, :half])
    assert (load_rgb(files["gray_alpha"])[:, half:] == 255).all()
    palette = load_rgb(files["palette"]).astype(int)
    assert np.abs(palette - img).mean() < 12  # 64-colour quantisation of the same photo
    assert np.abs(load_rgb(files["cmyk"]).astype(int) - img).mean() < 8


def test_images_smaller_than_the_crop_are_skipped_and_no_usable_image_is_an_error(
    tmp_path: Path, photo_crops: list[np.ndarray]
) -> None:
    Image.fromarray(photo_crops[1]).save(tmp_path / "big.png")
    Image.fromarray(photo_crops[1][:40, :50]).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        ds = ImageFolderDataset(tmp_path, crop=64, scale=4)
    assert "smaller than the 64x64 crop" in ds.skipped[0].reason
    (tmp_path / "big.png").unlink()
    with warnings.catch_warnings(), pytest.raises(DataError, match="no usable training image"):
        warnings.simplefilter("ignore")
        ImageFolderDataset(tmp_path, crop=64, scale=4)
    with pytest.raises(DataError, match="multiple of the scale"):
        ImageFolderDataset(tmp_path, crop=63, scale=4)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", crop=64, scale=4)


def test_step_sampler_gives_each_rank_a_distinct_slice_of_the_same_global_batch() -> None:
    single = StepBatchSampler(batch=6, start_step=0, end_step=4)
    ranks = [StepBatchSampler(batch=6, start_step=0, end_step=4, rank=r, world_size=3) for r in range(3)]
    for step, batch in enumerate(single):
        slices = [r.indices(step) for r in ranks]
        assert sum(slices, []) == batch
        assert len({i for s in slices for i in s}) == 6
    resumed = StepBatchSampler(batch=6, start_step=2, end_step=4)
    assert list(resumed) == list(single)[2:] and len(resumed) == 2
    with pytest.raises(DataError, match="not divisible"):
        StepBatchSampler(batch=5, start_step=0, end_step=1, world_size=2)


def test_offline_training_photos_lists_each_picture_once() -> None:
    photos = offline_training_photos()
    if not photos:
        pytest.skip("offline training photos not installed")
    assert len({p.resolve() for p in photos}) == len(photos)
    assert not any("screenshot" in p.name or "images_dark" in str(p) for p in photos)
    with Image.open(photos[-1]) as img:
        assert min(img.size) >= 256
