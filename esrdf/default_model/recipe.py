"""The recipe of the shipped default 4x model: train on the offline photos, export, install into the package.

``python -m esrdf.default_model.recipe train --out out/default_model`` trains both stages, resuming each one
from its own checkpoint after an interruption (run the same command again). ``... evaluate`` scores the
installed checkpoint on the held-out photos (MODEL_CARD.md's table). Shipping (export the onnxruntime
bundle, install checkpoint and bundle into this package) belongs to the export layer, which the model
package does not import: ``python -m esrdf.export.default_model --out out/default_model``. ``make
default-model`` runs train, then ship.

The settings are the paper's networks and objectives (Section 3 and 4, Eq. 1-7 and 15) cut down to a
budget of about one hour on a 2-core CPU:

- predictor: the paper's (2.38M parameters); L = L_Em + L_Pixel (Eq. 10-14) with L_Em over 32 bins instead
  of 256 (same kernel width in bins), and without L_Feat, whose VGG16 pass cost about 40% more time per step
  and whose unweighted value was ~10x L_Pixel, pulling away from PSNR in a short run;
- U-Net: a smaller SR3 U-Net than ``small`` (32 channels, multipliers 1,2,2,2, one res block per level,
  1.44M parameters) so that checkpoint and bundle fit the 30 MB package budget; the paper's schedule
  (linear beta 1e-6..1e-2, T = 200) and L1 on eps;
- the predictor on 64 px HR crops (16 px LR), the U-Net on 48 px crops (its step costs ~2x the
  predictor's), of photos shrunk to a 1024 px longer side, batch 8.

The U-Net run of the shipped model was stopped at step 901 to fit the time budget (``DIFFUSION_STEPS``);
a run stopped and resumed equals an uninterrupted one of the same length (``esrdf.training``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from esrdf.cli.sampling import sampling_options
from esrdf.config import ModelConfig, SamplingOptions, UNetConfig, preset
from esrdf.default_model import RECOMMENDED_SAMPLING
from esrdf.default_model.goals import Goal, check_goals

if TYPE_CHECKING:  # the training config imports the losses, hence torch: only where it is used
    from esrdf.training.config import TrainConfig

PREDICTOR_DIR, DIFFUSION_DIR = "predictor", "diffusion"
SHIP_CKPT_DIR = "ship_checkpoint"
TIMINGS_FILE = "timings.json"
PACKAGE_DIR = Path(__file__).resolve().parent

# Steps chosen from a 20-step probe of each stage on the 2-core CPU dev machine (see MODEL_CARD.md).
PREDICTOR_STEPS = 4000
DIFFUSION_STEPS = 6000


def default_model_config() -> ModelConfig:
    """The paper predictor with a 1.44M-parameter U-Net and the paper's schedule."""
    unet = UNetConfig(
        inner_channels=32,
        channel_mults=(1, 2, 2, 2),
        attn_resolutions=(16,),
        res_blocks=1,
        norm_groups=16,
        train_size=128,
    )
    return dataclasses.replace(preset("paper"), name="default", unet=unet)


def predictor_train_config(steps: int) -> TrainConfig:
    from esrdf.losses.entropy import EntropyLossConfig
    from esrdf.losses.total import LossConfig
    from esrdf.training.config import TrainConfig

    loss = LossConfig(w_feat=0.0, entropy=EntropyLossConfig(bins=32, sigma=0.08))
    return TrainConfig(
        kind="predictor",
        steps=steps,
        batch=16,
        crop=96,
        lr=5e-4,
        lr_schedule="cosine",
        warmup_steps=100,
        amp="bf16",
        save_every=100,
        max_side=1024,
        predictor_loss=loss,
        decode_cache=True,
    )


