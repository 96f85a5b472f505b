"""Evaluate a checkpoint on a folder of HR photos: bicubic vs predictor-only vs full ESRDF.

For every image (ESRDF paper Section 5 protocol, made explicit):

1. **HR.** The photo is decoded to 8-bit RGB (``esrdf.data.load_rgb``). It is cropped, never padded, so that
   every scored pixel is real: padding would put synthetic border content into PSNR/SSIM. Its sides are cut
   to a multiple of ``lcm(scale, unet.multiple_of)`` (the LR must be an exact 1/scale and the U-Net runs at
   HR size) by dropping the bottom/right rows and columns, as MATLAB ``modcrop`` does in SR benchmarks.
   Larger than ``max_size`` on a side, it is first centre-cropped to ``max_size`` (default 512) so the U-Net
   runs on the whole crop in one pass; the report flags each image so cropped.
2. **LR** = PIL bicubic (antialiased) downsampling of the HR crop: the same degradation as training
   (``esrdf.data.bicubic_downsample``).
3. **Outputs.** bicubic = PIL bicubic upsampling of the LR; predictor = P(lr) (Section 4.2);
   ESRDF = P(lr) + sampled residual (Eq. 7) with the chosen sampler, steps, eta, prior, and a seed of
   ``seed + image index`` so every image is reproducible on its own. Outputs are clamped to [-1, 1] and
   rounded to uint8, as a saved PNG would be, before anything is scored.
4. **Scores** (``esrdf.metrics``): PSNR/SSIM as the paper (RGB, full image) and in the SR convention (Y,
   border of ``scale`` px cropped), LPIPS (VGG16; lower is better), and the entropy of the residual
   ``hr - output`` (``metrics.image_entropy``): the paper's central claim is that the predictor residual has
   lower entropy than the bicubic one. FID (``esrdf.fid``) only when asked, over the whole set.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from esrdf import metrics
from esrdf.config import PRIORS, SAMPLERS, ModelConfig, Prior, ResolvedSampling, Sampler, SamplingOptions
from esrdf.data import bicubic_downsample, list_image_files, load_rgb, to_tensor
from esrdf.diffusion.samplers import sample_residual_sr
from esrdf.diffusion.schedule import Schedule, make_schedule
from esrdf.fid import FidScores, fid_scores, find_inception_file

METHODS = ("bicubic", "predictor", "esrdf")
SCORE_NAMES = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "lpips", "residual_entropy_bits")
DEFAULT_MAX_SIZE = 512
ENTROPY_BINS = 256


class EvalError(ValueError):
    """Bad evaluation input (folder, options); the message is one line a CLI can print as is."""


@dataclass(frozen=True)
class EvalOptions:
    """How to sample and what to score. Image i uses ``sampling.seed + i``; steps not given means all T
    of the checkpoint's schedule (the eager sampler's default, not the runtime's, see ``sampling_for``)."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    lpips: bool = True
    fid: bool = False
    side_by_side_dir: Path | None = None
    max_images: int | None = None
    max_size: int | None = DEFAULT_MAX_SIZE
    progress: bool = True


@dataclass
class MethodScores:
    psnr_rgb: float
    ssim_rgb: float
    psnr_y: float
    ssim_y: float
    lpips: float | None
    residual_entropy_bits: float


@dataclass
class ImageResult:
    name: str
    original_size: tuple[int, int]  # (H, W) of the photo
    evaluated_size: tuple[int, int]  # (H, W) of the HR crop actually scored
    cropped_to_max_size: bool
    scores: dict[str, MethodScores]
    side_by_side: str | None = None


@dataclass
class EvalReport:
    """Everything ``esrdf-eval`` prints and writes; ``to_dict`` is plain JSON (non-finite floats -> null)."""

    checkpoint: str
    data: str
    model: str
    scale: int
    device: str
    sampler: str
    steps: int
    eta: float
    seed: int
    prior: str
    max_size: int | None
    methods: list[str]
    conventions: dict[str, str]
    images: list[ImageResult]
    means: dict[str, dict[str, float | None]]
    entropy_claim: dict[str, float | int]
    fid: FidScores | None = None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        safe: dict[str, Any] = _json_safe(dataclasses.asdict(self))
        return safe

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def _json_safe(value: Any) -> Any:
    # inf PSNR (identical images) is not valid JSON; null it rather than write a non-standard 'Infinity'.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def conventions(scale: int, step: int, max_size: int | None) -> dict[str, str]:
    """Human-readable definitions of every reported figure and of the image preparation."""
    crop = f"centre-cropped to at most {max_size} px a side first" if max_size else "no size limit"
    return {
        **metrics.metric_conventions(scale, ENTROPY_BINS),
        "hr": f"cropped bottom/right to a multiple of {step} (lcm of scale and U-Net multiple_of); {crop}",
        "lr": "PIL bicubic (antialiased) downsampling of the HR crop, as in training",
        "outputs": "clamped to [-1,1] and rounded to uint8 before scoring",
    }


