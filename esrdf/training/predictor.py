"""Training the main-path predictor c = P(lr) with L = L_Em + L_Feat + L_Pixel (paper Section 4.3, Eq. 15)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from esrdf.checkpoint import TrainingState, save_checkpoint
from esrdf.config import ConfigError, ModelConfig
from esrdf.models.build import build_predictor
from esrdf.training.config import TrainConfig, training_dataset
from esrdf.training.distributed import DistContext, distributed_context, wrap_data_parallel
from esrdf.training.loop import Loop, TrainResult, make_optimizer, run_loop
from esrdf.training.resume import check_resume_configs, load_resume, prepare_output


def _make_criterion(cfg: TrainConfig, device: torch.device) -> nn.Module:
    # With L_Feat on (w_feat > 0) this loads the converted VGG16 weights, or raises MissingWeightsError
    # naming `esrdf-train vgg-weights`: never a silent zero loss.
    from esrdf.losses.total import PredictorLoss

    return PredictorLoss(cfg.predictor_loss).to(device)


def train_predictor(
    data: Path | Sequence[Path],
    out_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train P on random crops of the photos in ``data``; write a predictor checkpoint to ``out_dir``.

    Under torchrun this is one data-parallel rank (see ``esrdf.training.distributed``). With ``resume``,
    continues ``out_dir`` from its last step with the same data order; the configs must match the saved
    ones (``steps``, ``save_every``, ``num_workers`` and ``amp`` may change).
    """
    if train_cfg.kind != "predictor":
        raise ConfigError(f"train_predictor needs a predictor TrainConfig, got kind={train_cfg.kind!r}")
    prepare_output(out_dir, resume, overwrite)
    if resume:
        check_resume_configs(out_dir, model_cfg, train_cfg)
    with distributed_context(device) as ctx:
        return _train(ctx, data, Path(out_dir), model_cfg, train_cfg, resume, progress)


def _train(
    ctx: DistContext,
    data: Path | Sequence[Path],
    out_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    resume: bool,
    progress: bool,
) -> TrainResult:
    criterion = _make_criterion(cfg, ctx.device)  # first: missing VGG weights fail before decoding photos
    dataset = training_dataset(data, cfg, model_cfg.scale)
    torch.manual_seed(cfg.seed)
    predictor = build_predictor(model_cfg).to(ctx.device)
    # The authors' unused conv gets no gradient; DDP must be told, or it waits for it forever.
    model = wrap_data_parallel(predictor, ctx, find_unused_parameters=model_cfg.predictor.authors_unused_conv)
    optimizer = make_optimizer(predictor, cfg)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    start = load_resume(out_dir, {"predictor": predictor}, dataset, optimizer, scaler) if resume else 0

    def loss_fn(lr: Tensor, hr: Tensor, generator: torch.Generator) -> Tensor:
        return criterion(model(lr), hr).total

    def save(step: int, state: TrainingState) -> None:
        save_checkpoint(
            out_dir, model_cfg, predictor, train_config=cfg.to_dict(), training_state=state, overwrite=True
        )

    loop = Loop(
        cfg=cfg,
        model=model,
        raw_model=predictor,
        loss_fn=loss_fn,
        dataset=dataset,
        optimizer=optimizer,
        scaler=scaler,
        save=save,
        ctx=ctx,
        out_dir=out_dir,
        start_step=start,
        progress=progress,
    )
    result = run_loop(loop)
    result.modules = {"predictor": predictor}
    return result
