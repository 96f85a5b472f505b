"""Parity of the exported graphs with the eager model, measured at export (docs/DESIGN.md section 4).

Inputs are real photo content, never noise alone: crops of scikit-image's astronaut (bundled with
scikit-image, held out from training), or, where scikit-image is missing, a deterministic synthetic image
with edges, gradients and texture; ``ParityInputs.image_source`` records which.

- predictor graph: lr = bicubic-downsampled photo crops (the paper's degradation), output coarse;
- step graph: cond = eager coarse of those crops, x_t = q(r_t | r_0) of the real residual r_0 = hr - coarse
  (paper Eq. 3) at timesteps spread over the schedule, and ``coefs = (0, 1, 0)`` so ``x_prev`` is eps itself:
  the U-Net's output, undamped by the small step coefficients of late DDPM steps.

Figures are on the graphs' [-1, 1] output scale; PSNR uses that range's peak-to-peak of 2, so it equals the
PSNR of the same images mapped to [0, 1]. ``max_abs_rel`` is max |a - b| / max |b|. Bars come from
``esrdf.runtime.tolerances`` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esrdf.runtime.graph_spec import PREDICTOR, STEP
from esrdf.runtime.tolerances import FP16_GRAPH, FP32_GRAPH, ParityBar

VALUE_PEAK_TO_PEAK = 2.0  # graphs work on [-1, 1]
PSNR_CAP_DB = 200.0  # identical outputs: a finite number keeps the manifest valid JSON
Feeds = dict[str, np.ndarray]


class ParityError(RuntimeError):
    """An exported graph misses a parity bar of ``esrdf.runtime.tolerances``."""


@dataclass(frozen=True)
class ParityFigures:
    max_abs: float
    max_abs_rel: float
    median_abs: float
    psnr_db: float
    nonfinite: int  # NaN/Inf values in the candidate output

    def as_manifest(self) -> dict[str, float]:
        return {
            "max_abs": self.max_abs,
            "max_abs_rel": self.max_abs_rel,
            "median_abs": self.median_abs,
            "psnr_db": self.psnr_db,
            "nonfinite": float(self.nonfinite),
        }


def compare(candidate: np.ndarray, reference: np.ndarray) -> ParityFigures:
    """Figures of ``candidate`` against ``reference`` (same shape), computed in float64."""
    if candidate.shape != reference.shape:
        raise ValueError(f"shape {candidate.shape} differs from the reference {reference.shape}")
    cand, ref = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    nonfinite = int(np.size(cand) - np.count_nonzero(np.isfinite(cand)))
    diff = np.abs(np.nan_to_num(cand, nan=np.inf) - ref)
    mse = float(np.mean(diff**2))
    psnr = PSNR_CAP_DB if mse == 0.0 else min(PSNR_CAP_DB, 10.0 * math.log10(VALUE_PEAK_TO_PEAK**2 / mse))
    scale = float(np.max(np.abs(ref))) or 1.0
    return ParityFigures(
        max_abs=float(diff.max()),
        max_abs_rel=float(diff.max()) / scale,
        median_abs=float(np.median(diff)),
        psnr_db=psnr,
        nonfinite=nonfinite,
    )


def bar_failures(figures: ParityFigures, bar: ParityBar, what: str) -> list[str]:
    """One line per bar that ``figures`` miss (empty when all pass); NaN/Inf always fails."""
    fails = []
    if figures.nonfinite:
        fails.append(f"{what}: {figures.nonfinite} NaN/Inf values")
    if bar.max_abs_rel is not None and not figures.max_abs_rel <= bar.max_abs_rel:
        fails.append(f"{what}: max abs / output scale {figures.max_abs_rel:.3g} > {bar.max_abs_rel:g}")
    if bar.max_abs is not None and not figures.max_abs <= bar.max_abs:
        fails.append(f"{what}: max abs {figures.max_abs:.3g} > {bar.max_abs:g}")
    if bar.median_abs is not None and not figures.median_abs <= bar.median_abs:
        fails.append(f"{what}: median abs {figures.median_abs:.3g} > {bar.median_abs:g}")
    if bar.min_psnr_db is not None and not figures.psnr_db >= bar.min_psnr_db:
        fails.append(f"{what}: PSNR {figures.psnr_db:.1f} dB < {bar.min_psnr_db:g} dB")
    return fails


def bar_for(precision: str) -> ParityBar:
    return FP32_GRAPH if precision == "fp32" else FP16_GRAPH


def parity_photo() -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 photo for parity, and where it came from."""
    try:
        from skimage import data
    except ImportError:
        return synthetic_photo(), "synthetic (scikit-image not installed)"
    return np.ascontiguousarray(data.astronaut()[..., :3]), "skimage.data.astronaut"