def size_step(cfg: ModelConfig, has_unet: bool) -> int:
    """HR sides must be multiples of this: the scale, and the U-Net's ``multiple_of`` when it runs."""
    return math.lcm(cfg.scale, cfg.unet.multiple_of) if has_unet else cfg.scale


def crop_hr(image: np.ndarray, step: int, max_size: int | None) -> tuple[np.ndarray, bool]:
    """Centre-crop sides above ``max_size``, then drop bottom/right pixels to a multiple of ``step``."""
    height, width = image.shape[:2]
    limit_h = min(height, max_size) if max_size else height
    limit_w = min(width, max_size) if max_size else width
    target_h, target_w = (limit_h // step) * step, (limit_w // step) * step
    if target_h == 0 or target_w == 0:
        raise EvalError(f"{width}x{height} is smaller than one {step}x{step} block")
    top = (height - limit_h) // 2
    left = (width - limit_w) // 2
    cropped = max_size is not None and (height > max_size or width > max_size)
    return np.ascontiguousarray(image[top : top + target_h, left : left + target_w]), cropped


def bicubic_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: PIL bicubic upsampling, (h, w, 3) uint8 -> (h*s, w*s, 3) uint8."""
    h, w = lr.shape[:2]
    return np.asarray(Image.fromarray(lr).resize((w * scale, h * scale), Image.Resampling.BICUBIC))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [-1, 1] -> (H, W, 3) uint8, clamped and rounded like a saved image."""
    img = ((x[0].detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


LpipsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Evaluator:
    """What every image of one run shares: networks on their device, schedule, options, LPIPS."""

    config: ModelConfig
    predictor: torch.nn.Module
    unet: torch.nn.Module | None
    schedule: Schedule | None
    options: EvalOptions
    device: torch.device
    lpips_fn: LpipsFn | None

    def score(self, hr: np.ndarray, output: np.ndarray) -> MethodScores:
        """All scores of one method's uint8 output against the uint8 HR crop."""
        lpips_value = None
        if self.lpips_fn is not None:
            with torch.no_grad():
                pair = (to_tensor(output)[None].to(self.device), to_tensor(hr)[None].to(self.device))
                lpips_value = float(self.lpips_fn(*pair)[0])
        scale = self.config.scale
        return MethodScores(
            psnr_rgb=metrics.psnr_rgb(hr, output),
            ssim_rgb=metrics.ssim_rgb(hr, output),
            psnr_y=metrics.psnr_y(hr, output, crop=scale),
            ssim_y=metrics.ssim_y(hr, output, crop=scale),
            lpips=lpips_value,
            residual_entropy_bits=metrics.image_entropy(metrics.residual01(hr, output), bins=ENTROPY_BINS),
        )

    def super_resolve(self, lr: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """bicubic, predictor-only and (with a U-Net) ESRDF outputs of one LR image, as uint8 HxWx3."""
        outputs = {"bicubic": bicubic_upsample(lr, self.config.scale)}
        lr_t = to_tensor(lr)[None].to(self.device)  # (1, 3, h, w) in [-1, 1]
        if self.unet is None or self.schedule is None:
            with torch.no_grad():
                outputs["predictor"] = to_uint8(self.predictor(lr_t))
            return outputs
        generator = torch.Generator(device=self.device).manual_seed(seed)
        s = sampling_for(self.options, self.schedule.timesteps)
        sampler = cast(Sampler, s.sampler)  # checked by check_options
        coarse, sr = sample_residual_sr(self.predictor, self.unet, self.schedule, lr_t, sampler=sampler,
                                        steps=s.steps, eta=s.eta, generator=generator,
                                        prior=cast(Prior, s.prior),
                                        prediction=self.config.unet.prediction)  # fmt: skip
        return {**outputs, "predictor": to_uint8(coarse), "esrdf": to_uint8(sr)}

    def image(self, path: Path, name: str, index: int) -> tuple[ImageResult, dict[str, np.ndarray]]:
        """Crop, degrade, super-resolve and score one photo; returns its row and its images (HR included)."""
        step = size_step(self.config, self.unet is not None)
        hr, original_size, cropped = load_hr(path, step, self.options.max_size)
        seed = sampling_for(self.options, self.config.schedule.timesteps).seed + index
        outputs = self.super_resolve(bicubic_downsample(hr, self.config.scale), seed)
        scores = {method: self.score(hr, output) for method, output in outputs.items()}
        row = ImageResult(name, original_size, (hr.shape[0], hr.shape[1]), cropped, scores)
        if self.options.side_by_side_dir is not None:
            panels = [*outputs.values(), hr]
            row.side_by_side = str(write_side_by_side(self.options.side_by_side_dir, name, panels))
        return row, {**outputs, "hr": hr}


def write_side_by_side(directory: Path, name: str, panels: list[np.ndarray]) -> Path:
    """Panels (bicubic | predictor | ESRDF | HR) side by side, left to right, in one PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    # Keep the source suffix in the name: a.jpg and a.png in one folder must not overwrite each other.
    path = directory / (name.replace("/", "__") + ".side_by_side.png")
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    return path


def mean_scores(images: list[ImageResult], methods: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """Per method, the mean over images of every score (None where a score was not computed)."""
    means: dict[str, dict[str, float | None]] = {}
    for method in methods:
        means[method] = {}
        for score in SCORE_NAMES:
            values = [getattr(image.scores[method], score) for image in images]
            means[method][score] = None if any(v is None for v in values) else float(np.mean(values))
    return means


def entropy_claim(images: list[ImageResult]) -> dict[str, float | int]:
    """The paper's central claim, counted: on how many images is H(hr - P(lr)) < H(hr - bicubic(lr))?"""
    saved = [
        r.scores["bicubic"].residual_entropy_bits - r.scores["predictor"].residual_entropy_bits
        for r in images
    ]
    return {
        "images": len(saved),
        "predictor_lower_than_bicubic": int(sum(s > 0 for s in saved)),
        "mean_bits_saved": float(np.mean(saved)),
    }


def sampling_for(options: EvalOptions, timesteps: int) -> ResolvedSampling:
    """The evaluation's sampling: what is not given resolves as everywhere, except that steps default to
    all T (the eager sampler's, and the paper's, default)."""
    return options.sampling.resolve(timesteps, defaults=SamplingOptions(steps=timesteps))


def check_options(options: EvalOptions, timesteps: int, step: int) -> None:
    """Reject bad options before any image is processed, with one-line messages."""
    given, s = options.sampling, sampling_for(options, timesteps)
    if s.sampler not in SAMPLERS:
        raise EvalError(f"sampler must be 'ddim' or 'ddpm', got {s.sampler!r}")
    if not 0.0 <= s.eta <= 1.0:
        raise EvalError(f"eta must be in [0, 1], got {s.eta}")
    if s.prior not in PRIORS:
        raise EvalError(f"prior must be one of {PRIORS}, got {s.prior!r}")
    if not 1 <= s.steps <= timesteps:
        raise EvalError(f"steps must be in 1..{timesteps} (the schedule's T), got {s.steps}")
    if s.sampler == "ddpm" and s.steps != timesteps:
        raise EvalError(f"the DDPM sampler runs all {timesteps} steps; use --sampler ddim for {given.steps}")
    if options.max_size is not None and options.max_size < step:
        raise EvalError(f"max_size {options.max_size} is smaller than the size step {step}")
    if options.max_images is not None and options.max_images < 1:
        raise EvalError(f"max_images must be >= 1, got {options.max_images}")


def _make_lpips(device: torch.device) -> LpipsFn:
    from esrdf.lpips import LPIPS

    return LPIPS(device)


def load_hr(path: Path, step: int, max_size: int | None) -> tuple[np.ndarray, tuple[int, int], bool]:
    """(HR crop, original (H, W), cropped to max_size?) of one photo; ``EvalError`` if unusable."""
    try:
        photo = load_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises all of these for truncated, corrupt or unsupported files.
        raise EvalError(f"does not decode ({type(exc).__name__}: {exc})") from exc
    hr, cropped = crop_hr(photo, step, max_size)
    return hr, (photo.shape[0], photo.shape[1]), cropped


def _start(config: ModelConfig, predictor: torch.nn.Module, unet: torch.nn.Module | None, data_dir: Path,
           options: EvalOptions, device: torch.device) -> tuple[_Evaluator, list[Path]]:  # fmt: skip
    """Check everything that can fail before the first (slow) image: options, folder, FID file, LPIPS."""
    check_options(options, config.schedule.timesteps, size_step(config, unet is not None))
    try:
        files = list_image_files(data_dir)
    except ValueError as exc:
        raise EvalError(str(exc)) from exc
    if not files:
        raise EvalError(f"no image files in {data_dir}")
    if options.fid:
        find_inception_file()
    lpips_fn = _make_lpips(device) if options.lpips else None
    schedule = make_schedule(config.schedule) if unet is not None else None
    unet = None if unet is None else unet.to(device).eval()
    run = _Evaluator(config, predictor.to(device).eval(), unet, schedule, options, device, lpips_fn)
    return run, files


def evaluate_models(config: ModelConfig, predictor: torch.nn.Module, unet: torch.nn.Module | None,
                    data_dir: Path, options: EvalOptions, device: torch.device,
                    checkpoint: str = "") -> EvalReport:  # fmt: skip
    """Evaluate built networks (moved to ``device``, set to eval) on the images under ``data_dir``."""
    data_dir = Path(data_dir)
    run, files = _start(config, predictor, unet, data_dir, options, device)
    methods = METHODS if unet is not None else METHODS[:2]
    images: list[ImageResult] = []
    skipped: list[str] = []
    sets: dict[str, list[np.ndarray]] = {m: [] for m in (*methods, "hr")}
    for path in tqdm(files, desc="esrdf-eval", unit="img", disable=not options.progress):
        if options.max_images is not None and len(images) >= options.max_images:
            break
        name = path.relative_to(data_dir).as_posix() if path.is_relative_to(data_dir) else path.name
        try:
            row, produced = run.image(path, name, len(images))
        except EvalError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        images.append(row)
        for key, value in produced.items() if options.fid else ():
            sets[key].append(value)
    if not images:
        raise EvalError(f"no usable image in {data_dir} ({len(files)} image file(s), {len(skipped)} skipped)")
    fid_result = fid_scores(sets["hr"], {m: sets[m] for m in methods}, device) if options.fid else None
    s = sampling_for(options, config.schedule.timesteps)
    return EvalReport(
        checkpoint=checkpoint, data=str(data_dir), model=config.name, scale=config.scale, device=str(device),
        sampler=s.sampler if unet is not None else "none", steps=s.steps if unet is not None else 0,
        eta=s.eta, seed=s.seed, prior=s.prior if unet is not None else "none", max_size=options.max_size,
        methods=list(methods),
        conventions=conventions(config.scale, size_step(config, unet is not None), options.max_size),
        images=images, means=mean_scores(images, methods), entropy_claim=entropy_claim(images),
        fid=fid_result, skipped=skipped, notes=_notes(images, options, unet is not None, fid_result),
    )  # fmt: skip


def _notes(
    images: list[ImageResult], options: EvalOptions, has_unet: bool, fid: FidScores | None
) -> list[str]:
    notes = [] if has_unet else ["the checkpoint holds no U-Net: predictor-only, no ESRDF column"]
    n_cropped = sum(r.cropped_to_max_size for r in images)
    if n_cropped:
        notes.append(f"{n_cropped} image(s) larger than {options.max_size} px were centre-cropped to it "
                     "(--max-size); the networks ran on the whole crop")  # fmt: skip
    return notes + ([fid.caveat] if fid is not None else [])


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when available; asking for CUDA without it is an error, not a silent CPU run."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda was asked for but no CUDA device is available")
    return resolved


def evaluate(ckpt_dir: Path, data_dir: Path, sampling: SamplingOptions | None = None,
             device: str | None = None, lpips: bool = True,
             fid: bool = False, side_by_side_dir: Path | None = None, max_images: int | None = None,
             max_size: int | None = DEFAULT_MAX_SIZE, progress: bool = True) -> EvalReport:  # fmt: skip
    """Load the checkpoint at ``ckpt_dir`` and evaluate it on the HR photos under ``data_dir``.

    What ``sampling`` leaves out comes from the checkpoint's ``sampling.json`` when it has one (the defaults
    its bundle records), then as ``sampling_for`` says."""
    from esrdf.checkpoint import load_checkpoint, read_sampling_defaults

    side_dir = None if side_by_side_dir is None else Path(side_by_side_dir)
    given = (sampling or SamplingOptions()).or_defaults(read_sampling_defaults(Path(ckpt_dir)))
    options = EvalOptions(sampling=given, lpips=lpips, fid=fid,
                          side_by_side_dir=side_dir, max_images=max_images, max_size=max_size,
                          progress=progress)  # fmt: skip
    torch_device = resolve_device(device)
    loaded = load_checkpoint(Path(ckpt_dir))
    return evaluate_models(loaded.config, loaded.predictor, loaded.unet, Path(data_dir), options,
                           torch_device, checkpoint=str(ckpt_dir))  # fmt: skip
