"""A short probe of eager-fp16 speed-ups for the torch engine: which to adopt, from one run.

Each variant is applied to a fresh fp16 ``TorchEngine`` (the GPU path without TensorRT), checked against
the fp16 parity bar (``FP16_GRAPH`` of ``esrdf.runtime.tolerances``: its step output against the fp32 eager
step, on real-photo inputs at the highest noise level) and timed as a one-step CUDA-graph replay (CUDA
events), at each batch:

    baseline                 the engine as shipped
    cudnn_benchmark          torch.backends.cudnn.benchmark on (cuDNN picks conv algorithms by timing)
    channels_last            U-Net weights (hence activations) in NHWC
    groupnorm_fp16           GroupNorm fp16 in, fp16 out, statistics accumulated in fp32 by the kernel
                             (autocast otherwise casts to fp32 and writes fp32 activations)
    hoisted_time_embedding   SiLU(t_emb) once, and all blocks' time projections as one matmul
    torch_compile            torch.compile of the U-Net, inside the graph; only with ``compile_guard_s`` left

``adopt`` lists the variants within the bar at every batch and at least ``ADOPT_SPEEDUP`` faster than the
baseline at the largest batch; when two or more qualify (torch.compile aside), one more row measures them
applied together (``a+b+...``), since speed-ups need not add up. On the CPU (the GPU check's smoke run)
the engine is fp32 and the calls are timed eagerly; torch.compile is not probed there. The variants are
measurements, not defaults: adopting one is a change to ``esrdf.engines.torch_engine``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esrdf.bench.latency import lr_tiles, step_feeds, time_call
from esrdf.models.unet import ResidualBlock
from esrdf.runtime.sampling import StepPlan

VARIANTS = (
    "baseline",
    "cudnn_benchmark",
    "channels_last",
    "groupnorm_fp16",
    "hoisted_time_embedding",
    "torch_compile",
)
ADOPT_SPEEDUP = 1.03  # below 3% the difference is within run-to-run noise of a graph replay


class HalfGroupNorm(nn.GroupNorm):
    """GroupNorm that takes and returns fp16 (outside autocast, which would run it in fp32); CUDA's kernel
    accumulates the mean and variance of half inputs in fp32. Other dtypes run the plain module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.half(), self.bias.half(), self.eps)


def half_group_norms(module: nn.Module) -> int:
    """Make every GroupNorm of ``module`` a ``HalfGroupNorm`` in place (same parameters); how many."""
    count = 0
    for norm in [m for m in module.modules() if type(m) is nn.GroupNorm]:
        norm.__class__ = HalfGroupNorm
        count += 1
    return count


def _hoisted_block_forward(self: ResidualBlock, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """``ResidualBlock.forward`` with the time projection read from the hoisted one (same arithmetic)."""
    h = self.conv1(F.silu(self.norm1(x)))
    h = h + cast(torch.Tensor, self.hoisted_time)[:, :, None, None]
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    return self.attn(h + self.skip(x))


def hoist_time_projections(unet: nn.Module) -> int:
    """SiLU(t_emb) once and every block's ``time_proj`` as one Linear, run right after the time embedding
    (a forward hook) and sliced per block; returns how many projections were fused."""
    blocks = [m for m in unet.modules() if isinstance(m, ResidualBlock)]
    projections = [b.time_proj for b in blocks]
    fused = nn.Linear(projections[0].in_features, sum(p.out_features for p in projections))
    fused = fused.to(device=projections[0].weight.device, dtype=projections[0].weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in projections]))
        fused.bias.copy_(torch.cat([p.bias for p in projections]))
    unet.hoisted_time_proj = fused
    sizes = [p.out_features for p in projections]

    def project(_module: nn.Module, _inputs: Any, t_emb: torch.Tensor) -> None:
        for block, part in zip(blocks, fused(F.silu(t_emb)).split(sizes, dim=1), strict=True):
            block.hoisted_time = part

    cast(nn.Module, unet.time_embed).register_forward_hook(project)
    for block in blocks:
        block.forward = types.MethodType(_hoisted_block_forward, block)  # type: ignore[method-assign]
    return len(blocks)


@contextlib.contextmanager
def applied(variant: str, engine: Any) -> Iterator[None]:
    """``engine`` (a fresh ``TorchEngine``) with ``variant`` applied (``a+b``: both); process-wide flags
    restored after."""
    with contextlib.ExitStack() as stack:
        for name in variant.split("+"):
            _apply(name, engine, stack)
        yield