def diffusion_train_config(steps: int) -> TrainConfig:
    from esrdf.training.config import TrainConfig

    return TrainConfig(
        kind="diffusion",
        steps=steps,
        batch=8,
        crop=64,
        lr=3e-4,
        lr_schedule="cosine",
        warmup_steps=50,
        ema_decay=0.995,
        amp="bf16",
        save_every=100,
        max_side=1024,
        decode_cache=True,
    )


def default_state_dir() -> Path:
    """Where the recipe keeps its runs by default: ``$ESRDF_CACHE/default_model`` (``~/.cache/esrdf``),
    outside the work tree, so a rerun resumes and ``git clean`` loses nothing."""
    env = os.environ.get("ESRDF_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "esrdf") / "default_model"


def _resumable(out_dir: Path) -> bool:
    return (out_dir / "train.json").exists()


@contextlib.contextmanager
def _timed_stage(out: Path, stage: str) -> Iterator[None]:
    """Add this stage's wall and CPU seconds (all threads of this process) to ``OUT/timings.json`` and log
    its start and end to ``OUT/recipe.log``; resumed runs accumulate, so the totals are the recipe's cost."""
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    _log(out, f"{stage}: start")
    try:
        yield
    finally:
        path = out / TIMINGS_FILE
        timings = json.loads(path.read_text()) if path.is_file() else {}
        entry = timings.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0, "runs": 0})
        entry["wall_s"] += time.perf_counter() - wall
        entry["cpu_s"] += time.process_time() - cpu
        entry["runs"] += 1
        path.write_text(json.dumps(timings, indent=2) + "\n")
        _log(
            out,
            f"{stage}: stop; {entry['wall_s'] / 3600:.2f} h wall, {entry['cpu_s'] / 3600:.2f} CPU-h in all",
        )


def _log(out: Path, message: str) -> None:
    with open(out / "recipe.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def train_default_model(out: Path, predictor_steps: int, diffusion_steps: int, progress: bool = True) -> Path:
    """Train the predictor, then the U-Net on its frozen residuals; each stage resumes where it stopped.

    Progress lines go to ``OUT/predictor.log`` and ``OUT/diffusion.log`` (every 25 steps), stage times to
    ``OUT/timings.json``.
    """
    from esrdf.data import offline_training_photos
    from esrdf.training.diffusion import train_diffusion
    from esrdf.training.predictor import train_predictor

    photos = offline_training_photos()
    if not photos:
        raise click.ClickException("no offline training photos: run `make photos` first")
    cfg = default_model_config()
    pred_dir, diff_dir = out / PREDICTOR_DIR, out / DIFFUSION_DIR
    with _timed_stage(out, PREDICTOR_DIR):
        result = train_predictor(photos, pred_dir, cfg, predictor_train_config(predictor_steps),
                                 resume=_resumable(pred_dir), progress=progress)  # fmt: skip
    if result.interrupted:
        raise SystemExit(130)
    with _timed_stage(out, DIFFUSION_DIR):
        result = train_diffusion(photos, pred_dir, diff_dir, diffusion_train_config(diffusion_steps),
                                 model_cfg=cfg, resume=_resumable(diff_dir), progress=progress)  # fmt: skip
    if result.interrupted:
        raise SystemExit(130)
    return diff_dir


def ship_checkpoint(diffusion_dir: Path, target: Path) -> Path:
    """The inference checkpoint: predictor + the U-Net's EMA weights (stored as ``unet.*``), no optimizer
    state, floating-point tensors stored in fp16 to fit the package budget.

    Loading upcasts them: ``load_state_dict`` copies into the fp32 parameters the config builds. The bundle
    is exported from this fp16-rounded checkpoint, so checkpoint and bundle are the same model. The
    recommended sampling (``RECOMMENDED_SAMPLING``) goes with it as ``sampling.json``.
    """
    from safetensors.torch import save_file

    from esrdf.checkpoint import (
        MODEL_FILE,
        load_checkpoint,
        read_tensors,
        save_checkpoint,
        write_sampling_defaults,
    )

    loaded = load_checkpoint(diffusion_dir)  # unet holds the EMA weights when the checkpoint has them
    save_checkpoint(target, loaded.config, loaded.predictor, loaded.unet, overwrite=True)
    file = target / MODEL_FILE
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in read_tensors(file).items()}
    save_file(tensors, str(file))
    write_sampling_defaults(target, RECOMMENDED_SAMPLING)  # the export writes them into the bundle
    return target


