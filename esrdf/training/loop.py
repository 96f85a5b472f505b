"""The optimisation loop shared by predictor and diffusion training.

Each step: read the step's fixed slice of samples, forward under optional autocast, backward (scaled for
fp16), clip the global gradient norm, AdamW step, EMA update, and a checkpoint every ``save_every`` steps.
Randomness is seeded per (seed, step, rank): the data (``esrdf.data``), diffusion's t and eps (a per-step
generator) and torch's global RNG (dropout). A resumed run therefore needs only the step number, the weights
and the optimizer moments to continue exactly as an uninterrupted run would.

Ctrl-C (SIGINT) or SIGTERM does not abort a step half-way: it sets a flag, the loop finishes the current
step, all ranks agree to stop, rank 0 saves a checkpoint and the run returns ``interrupted=True``. A second
signal raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from esrdf.checkpoint import TrainingState, flatten_optimizer_state, unflatten_optimizer_state
from esrdf.config import ConfigError
from esrdf.data import ImageFolderDataset, StepBatchSampler
from esrdf.training.config import TrainConfig, learning_rate
from esrdf.training.distributed import DistContext, any_rank, barrier, sync_buffers
from esrdf.training.ema import EMA

# (lr, hr, generator) -> scalar loss; runs inside autocast.
LossFn = Callable[[Tensor, Tensor, torch.Generator], Tensor]
# (completed steps, extra training-state meta) -> None; called on rank 0 only.
SaveFn = Callable[[int, TrainingState], None]
STATE_FORMAT = 1


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimizer steps completed in all (including those before a resume)
    interrupted: bool
    losses: list[float] = field(default_factory=list)  # this process's loss per step run in this call
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the trained networks, unwrapped


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, step, rank, stream): independent streams without stored RNG state."""
    return int(
        np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (paper: lr 1e-4, weight decay 5e-4)."""
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, torchrun's shutdown) only
    sets the returned event; a second one raises KeyboardInterrupt at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_sigint_in_worker(_worker_id: int) -> None:
    # The terminal sends Ctrl-C to every process; workers must keep serving until the main loop stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: ImageFolderDataset, cfg: TrainConfig, start_step: int, ctx: DistContext
) -> torch.utils.data.DataLoader[Any]:
    sampler = StepBatchSampler(cfg.batch, start_step, cfg.steps, ctx.rank, ctx.world_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        worker_init_fn=_ignore_sigint_in_worker if cfg.num_workers else None,
    )


def resume_state_meta(state: TrainingState) -> int:
    """The completed step count stored in a training state; checks the format version."""
    if state.meta.get("format") != STATE_FORMAT:
        raise ValueError(f"training state format {state.meta.get('format')!r} is not {STATE_FORMAT}")
    return int(state.meta["step"])


def restore_optimizer(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: TrainingState
) -> None:
    optimizer.load_state_dict(unflatten_optimizer_state(state, state.meta["optimizer"]))
    if state.meta.get("grad_scaler"):
        scaler.load_state_dict(state.meta["grad_scaler"])


@dataclass
class Loop:
    """Everything one run of :func:`run_loop` needs; built by the predictor and diffusion trainers."""

    cfg: TrainConfig
    model: nn.Module  # possibly DDP-wrapped; its parameters are what the optimizer updates
    raw_model: nn.Module  # the unwrapped module (EMA source, buffer sync)
    loss_fn: LossFn
    dataset: ImageFolderDataset
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    save: SaveFn
    ctx: DistContext
    out_dir: Path
    ema: EMA | None = None
    start_step: int = 0
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)  # extra JSON saved with the training state

    def training_state(self, step: int, interrupted: bool) -> TrainingState:
        opt = flatten_optimizer_state(self.optimizer.state_dict())
        meta = {
            "format": STATE_FORMAT,
            "kind": self.cfg.kind,
            "step": step,
            "seed": self.cfg.seed,
            "world_size": self.ctx.world_size,
            "interrupted": interrupted,
            "data_fingerprint": self.dataset.fingerprint(),
            "optimizer": opt.meta,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        } | self.meta
        return TrainingState(opt.tensors, meta)

    def checkpoint(self, step: int, interrupted: bool) -> None:
        sync_buffers(self.raw_model, self.ctx)
        if self.ctx.is_main:
            self.save(step, self.training_state(step, interrupted))

    def optimizer_step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _progress_bar(loop: Loop) -> Progress:
    # rich, not tqdm: rich is a core dependency, present on the lean GPU machines too.
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not (loop.progress and loop.ctx.is_main and sys.stderr.isatty()),
    )


# Every this many steps one plain progress line goes to the run's log file (``progress_log_path``) and,
# without a terminal (a background run), to stderr in place of the bar.
LOG_EVERY = 25


def progress_log_path(out_dir: Path) -> Path:
    """``OUT.log`` beside the checkpoint directory ``OUT``: the checkpoint is replaced whole at each save,
    so a log inside it would not survive; this one is appended to across resumes."""
    return out_dir.parent / f"{out_dir.name}.log"


def _log_line(loop: Loop, step: int, smoothed: float, seconds_per_step: float) -> None:
    if not loop.ctx.is_main or not (step % LOG_EVERY == 0 or step == loop.cfg.steps):
        return
    lr = loop.optimizer.param_groups[0]["lr"]
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {loop.cfg.kind} step {step}/{loop.cfg.steps} "
            f"loss {smoothed:.5f} lr {lr:.3g} {seconds_per_step:.3f} s/step")  # fmt: skip
    path = progress_log_path(loop.out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(line + "\n")
    if loop.progress and not sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)


def run_loop(loop: Loop) -> TrainResult:
    """Train from ``loop.start_step`` to ``cfg.steps``, saving periodically, at the end, and on Ctrl-C."""
    cfg, ctx = loop.cfg, loop.ctx
    if loop.start_step > cfg.steps:
        raise ConfigError(
            f"the checkpoint is at step {loop.start_step}, past the requested {cfg.steps} steps"
        )
    amp_dtype = autocast_dtype(cfg)
    losses: list[float] = []
    step, interrupted, smoothed = loop.start_step, False, None
    loop.model.train()
    with deferred_interrupt() as stop, _progress_bar(loop) as bar:
        task = bar.add_task(cfg.kind, total=cfg.steps, completed=loop.start_step, status="")
        tick = time.perf_counter()
        for lr, hr in make_loader(loop.dataset, cfg, loop.start_step, ctx):
            lr = lr.to(ctx.device, non_blocking=True)
            hr = hr.to(ctx.device, non_blocking=True)
            torch.manual_seed(step_seed(cfg.seed, step, ctx.rank, stream=1))  # dropout, if any
            # On the training device, so diffusion's t and eps are drawn there without a host copy.
            generator = torch.Generator(ctx.device).manual_seed(step_seed(cfg.seed, step, ctx.rank, stream=2))
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loop.loss_fn(lr, hr, generator)
            for group in loop.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            loop.optimizer_step(loss)
            step += 1
            if loop.ema is not None:
                loop.ema.update(loop.raw_model, step)
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}; lower --lr or use --amp none")
            losses.append(value)
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            now = time.perf_counter()
            throughput = cfg.batch / max(now - tick, 1e-9)
            bar.update(task, advance=1, status=f"loss {smoothed:.4f}  {throughput:.1f} img/s")
            _log_line(loop, step, smoothed, now - tick)
            tick = now
            if any_rank(stop.is_set(), ctx):
                interrupted = True
                break
            if step % cfg.save_every == 0 and step < cfg.steps:
                loop.checkpoint(step, interrupted=False)
        loop.checkpoint(step, interrupted=interrupted)
    barrier(ctx)  # when any rank returns, the checkpoint is complete on disk
    return TrainResult(loop.out_dir, step, interrupted, losses)