def synthetic_photo(size: int = 512) -> np.ndarray:
    """A deterministic natural-ish image: smooth colour gradients, hard-edged shapes and fine texture."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    rng = np.random.default_rng(1234)
    smooth = np.stack(
        [0.5 + 0.4 * np.sin(2.1 * x + 1.3 * y), 0.5 + 0.3 * np.cos(3.3 * y - 0.7 * x), 0.4 + 0.3 * x * y],
        axis=-1,
    )
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.05
    smooth[disc] = [0.9, 0.75, 0.3]
    smooth[(x > 0.15) & (x < 0.35) & (y > 0.55) & (y < 0.9)] = [0.15, 0.2, 0.45]
    texture = 0.08 * np.sin(60 * x) * np.sin(45 * y) + 0.03 * rng.standard_normal((size, size))
    img = np.clip(smooth + texture[..., None], 0.0, 1.0)
    return (img * 255.0 + 0.5).astype(np.uint8)


def photo_crops(photo: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """``count`` different (height, width) crops as float32 NCHW in [-1, 1]; reflect-padded if too small."""
    pad_h, pad_w = max(0, height - photo.shape[0]), max(0, width - photo.shape[1])
    if pad_h or pad_w:
        photo = np.pad(photo, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    ys = np.linspace(0, photo.shape[0] - height, count).round().astype(int)
    xs = np.linspace(photo.shape[1] - width, 0, count).round().astype(int)
    crops = np.stack([photo[y : y + height, x : x + width] for y, x in zip(ys, xs, strict=True)])
    return (crops.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).copy()


def predictor_feeds(photo: np.ndarray, batch: int, lr_height: int, lr_width: int, scale: int) -> Feeds:
    """lr: antialiased bicubic downsampling of real HR crops, (B, C, lr_height, lr_width)."""
    hr = torch.from_numpy(photo_crops(photo, batch, lr_height * scale, lr_width * scale))
    lr = F.interpolate(hr, size=(lr_height, lr_width), mode="bicubic", antialias=True, align_corners=False)
    return {"lr": lr.clamp(-1.0, 1.0).numpy()}


def step_feeds(photo: np.ndarray, coarse: np.ndarray, alphas_cumprod: np.ndarray, seed: int = 0) -> Feeds:
    """Step inputs around real content: x_t = sqrt(ab) r_0 + sqrt(1 - ab) z (paper Eq. 3), coefs (0, 1, 0)."""
    batch, _c, height, width = coarse.shape
    hr = photo_crops(photo, batch, height, width)
    rng = np.random.default_rng(seed)
    timesteps = np.linspace(len(alphas_cumprod) - 1, 0, batch).round().astype(np.int64)
    ab = np.asarray(alphas_cumprod, np.float64)[timesteps][:, None, None, None]
    z = rng.standard_normal(coarse.shape)
    x_t = np.sqrt(ab) * (hr - coarse) + np.sqrt(1.0 - ab) * z
    coefs = np.tile(np.array([[0.0, 1.0, 0.0]], np.float32), (batch, 1))
    noise = rng.standard_normal(coarse.shape).astype(np.float32)
    return {
        "x_t": x_t.astype(np.float32),
        "cond": coarse.astype(np.float32),
        "t": timesteps.astype(np.float32),
        "coefs": coefs,
        "noise": noise,
    }


def run_eager(module: nn.Module, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The eager module on ``feeds`` (inputs in graph order), on the CPU, in inference mode."""
    with torch.inference_mode():
        out = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()))
    return np.asarray(out.float().numpy())


def run_onnxruntime(path: Path, feeds: Mapping[str, np.ndarray], threads: int | None = None) -> np.ndarray:
    """The graph at ``path`` under onnxruntime's CPU execution provider; its single output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, dict(feeds))
    return np.asarray(out)


def make_feeds(
    predictor: nn.Module,
    alphas_cumprod: np.ndarray,
    photo: np.ndarray,
    batch: int,
    lr_height: int,
    lr_width: int,
    scale: int,
) -> dict[str, Feeds]:
    """Feeds for both graphs at one shape; the step graph's ``cond`` is the eager predictor's output."""
    pred = predictor_feeds(photo, batch, lr_height, lr_width, scale)
    coarse = run_eager(predictor, pred)
    return {PREDICTOR: pred, STEP: step_feeds(photo, coarse, alphas_cumprod)}


def measure_graph(path: Path, feeds: Mapping[str, np.ndarray], eager_output: np.ndarray) -> ParityFigures:
    """onnxruntime (CPU) on the graph at ``path`` against the eager output for the same feeds."""
    return compare(run_onnxruntime(path, feeds), eager_output)


def save_polygraphy_io(
    directory: Path, role: str, feeds: Mapping[str, np.ndarray], output_name: str, eager_output: np.ndarray
) -> tuple[Path, Path]:
    """Write ``<role>.inputs.json`` and ``<role>.eager_outputs.json`` in polygraphy's formats.

    Then ``polygraphy run <role>.onnx --onnxrt --load-inputs <role>.inputs.json --load-outputs
    <role>.eager_outputs.json`` compares a graph (or a TensorRT engine, with ``--trt``) with the eager model.
    """
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inputs_path = directory / f"{role}.inputs.json"
    outputs_path = directory / f"{role}.eager_outputs.json"
    save_json(
        [{name: np.ascontiguousarray(v) for name, v in feeds.items()}],
        str(inputs_path),
        description=f"{role} graph inputs",
    )
    runner = "torch-eager"
    result = IterationResult(outputs={output_name: np.ascontiguousarray(eager_output)}, runner_name=runner)
    RunResults([(runner, [result])]).save(str(outputs_path))
    return inputs_path, outputs_path