HELD_OUT_SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def write_held_out_photos(directory: Path) -> list[Path]:
    """The held-out evaluation photos of docs/DESIGN.md section 5 as PNG files: scikit-image's astronaut,
    coffee, chelsea, rocket and hubble_deep_field, scikit-learn's china and flower (scipy's face needs
    scipy<=1.11).
    """
    import numpy as np
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in HELD_OUT_SKIMAGE}
    sample = load_sample_images()
    photos |= {Path(f).stem: img for f, img in zip(sample.filenames, sample.images, strict=True)}
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in photos.items():
        path = directory / f"{name}.png"
        Image.fromarray(np.ascontiguousarray(img[..., :3])).save(path)
        written.append(path)
    return written


def evaluate_default_model(
    ckpt: Path, photos_dir: Path, sampling: SamplingOptions, report_path: Path
) -> tuple[dict[str, dict[str, float | None]], list[Goal]]:
    """Bicubic vs predictor-only vs full ESRDF on the held-out photos (``esrdf.evaluate``) at ``sampling``:
    the mean scores, and the quality goals (``goals.check_goals``) the report decides."""
    from esrdf.evaluate import evaluate

    write_held_out_photos(photos_dir)
    report = evaluate(ckpt, photos_dir, sampling, progress=False)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report.to_json())
    package = PACKAGE_DIR if Path(ckpt).resolve() == (PACKAGE_DIR / "checkpoint").resolve() else None
    return report.means, check_goals(report.to_dict(), package)


@click.group()
def main() -> None:
    """Reproduce the shipped default model."""


_OUT = click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="State folder [$ESRDF_CACHE/default_model]."
)


@main.command("train")
@_OUT
@click.option("--predictor-steps", type=click.IntRange(min=1), default=PREDICTOR_STEPS, show_default=True)
@click.option("--diffusion-steps", type=click.IntRange(min=1), default=DIFFUSION_STEPS, show_default=True)
@click.option("--no-progress", is_flag=True)
def train_command(out: Path | None, predictor_steps: int, diffusion_steps: int, no_progress: bool) -> None:
    """Train (or resume) both stages into --out."""
    out = out or default_state_dir()
    click.echo(str(train_default_model(out, predictor_steps, diffusion_steps, progress=not no_progress)))


@main.command("evaluate")
@click.option(
    "--ckpt", type=click.Path(path_type=Path), default=PACKAGE_DIR / "checkpoint", show_default=True
)
@click.option("--photos", type=click.Path(path_type=Path), default=None, help="[--out/held_out]")
@_OUT
@sampling_options("the checkpoint's sampling.json", seed=False)
def evaluate_command(ckpt: Path, photos: Path | None, out: Path | None, sampling: SamplingOptions) -> None:
    """Score the model on the held-out photos (seed 0; the checkpoint's sampling.json, which the shipped
    bundle also records, unless told otherwise): mean scores per method, then each quality goal of
    MODEL_CARD.md, met or missed."""
    out = out or default_state_dir()
    sampling = dataclasses.replace(sampling, seed=0)
    report_path = out / "eval.json"
    means, goals = evaluate_default_model(ckpt, photos or out / "held_out", sampling, report_path)
    click.echo(json.dumps(means, indent=2))
    for goal in goals:
        click.echo(f"{'MET   ' if goal.met else 'MISSED'} {goal.name}: {goal.detail}")
    click.echo(f"{sum(g.met for g in goals)} of {len(goals)} goals met; report: {report_path}")


if __name__ == "__main__":
    main()
