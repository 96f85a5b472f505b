"""Quality against the number of steps: PSNR, SSIM (both conventions) and LPIPS on the held-out photos.

The held-out evaluation photos of docs/DESIGN.md section 5 (scikit-image's astronaut, coffee, chelsea,
rocket and hubble_deep_field; scikit-learn's china and flower) are scored by
``esrdf.evaluate.evaluate_models``, the same code as ``esrdf-eval``, once per sampler setting: DDIM at each
step count of the list, and DDPM ancestral over all T (paper Eq. 4-7). Every row is the mean over the
photos; the bicubic and predictor-only rows (paper Section 4.2) do not depend on the sampler and come from
the first run. Cropping, degradation, seeds and the two PSNR/SSIM conventions are ``esrdf.evaluate``'s and
are written into the result.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from esrdf.config import Sampler, SamplingOptions

HELD_OUT = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "china", "flower")
DEFAULT_STEPS = (1, 2, 5, 10, 20, 50)
SCORES = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "lpips")
Log = Callable[[str], None]


class QualityError(ValueError):
    """Bad quality-sweep input; one line a CLI prints as is."""


@dataclass(frozen=True)
class QualityOptions:
    steps: tuple[int, ...] = DEFAULT_STEPS  # DDIM step counts
    ddpm: bool = True  # also DDPM ancestral over all T
    etas: tuple[float, ...] = (0.0,)  # DDIM eta values: 0 deterministic, 1 ancestral (DDPM-like) noise
    seed: int = 0
    lpips: bool = True
    max_size: int | None = 128  # HR crop side; the U-Net runs on the whole crop
    device: str | None = None


def held_out_photos(names: Iterable[str] = HELD_OUT) -> dict[str, np.ndarray]:
    """The named held-out photos as HxWx3 uint8 (grayscale ones stacked to RGB)."""
    try:
        from skimage import data
        from sklearn.datasets import load_sample_image
    except ImportError as exc:
        raise QualityError(
            f"the held-out photos need scikit-image and scikit-learn ({exc}); "
            "pip install scikit-image scikit-learn, or pass --data DIR"
        ) from exc
    photos: dict[str, np.ndarray] = {}
    for name in names:
        if name in ("china", "flower"):
            img = load_sample_image(f"{name}.jpg")
        elif name in HELD_OUT:
            img = getattr(data, name)()
        else:
            raise QualityError(f"unknown held-out photo {name!r}; choose from {', '.join(HELD_OUT)}")
        img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
        photos[name] = np.ascontiguousarray(img, dtype=np.uint8)
    return photos


def write_photos(photos: dict[str, np.ndarray], directory: Path) -> Path:
    """PNG (lossless) copies of the photos, the folder layout ``evaluate_models`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, img in photos.items():
        Image.fromarray(img).save(directory / f"{name}.png")
    return directory


def lpips_status(wanted: bool) -> tuple[bool, str]:
    """(score LPIPS?, why not) without loading the network: the converted VGG16 weights must exist."""
    if not wanted:
        return False, "not asked for"
    from esrdf.vgg import vgg_weights_path

    path = vgg_weights_path()
    if path.is_file():
        return True, f"LPIPS v0.1 (VGG16) weights from {path}"
    return False, f"no converted VGG16 weights at {path}; run `esrdf-train vgg-weights` to score LPIPS"


def _means(means: dict[str, dict[str, float | None]], method: str) -> dict[str, float | None]:
    return {s: means[method].get(s) for s in SCORES}


def _row(
    method: str, sampler: str | None, steps: int, eta: float | None, scores: dict[str, Any]
) -> dict[str, Any]:
    return {"method": method, "sampler": sampler, "steps": steps, "eta": eta, **scores}


def _load(ckpt: Path, options: QualityOptions) -> tuple[Any, Any]:
    """(checkpoint, torch device), or ``QualityError`` with one line."""
    from esrdf.checkpoint import CheckpointError, load_checkpoint
    from esrdf.evaluate import EvalError, resolve_device

    try:
        loaded, device = load_checkpoint(Path(ckpt)), resolve_device(options.device)
    except (CheckpointError, EvalError, ValueError) as exc:
        raise QualityError(str(exc)) from exc
    if loaded.unet is None:
        raise QualityError(f"{ckpt}: a predictor-only checkpoint; the sweep needs the diffusion U-Net")
    timesteps = loaded.config.schedule.timesteps
    if not options.steps or any(not 1 <= n <= timesteps for n in options.steps):
        raise QualityError(
            f"quality steps must be in 1..{timesteps} (the schedule's T), got {list(options.steps)}"
        )
    if not options.etas or any(not 0.0 <= e <= 1.0 for e in options.etas):
        raise QualityError(f"DDIM eta values must be in [0, 1], got {list(options.etas)}")
    return loaded, device


def _runs(options: QualityOptions, timesteps: int) -> list[tuple[Sampler, int, float]]:
    """(sampler, steps, eta) per evaluation pass: DDIM at every eta and step count, then DDPM over T."""
    runs: list[tuple[Sampler, int, float]] = [
        ("ddim", n, eta) for eta in options.etas for n in sorted(set(options.steps))
    ]
    return runs + ([("ddpm", timesteps, 1.0)] if options.ddpm else [])


def _evaluate(
    loaded: Any,
    device: Any,
    folder: Path,
    run: tuple[Sampler, int, float],
    options: QualityOptions,
    lpips: bool,
) -> tuple[Any, float]:
    """One esrdf-eval pass over the folder; (its report, wall seconds per photo)."""
    from esrdf.evaluate import EvalError, EvalOptions, evaluate_models

    sampler, steps, eta = run
    eval_options = EvalOptions(
        sampling=SamplingOptions(sampler, steps, eta, options.seed),
        lpips=lpips,
        max_size=options.max_size,
        progress=False,
    )
    start = time.perf_counter()
    try:
        report = evaluate_models(
            loaded.config,
            loaded.predictor,
            loaded.unet,
            folder,
            eval_options,
            device,
            checkpoint=str(loaded.path),
        )
    except EvalError as exc:
        raise QualityError(str(exc)) from exc
    return report, (time.perf_counter() - start) / len(report.images)


def _report_meta(report: Any) -> dict[str, Any]:
    """How the photos were scored (esrdf.evaluate's conventions) and the sizes actually scored."""
    images = [
        {"name": r.name, "original_size": list(r.original_size), "evaluated_size": list(r.evaluated_size)}
        for r in report.images
    ]
    return {"conventions": report.conventions, "images": images}


def quality_sweep(
    ckpt: Path,
    options: QualityOptions,
    data_dir: Path | None = None,
    photos: dict[str, np.ndarray] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Rows of mean scores: bicubic, predictor-only, ESRDF with DDIM at each eta and step count, ESRDF
    with DDPM over all T; plus the PSNR-Y of every photo per row."""
    loaded, device = _load(ckpt, options)
    timesteps = loaded.config.schedule.timesteps
    use_lpips, lpips_note = lpips_status(options.lpips)
    rows: list[dict[str, Any]] = []
    per_image: dict[str, dict[str, float | None]] = {}
    meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="esrdf-bench-photos-") as tmp:
        folder = data_dir or write_photos(photos if photos is not None else held_out_photos(), Path(tmp))
        for sampler, steps, eta in _runs(options, timesteps):
            report, seconds = _evaluate(
                loaded, device, Path(folder), (sampler, steps, eta), options, use_lpips
            )
            if not rows:  # bicubic and predictor-only do not depend on the sampler
                rows += [_row(m, None, 0, None, _means(report.means, m)) for m in ("bicubic", "predictor")]
                per_image |= {
                    m: {r.name: r.scores[m].psnr_y for r in report.images} for m in ("bicubic", "predictor")
                }
                meta = _report_meta(report)
            row = _row("esrdf", sampler, steps, eta, _means(report.means, "esrdf"))
            rows.append(row | {"wall_seconds_per_image": round(seconds, 3)})
            per_image[f"{sampler}-{steps}-eta{eta:g}"] = {
                r.name: r.scores["esrdf"].psnr_y for r in report.images
            }
            log(
                f"quality: {sampler} eta {eta:g} {steps:4d} steps  PSNR-Y {row['psnr_y']:.2f} dB  "
                f"SSIM-Y {row['ssim_y']:.4f}"
            )
    return {
        "checkpoint": str(ckpt),
        "model": loaded.config.name,
        "scale": loaded.config.scale,
        "unet_weights": loaded.unet_weights,
        "timesteps": timesteps,
        "device": str(device),
        "etas": list(options.etas),
        "seed": options.seed,
        "max_size": options.max_size,
        "lpips": {"scored": use_lpips, "note": lpips_note},
        "rows": rows,
        "per_image_psnr_y": per_image,
        **meta,
        "wall_seconds_note": "wall time per photo of one esrdf-eval pass: sampling plus scoring, eager torch",
    }
