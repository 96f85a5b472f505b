"""Output rules and resume: never overwrite a checkpoint by accident; resume exactly or not at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esrdf.checkpoint import (
    CheckpointError,
    load_module_strict,
    load_training_state,
    read_config,
    read_model_tensors,
    read_train_config,
)
from esrdf.config import ConfigError, ModelConfig
from esrdf.data import ImageFolderDataset
from esrdf.training.config import TrainConfig, TrainKind, merge_for_resume
from esrdf.training.loop import restore_optimizer, resume_state_meta


class TrainingSetupError(ValueError):
    """A run that cannot start as asked: output exists, nothing to resume, changed data, wrong kind."""


def prepare_output(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an existing checkpoint unless told to resume it or to replace it."""
    out_dir = Path(out_dir)
    if resume and not out_dir.exists():
        raise TrainingSetupError(f"cannot resume: {out_dir} does not exist")
    if not resume and out_dir.exists() and not overwrite:
        raise TrainingSetupError(
            f"{out_dir} already exists; pass --resume to continue it or --force to replace it"
        )


def saved_configs(out_dir: Path, kind: TrainKind) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs stored in a checkpoint written by a ``kind`` run."""
    model_cfg = read_config(out_dir)
    try:
        train_cfg = TrainConfig.from_dict(read_train_config(out_dir))
    except ConfigError as exc:
        raise CheckpointError(f"{Path(out_dir) / 'train.json'}: {exc}") from exc
    if train_cfg.kind != kind:
        raise TrainingSetupError(f"{out_dir} was written by a {train_cfg.kind} run, not a {kind} run")
    return model_cfg, train_cfg


def resume_configs(
    out_dir: Path, kind: TrainKind, overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Configs for resuming ``out_dir``: the saved ones, with the few overrides that keep the run exact."""
    model_cfg, saved = saved_configs(out_dir, kind)
    return model_cfg, merge_for_resume(saved, overrides)


def check_resume_configs(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    saved_model, saved_train = saved_configs(out_dir, train_cfg.kind)
    if saved_model != model_cfg:
        raise TrainingSetupError(
            f"the model config differs from {out_dir}/config.json; resume with the saved one"
        )
    merge_for_resume(saved_train, {f.name: getattr(train_cfg, f.name) for f in dataclasses.fields(train_cfg)})


def check_same_data(saved: list[str], dataset: ImageFolderDataset) -> None:
    now = dataset.fingerprint()
    if saved != now:
        first = next((f"{a} vs {b}" for a, b in zip(saved, now, strict=False) if a != b), "a different count")
        raise TrainingSetupError(
            f"the training images changed since the checkpoint ({len(saved)} then, {len(now)} "
            f"now; first difference: {first}), so the data order would differ"
        )


def load_resume(
    out_dir: Path,
    modules: dict[str, nn.Module],
    dataset: ImageFolderDataset,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> int:
    """Load weights (``{prefix: module}``), optimizer and scaler state; return the completed step count."""
    tensors = read_model_tensors(out_dir)
    for prefix, module in modules.items():
        load_module_strict(module, tensors, prefix, Path(out_dir) / "model.safetensors")
    state = load_training_state(out_dir)
    try:
        step = resume_state_meta(state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{out_dir}: unusable training state ({exc})") from exc
    check_same_data(state.meta.get("data_fingerprint", []), dataset)
    restore_optimizer(optimizer, scaler, state)
    return step
