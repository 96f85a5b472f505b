"""Typed training configuration with named presets; stored as a checkpoint's ``train.json``.

The ``paper`` presets follow the paper and the authors' configs: the predictor trains for 1k iterations at
batch 96 with AdamW (lr 1e-4, weight decay 5e-4, as in ``Train-CNN/train_FFHQ.py``); the diffusion model
trains for 100k steps at batch 80 with AdamW (lr 1e-4, wd 5e-4), L1 on eps, and an EMA of decay 0.9999 that
starts at step 5000 (``config/sr_ddpm_32_128.json``). Crops are 128 px HR (the FFHQ 32->128 setting).
The predictor loss is the paper's Eq. 15 with equal weights (``LossConfig.paper()``). ``small`` and ``tiny``
are for CPU runs and tests. Gradient clipping at norm 1.0 is ours, not the paper's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esrdf.config import ADDED_LATER, ConfigError, read_json_object, strict_from_dict, to_jsonable
from esrdf.data import ImageFolderDataset
from esrdf.losses.entropy import EntropyLossConfig
from esrdf.losses.total import LossConfig

TrainKind = Literal["predictor", "diffusion"]
AmpMode = Literal["none", "bf16", "fp16"]
DiffusionLoss = Literal["l1", "l2"]
LrSchedule = Literal["constant", "cosine"]

# Fields a resumed run may change: none of them alters which samples a step reads or the update rule's
# hyper-parameters, so "resume == uninterrupted" still holds (amp changes numerics, not the data order).
RESUMABLE_OVERRIDES = frozenset({"steps", "save_every", "num_workers", "amp", "decode_cache"})


@dataclass(frozen=True)
class TrainConfig:
    """One training run: what to optimise, for how long, on which crops (paper Section 5.1)."""

    kind: TrainKind
    steps: int  # optimizer steps in all (a resumed run continues up to this)
    batch: int  # global batch, split evenly over data-parallel processes
    crop: int  # HR crop side in pixels; the LR crop is crop / scale
    lr: float = 1e-4
    # "cosine": linear warm-up over ``warmup_steps``, then half a cosine from ``lr`` down to 0 at ``steps``
    # (Loshchilov & Hutter 2017); the paper trains at a constant rate.
    lr_schedule: LrSchedule = field(default="constant", metadata=ADDED_LATER)
    warmup_steps: int = field(default=0, metadata=ADDED_LATER)
    weight_decay: float = 5e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    amp: AmpMode = "none"
    ema_decay: float = 0.9999  # diffusion only: EMA of the U-Net weights
    ema_start: int = 0  # diffusion only: the EMA copies the weights until this step
    save_every: int = 1000
    seed: int = 0
    max_side: int | None = 2048  # decoded photos are shrunk to this longer side (None keeps full size)
    # Predictor only: weights and settings of L = L_Em + L_Feat + L_Pixel (Eq. 15); w_feat = 0 drops L_Feat.
    predictor_loss: LossConfig = field(default_factory=LossConfig.paper)
    diffusion_loss: DiffusionLoss = "l1"  # diffusion only: L1 on eps as in the paper, or L2
    num_workers: int = 0  # DataLoader worker processes; 0 decodes crops in the training process
    # Keep decoded, shrunk photos in the user cache (esrdf.data.load_rgb_cached): same arrays, faster start.
    decode_cache: bool = field(default=False, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "crop", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"train.lr must be > 0 and weight_decay >= 0 (got {self.lr}, {self.weight_decay})"
            )
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must hold two numbers, got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be positive or null, got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.num_workers < 0 or self.ema_start < 0 or self.warmup_steps < 0:
            raise ConfigError("train.num_workers, train.ema_start and train.warmup_steps must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return strict_from_dict(cls, data, where="train")

    @classmethod
    def from_json_file(cls, path: Path) -> TrainConfig:
        return cls.from_dict(read_json_object(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# For CPU runs and tests: no L_Feat (no VGG weights needed), and L_Em over 32 bins instead of 256 with the
# same kernel width in bins (2.5). The soft histogram costs bins x pixels; at 256 bins one step of batch 8
# at 64x64 took ~3.7 s on the 2-core CPU dev machine, at 32 bins ~0.1 s (measured, one thread).
TINY_PREDICTOR_LOSS = LossConfig(w_feat=0.0, entropy=EntropyLossConfig(bins=32, sigma=0.08))


def _presets() -> dict[tuple[str, TrainKind], TrainConfig]:
    return {
        ("paper", "predictor"): TrainConfig(kind="predictor", steps=1000, batch=96, crop=128, save_every=200),
        ("paper", "diffusion"): TrainConfig(
            kind="diffusion", steps=100_000, batch=80, crop=128, ema_start=5000, save_every=10_000
        ),
        ("small", "predictor"): TrainConfig(kind="predictor", steps=2000, batch=16, crop=96, save_every=500),
        ("small", "diffusion"): TrainConfig(
            kind="diffusion", steps=20_000, batch=16, crop=128, ema_decay=0.999, save_every=2000
        ),
        ("tiny", "predictor"): TrainConfig(
            kind="predictor",
            steps=200,
            batch=8,
            crop=64,
            save_every=100,
            predictor_loss=TINY_PREDICTOR_LOSS,
            max_side=1024,
        ),
        ("tiny", "diffusion"): TrainConfig(
            kind="diffusion", steps=200, batch=8, crop=64, ema_decay=0.99, save_every=100, max_side=1024
        ),
    }


TRAIN_PRESETS: dict[tuple[str, TrainKind], TrainConfig] = _presets()


def train_preset(name: str, kind: TrainKind) -> TrainConfig:
    """The ``kind`` training preset named ``name`` (``paper``, ``small``, ``tiny``)."""
    if (name, kind) not in TRAIN_PRESETS:
        names = sorted({n for n, _ in TRAIN_PRESETS})
        raise ConfigError(f"unknown training preset {name!r}; choose one of {names}")
    return TRAIN_PRESETS[(name, kind)]


def merge_for_resume(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config with ``overrides`` applied; changing anything that alters the data order or the
    optimisation (batch, crop, seed, lr, ...) is refused, so a resumed run equals an uninterrupted one."""
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(saved, k) != v}
    allowed = RESUMABLE_OVERRIDES if saved.lr_schedule == "constant" else RESUMABLE_OVERRIDES - {"steps"}
    refused = sorted(set(changed) - allowed)
    if refused:
        diffs = ", ".join(f"{k}: {getattr(saved, k)!r} -> {changed[k]!r}" for k in refused)
        raise ConfigError(
            f"cannot change {diffs} when resuming (only {sorted(allowed)} may change"
            + ("; a decaying lr_schedule is tied to steps)" if "steps" not in allowed else ")")
        )
    return saved.replace(**changed)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a pure function of the step, so a resumed
    run follows the same schedule as an uninterrupted one."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def with_feat_loss(loss: LossConfig, enabled: bool) -> LossConfig:
    """``loss`` with L_Feat on (the paper's weight 1 if it was off) or off (weight 0)."""
    if not enabled:
        return dataclasses.replace(loss, w_feat=0.0)
    return loss if loss.w_feat > 0 else dataclasses.replace(loss, w_feat=LossConfig.paper().w_feat)


def decode_cache_dir() -> Path:
    """Where ``decode_cache`` keeps decoded photos: ``$ESRDF_CACHE/photos`` (default ``~/.cache/esrdf``)."""
    from esrdf.vgg import vgg_cache_dir

    return vgg_cache_dir() / "photos"


def training_dataset(data: Path | Sequence[Path], cfg: TrainConfig, scale: int) -> ImageFolderDataset:
    """The crops of one run: its crop, seed and photo size, decoded through the cache when asked."""
    cache = decode_cache_dir() if cfg.decode_cache else None
    return ImageFolderDataset(data, cfg.crop, scale, seed=cfg.seed, max_side=cfg.max_side, cache_dir=cache)
