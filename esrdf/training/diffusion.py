"""Training the residual denoiser on a frozen predictor (paper Section 3, Eq. 3-6).

For each crop: c = P(lr) with the frozen predictor, r_0 = hr - c, and the U-Net learns
eps_theta(concat[c, r_t], t) with the L1 (or L2) loss of ``esrdf.diffusion.objective.diffusion_loss``.
The output checkpoint holds the predictor, the raw U-Net and its EMA: everything export needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from esrdf.checkpoint import (
    PREDICTOR,
    UNET,
    UNET_EMA,
    TrainingState,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from esrdf.config import ConfigError, ModelConfig
from esrdf.diffusion.objective import diffusion_loss
from esrdf.diffusion.schedule import make_schedule
from esrdf.models.build import build_predictor, build_unet
from esrdf.models.predictor import Predictor
from esrdf.training.config import TrainConfig, training_dataset
from esrdf.training.distributed import DistContext, distributed_context, wrap_data_parallel
from esrdf.training.ema import EMA
from esrdf.training.loop import Loop, TrainResult, make_optimizer, run_loop
from esrdf.training.resume import TrainingSetupError, check_resume_configs, load_resume, prepare_output


def diffusion_model_config(predictor_cfg: ModelConfig, unet_from: ModelConfig | None = None) -> ModelConfig:
    """The trained predictor's config, with the U-Net and schedule of ``unet_from`` when given."""
    if unet_from is None:
        return predictor_cfg
    name = (
        predictor_cfg.name
        if unet_from.name == predictor_cfg.name
        else f"{predictor_cfg.name}+{unet_from.name}"
    )
    return dataclasses.replace(predictor_cfg, name=name, unet=unet_from.unet, schedule=unet_from.schedule)


def train_diffusion(
    data: Path | Sequence[Path],
    predictor_ckpt: Path | None,
    out_dir: Path,
    train_cfg: TrainConfig,
    *,
    model_cfg: ModelConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the U-Net on the residuals of the predictor in ``predictor_ckpt``; write both to ``out_dir``.

    ``model_cfg`` defaults to the predictor checkpoint's config (its ``unet`` and ``schedule`` sections say
    which denoiser to train); its predictor section must equal the checkpoint's. With ``resume``,
    ``out_dir``'s own predictor and U-Net continue, and ``predictor_ckpt`` may be None.
    """
    if train_cfg.kind != "diffusion":
        raise ConfigError(f"train_diffusion needs a diffusion TrainConfig, got kind={train_cfg.kind!r}")
    prepare_output(out_dir, resume, overwrite)
    if not resume and predictor_ckpt is None:
        raise TrainingSetupError("a new diffusion run needs a trained predictor checkpoint")
    with distributed_context(device) as ctx:
        if resume:
            predictor, model_cfg = _resumed_predictor(out_dir, model_cfg, train_cfg)
        else:
            assert predictor_ckpt is not None
            predictor, model_cfg = _trained_predictor(predictor_ckpt, model_cfg)
        _check_crop(model_cfg, train_cfg)
        return _train(
            ctx, data, Path(out_dir), model_cfg, train_cfg, predictor.to(ctx.device), resume, progress
        )


def _trained_predictor(ckpt: Path, model_cfg: ModelConfig | None) -> tuple[Predictor, ModelConfig]:
    loaded = load_checkpoint(ckpt)
    model_cfg = model_cfg or loaded.config
    if model_cfg.predictor != loaded.config.predictor:
        raise TrainingSetupError(
            f"{ckpt} holds a predictor with {loaded.config.predictor}, "
            f"but the model config asks for {model_cfg.predictor}"
        )
    return loaded.predictor, model_cfg


def _resumed_predictor(
    out_dir: Path, model_cfg: ModelConfig | None, train_cfg: TrainConfig
) -> tuple[Predictor, ModelConfig]:
    model_cfg = model_cfg or read_config(out_dir)
    check_resume_configs(out_dir, model_cfg, train_cfg)
    return build_predictor(model_cfg), model_cfg  # its weights come with the rest in load_resume


def _check_crop(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    multiple = model_cfg.unet.multiple_of
    if cfg.crop % multiple or cfg.crop % model_cfg.scale:
        raise ConfigError(
            f"crop {cfg.crop} must be a multiple of the U-Net's {multiple} and of the scale {model_cfg.scale}"
        )


def _train(
    ctx: DistContext,
    data: Path | Sequence[Path],
    out_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    predictor: Predictor,
    resume: bool,
    progress: bool,
) -> TrainResult:
    dataset = training_dataset(data, cfg, model_cfg.scale)
    predictor.eval().requires_grad_(False)  # frozen: BatchNorm uses its running statistics
    torch.manual_seed(cfg.seed)
    unet = build_unet(model_cfg).to(ctx.device)
    ema = EMA(unet, cfg.ema_decay, cfg.ema_start)
    model = wrap_data_parallel(unet, ctx)
    optimizer = make_optimizer(unet, cfg)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    start = 0
    if resume:
        modules = {PREDICTOR: predictor, UNET: unet, UNET_EMA: ema.module}
        start = load_resume(out_dir, modules, dataset, optimizer, scaler)
    schedule = make_schedule(model_cfg.schedule)

    def loss_fn(lr: Tensor, hr: Tensor, generator: torch.Generator) -> Tensor:
        # The residual target stays in fp32 even under autocast: it is the quantity being modelled.
        with torch.no_grad(), torch.autocast(ctx.device.type, enabled=False):
            coarse = predictor(lr)
        return diffusion_loss(
            model, schedule, hr - coarse, coarse, loss=cfg.diffusion_loss, generator=generator,
            prediction=model_cfg.unet.prediction,
        )  # fmt: skip

    def save(step: int, state: TrainingState) -> None:
        save_checkpoint(
            out_dir,
            model_cfg,
            predictor,
            unet,
            ema.module,
            train_config=cfg.to_dict(),
            training_state=state,
            overwrite=True,
        )

    loop = Loop(
        cfg=cfg,
        model=model,
        raw_model=unet,
        loss_fn=loss_fn,
        dataset=dataset,
        optimizer=optimizer,
        scaler=scaler,
        save=save,
        ctx=ctx,
        out_dir=out_dir,
        ema=ema,
        start_step=start,
        progress=progress,
    )
    result = run_loop(loop)
    result.modules = {PREDICTOR: predictor, UNET: unet, UNET_EMA: ema.module}
    return result