def _apply(variant: str, engine: Any, stack: contextlib.ExitStack) -> None:
    unet = engine._step.unet
    if variant == "cudnn_benchmark":
        cudnn = torch.backends.cudnn
        stack.enter_context(cudnn.flags(enabled=cudnn.enabled, benchmark=True, deterministic=False))
    elif variant == "channels_last":
        unet.to(memory_format=torch.channels_last)
    elif variant == "groupnorm_fp16":
        half_group_norms(unet)
    elif variant == "hoisted_time_embedding":
        hoist_time_projections(unet)
    elif variant == "torch_compile":
        engine._step.unet = torch.compile(unet, dynamic=False)
    elif variant != "baseline":
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def one_step_graph(call: Callable[[], Any], device: torch.device, warmup: int = 2) -> Any:
    """``call`` (one engine step on static inputs) warmed up on a side stream, then captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        call()
    return graph


def probe(
    models: Callable[[], tuple[nn.Module, nn.Module]],
    scale: int,
    plan: StepPlan,
    photo: np.ndarray,
    device: str,
    batches: tuple[int, ...],
    lr_tile: int,
    deadline: float,
    repeats: int = 20,
    compile_guard_s: float = 120.0,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    """Parity and one-step timing of each variant at each batch, and the ones to adopt."""
    from esrdf.engines.torch_engine import TorchEngine

    cuda = device == "cuda"
    reference = TorchEngine(*copy.deepcopy(models()), device=device, precision="fp32")
    feeds = {b: step_feeds(lr_tiles(photo, b, lr_tile, scale), scale, plan) for b in batches}
    want = {b: reference.download(reference.step(*_args(reference, f))) for b, f in feeds.items()}
    del reference
    rows: list[dict[str, Any]] = []
    run = functools.partial(_run_variant, models, device, feeds, want, batches, repeats)
    for variant in variants:
        left = deadline - time.monotonic()
        if variant == "torch_compile" and (not cuda or left < compile_guard_s):
            why = "CPU smoke run" if not cuda else f"{left:.0f} s left, under {compile_guard_s:.0f}"
            rows.append({"variant": variant, "skipped": why})
        elif left < 10:
            rows.append({"variant": variant, "skipped": f"time budget spent ({left:.0f} s left)"})
        else:
            rows.append(run(variant))
    adopt = _adoptable(rows, max(batches))
    if not cuda:  # fp32 eager CPU timings say nothing about fp16 CUDA kernels: correctness only
        return {"rows": rows, "adopt": [], "timing": "eager fp32 on the CPU (smoke run: nothing to adopt)"}
    together = [v for v in adopt if v != "torch_compile"]
    if len(together) >= 2 and deadline - time.monotonic() >= 10:  # do the adopted ones add up?
        rows.append(run("+".join(together)))
        _adoptable(rows, max(batches))  # its speed-up against the same baseline
    return {"rows": rows, "adopt": adopt, "timing": "one-step graph replay"}


def _run_variant(
    models: Callable[[], tuple[nn.Module, nn.Module]],
    device: str,
    feeds: dict[int, dict[str, np.ndarray]],
    want: dict[int, np.ndarray],
    batches: tuple[int, ...],
    repeats: int,
    variant: str,
) -> dict[str, Any]:
    """One variant on a fresh engine: its output against the fp32 reference and its time, per batch."""
    from esrdf.engines.torch_engine import TorchEngine
    from esrdf.export.parity import bar_failures, compare
    from esrdf.runtime.tolerances import FP16_GRAPH

    cuda = device == "cuda"
    row: dict[str, Any] = {"variant": variant}
    start = time.monotonic()
    try:
        engine = TorchEngine(*copy.deepcopy(models()), device=device, precision="fp16" if cuda else "fp32")
        with applied(variant, engine):
            row["batches"] = [_measure(engine, feeds[b], b, cuda, repeats) for b in batches]
        del engine
    except Exception as exc:  # a variant that fails is a result, not the end of the probe
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    row["seconds"] = round(time.monotonic() - start, 1)
    for case in row.get("batches", []):
        fails = bar_failures(compare(case.pop("out"), want[case["batch"]]), FP16_GRAPH, variant)
        case["within_fp16_bar"], case["bar_failures"] = not fails, fails
    return row


def _args(engine: Any, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [engine.upload(feeds[k]) for k in ("x_t", "cond", "t", "coefs", "noise")]


def _measure(
    engine: Any, feeds: dict[str, np.ndarray], batch: int, cuda: bool, repeats: int
) -> dict[str, Any]:
    args = _args(engine, feeds)
    out = engine.download(engine.step(*args))
    if cuda:
        graph = one_step_graph(lambda: engine.step(*args), engine.device)
        timing = time_call(graph.replay, 3, repeats, cuda=True, max_seconds=5.0)
    else:
        timing = time_call(lambda: engine.step(*args), 1, min(repeats, 3), cuda=False, max_seconds=5.0)
    return {"batch": batch, "p50_ms": round(timing.p50_ms, 4), "repeats": timing.repeats, "out": out}


def _adoptable(rows: list[dict[str, Any]], batch: int) -> list[str]:
    """Variants within the bar at every batch and ADOPT_SPEEDUP faster than baseline at ``batch``."""

    def p50(row: dict[str, Any]) -> float | None:
        return next((c["p50_ms"] for c in row.get("batches", []) if c["batch"] == batch), None)

    base = next((p50(r) for r in rows if r["variant"] == "baseline"), None)
    adopt = []
    for row in rows:
        ms = p50(row)
        if row["variant"] == "baseline" or ms is None or base is None:
            continue
        row["speedup"] = round(base / ms, 3)
        if all(c["within_fp16_bar"] for c in row["batches"]) and base / ms >= ADOPT_SPEEDUP:
            adopt.append(row["variant"])
    return adopt


def probe_table(part: dict[str, Any]) -> str:
    """Markdown table of the probe's rows, with the variants to adopt."""
    rows = part.get("rows", [])
    if not rows:
        return ""
    lines = [
        f"\nfp16 probe ({part.get('timing')}; adopt: {', '.join(part.get('adopt', [])) or 'none'})\n",
        "| variant | batch | p50 ms | within fp16 bar | speed-up | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("skipped") or r.get("error") or ""
        for c in r.get("batches", []) or [{"batch": "-", "p50_ms": "-", "within_fp16_bar": "-"}]:
            lines.append(
                f"| {r['variant']} | {c['batch']} | {c['p50_ms']} | {c['within_fp16_bar']} | "
                f"{r.get('speedup', '-')} | {note} |"
            )
    return "\n".join(lines) + "\n"
