"""``run_benchmark``: every backend and stage of one bundle on one machine, with comparisons, as JSON.

Per backend (``esrdf.bench.backends``), on real photo tiles of ``tile`` LR pixels:

- ``predictor``: one predictor pass c = P(lr) (paper Section 4.2), at each batch size asked for;
- ``step``: one denoising step (paper Eq. 5-7), at each batch size; the batch with the most tiles/s in this
  stage is the backend's *best batch* (the step dominates every request of more than a few steps);
- ``request``: the whole request, host LR tiles to host HR tiles (predictor, N steps, c + x, blend), for
  each step count N, at batch 1 and at the best batch.

Comparisons in the same run: each runtime backend against ``eager`` (the eager PyTorch sampler at the same
steps and batch) and, with ``reference``, against the paper code's procedure: ancestral DDPM over all T
steps, eager (``esrdf.diffusion.samplers.ddpm_sample``), same model, batch 1. FLOPs per graph and shape
(``esrdf.bench.flops``) turn times into achieved GFLOP/s and a fraction of the measured GEMM ceiling.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esrdf.bench import backends as bk
from esrdf.bench.analysis import annotate_flops, best_batches, comparisons, footprint_mib
from esrdf.bench.latency import (
    call_synced,
    case_row,
    lr_tiles,
    peak_memory,
    rss_mib,
    step_feeds,
    time_call,
    time_interleaved,
    traced_peak_mib,
    workload_photo,
)
from esrdf.bench.machine import describe_machine, load_average, usable_cpus
from esrdf.runtime.bundle import Bundle, BundleError, load_bundle
from esrdf.runtime.sampling import StepPlan, plan_steps

SCHEMA = "esrdf-bench/1"
REFERENCE_NOTE = (
    "reference = the paper code's sampling procedure, ancestral DDPM over all T steps, eager, same model: "
    "run here by our own eager esrdf.diffusion.samplers.ddpm_sample, which implements it"
)
Log = Callable[[str], None]


class BenchError(ValueError):
    """Bad benchmark input (options, bundle); the message is one line a CLI prints as is."""


@dataclass(frozen=True)
class BenchOptions:
    engine: Path
    backends: tuple[str, ...] = ("onnxruntime", "torch")
    steps: tuple[int, ...] = (1, 4, 10)
    batches: tuple[int, ...] = (1,)  # batch 1 is always measured; the best of these is reported too
    tile: int | None = None  # LR tile; None: the bundle's export tile
    repeats: int = 10
    warmup: int = 2
    max_seconds: float | None = 20.0  # per case, once 3 repeats are in
    device: str = "cpu"
    threads: int | None = None
    reference: bool = False
    ckpt: Path | None = None
    flops: bool = True
    cpu_tuning: bool = False


@dataclass
class _Context:
    options: BenchOptions
    bundle: Bundle
    tile: int
    photo: Any
    plans: dict[int, StepPlan]
    models: Callable[[], tuple[Any, Any]]
    log: Log
    rss_open_mib: dict[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> int:
        return self.bundle.manifest.scale


def check_options(options: BenchOptions, bundle: Bundle) -> int:
    """Reject bad options with one line each; returns the LR tile to use."""
    timesteps = bundle.manifest.schedule.timesteps
    unknown = [b for b in options.backends if b not in bk.BACKENDS]
    if unknown or not options.backends:
        raise BenchError(f"unknown backend(s) {unknown}; choose from {', '.join(bk.BACKENDS)}")
    if not options.steps or any(not 1 <= n <= timesteps for n in options.steps):
        raise BenchError(f"steps must be in 1..{timesteps} (the bundle's T), got {list(options.steps)}")
    if not options.batches or min(options.batches) < 1:
        raise BenchError(f"batch sizes must be >= 1, got {list(options.batches)}")
    if options.repeats < 1 or options.warmup < 0:
        raise BenchError(f"need --repeats >= 1 and --warmup >= 0, got {options.repeats}, {options.warmup}")
    if options.device not in ("cpu", "cuda"):
        raise BenchError(f"device must be cpu or cuda, got {options.device!r}")
    if options.device == "cuda" and not _cuda_available():
        raise BenchError(
            "--device cuda: torch sees no CUDA device here (or torch is a CPU build); use --device cpu"
        )
    if options.cpu_tuning and options.device != "cpu":
        raise BenchError("--cpu-tuning searches CPU settings; run it with --device cpu")
    if options.threads is not None and options.threads < 1:
        raise BenchError(f"threads must be >= 1, got {options.threads}")
    tile = options.tile if options.tile is not None else bundle.manifest.export.tile
    multiple = bundle.manifest.lr_multiple_of
    if tile < 1 or tile % multiple:
        raise BenchError(
            f"tile must be a positive multiple of {multiple} LR pixels for this bundle, got {tile}"
        )
    return tile


def _open_bundle(path: Path) -> Bundle:
    try:
        return load_bundle(path)
    except BundleError as exc:
        raise BenchError(str(exc)) from exc


def bundle_summary(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "path": str(bundle.root),
        "model": m.model_name,
        "scale": m.scale,
        "timesteps": m.schedule.timesteps,
        "precisions": bundle.precisions(),
        "export_tile": m.export.tile,
        "parity_at_export": m.parity,
    }


def _set_threads(threads: int | None) -> None:
    """torch's intra-op pool is process-wide; onnxruntime gets ``threads`` per session instead."""
    if threads is not None and _torch_installed():
        import torch

        torch.set_num_threads(threads)


def _cuda_available() -> bool:
    if not _torch_installed():
        return False
    import torch

    return bool(torch.cuda.is_available())


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run_benchmark(options: BenchOptions, log: Log = print, bundle: Bundle | None = None) -> dict[str, Any]:
    """Run every part the options ask for; returns the JSON-ready report.

    ``bundle``: an already opened bundle to run instead of loading ``options.engine`` (e.g. the GPU check's
    ``esrdf.bench.checkpoint_bundle`` view of a checkpoint).
    """
    bundle = bundle or _open_bundle(options.engine)
    tile = check_options(options, bundle)
    # One thread count for every backend, or torch (OMP_NUM_THREADS) and onnxruntime (physical cores) may
    # each pick their own and the comparison would measure the pools, not the code.
    options = dataclasses.replace(options, threads=options.threads or usable_cpus())
    _set_threads(options.threads)
    alphas_cumprod = bundle.manifest.schedule.array()
    photo, photo_source = workload_photo()
    # DDIM at each step count asked for, with the bundle's default eta and prior (its sampling section)
    d = bundle.manifest.sampling_defaults().resolve(bundle.manifest.schedule.timesteps)
    plans = {n: plan_steps(alphas_cumprod, "ddim", n, d.eta, d.prior) for n in sorted(set(options.steps))}
    models = functools.cache(lambda: bk.eager_models(bundle, options.ckpt))
    ctx = _Context(options, bundle, tile, photo, plans, models, log)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "machine": describe_machine(with_torch=_torch_installed()),
        "bundle": bundle_summary(bundle),
        "workload": {
            "lr_tile": tile,
            "hr_tile": tile * ctx.scale,
            "threads": options.threads,
            "photo": photo_source,
            "sampler": "ddim",
            "eta": d.eta,
            "prior": d.prior,
            "request": "host LR tiles -> host HR tiles through the runtime driver "
            "(noise, predictor, N steps, c + x, blend, clip); eager: sample_residual_sr + clamp",
        },
        "notes": load_notes(),
    }
    if options.flops:
        report["flops"], report["gemm_peak"] = _flops_section(ctx)
    report["backends"], report["latency"] = _latency_section(ctx)
    if options.reference:
        report["latency"] += _reference_rows(ctx, report["backends"])
        report["notes"].append(REFERENCE_NOTE)
    annotate_flops(report)
    report["best_batch"] = best_batches(report["latency"])
    report["comparisons"] = comparisons(report["latency"], bundle.manifest.schedule.timesteps)
    if options.cpu_tuning:
        from esrdf.bench.cpu_tuning import run_cpu_tuning

        report["cpu_tuning"] = run_cpu_tuning(
            bundle, models, tile, options.repeats, options.warmup, options.max_seconds, log
        )
    report["machine"]["load_average_end"] = load_average()
    report["notes"] += load_notes("end")
    return report


def load_notes(when: str = "start") -> list[str]:
    """A warning when other processes compete for the CPUs: timings are then noisy (p95 shows how much)."""
    load, cpus = load_average(), usable_cpus()
    if load is None or load[0] < 0.5 * cpus:
        return []
    return [f"shared machine: 1-minute load {load[0]} on {cpus} CPUs at the {when}; timings are noisy"]


def _flops_section(ctx: _Context) -> tuple[Any, Any]:
    """FLOPs of both graphs at every batch, and the GEMM ceiling per dtype the backends use."""
    from esrdf.bench.flops import measured_gemm_peak, model_flops

    try:
        before = rss_mib()
        predictor, unet = ctx.models()  # loaded once here for every torch backend: counted under eager
        after = rss_mib()
    except bk.BackendSkipped as exc:
        return {"skipped": str(exc)}, {"skipped": str(exc)}
    if before is not None and after is not None:
        ctx.rss_open_mib["eager"] = round(max(0.0, after - before), 1)
    rows = model_flops(predictor, unet, sorted(set(ctx.options.batches) | {1}), ctx.tile, ctx.scale)
    flops = [asdict(r) | {"gflop": round(r.gflop, 4)} for r in rows]
    dtypes = ["float32"] + (["float16"] if ctx.options.device == "cuda" else [])
    if "torch-bf16" in ctx.options.backends and ctx.options.device == "cpu":
        dtypes.append("bfloat16")
    ctx.log(f"measuring the GEMM ceiling ({', '.join(dtypes)})")
    return flops, {d: measured_gemm_peak(ctx.options.device, d) for d in dtypes}


@dataclass
class _Case:
    """One timed thing: a backend's stage at a batch size (and step count, for requests)."""

    runner: bk.Runner
    stage: str
    batch: int
    call: Callable[[], Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _open_runners(ctx: _Context) -> tuple[list[bk.Runner], list[dict[str, Any]]]:
    """Every asked-for backend that can run here, and a status line for each one that cannot."""
    o = ctx.options
    runners, skipped = [], []
    for name in o.backends:
        try:
            before = rss_mib()
            runners.append(bk.open_runner(name, ctx.bundle, o.device, o.threads, ctx.models))
            after = rss_mib()
            if before is not None and after is not None:
                opened = ctx.rss_open_mib.get(name, 0.0) + max(0.0, after - before)
                ctx.rss_open_mib[name] = round(opened, 1)
        except bk.BackendSkipped as exc:
            skipped.append({"name": name, "what": bk.BACKENDS[name], "status": "skipped", "reason": str(exc)})
            ctx.log(f"{name}: skipped ({exc})")
    return runners, skipped


def _latency_section(ctx: _Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time stages (predictor, step) at every batch, then requests at batch 1 and the best batch."""
    runners, statuses = _open_runners(ctx)
    failed: dict[str, str] = {}  # one failing backend must not lose the others' figures
    batches = sorted(set(ctx.options.batches) | {1})
    tiles = {b: lr_tiles(ctx.photo, b, ctx.tile, ctx.scale) for b in batches}
    first = ctx.plans[min(ctx.plans)]
    stage_cases = [
        case
        for r in runners
        for b, lr in tiles.items()
        for case in (
            _Case(r, "predictor", b, r.predictor_call(lr)),
            _Case(r, "step", b, r.step_call(step_feeds(lr, ctx.scale, first))),
        )
    ]
    rows = _run_cases(ctx, stage_cases, failed)
    best = best_batches(rows)
    request_cases = [
        _Case(r, "request", b, r.request_call(tiles[b], plan), {"steps": n, "sampler": plan.sampler})
        for r in runners
        if r.name not in failed
        for b in sorted({1, best[r.name]["batch"]})
        for n, plan in ctx.plans.items()
    ]
    rows += _run_cases(ctx, request_cases, failed)
    _add_traced_peaks(rows, [r for r in runners if r.name not in failed], tiles, first)
    for r in runners:
        added = footprint_mib(ctx.rss_open_mib.get(r.name), rows, r.name)
        ok = {"status": "ok", "precision": r.precision, "device": r.device, "rss_added_mib": added}
        status = {"status": "error", "reason": failed[r.name]} if r.name in failed else ok
        statuses.append({"name": r.name, "what": bk.BACKENDS[r.name], **status})
    return statuses, rows


def _prepare(ctx: _Context, cases: list[_Case], failed: dict[str, str]) -> list[tuple[_Case, dict[str, Any]]]:
    """Warm each case up, its first call under the memory probe; a case that raises fails its backend."""
    ready = []
    for case in cases:
        if case.runner.name in failed:
            continue
        cuda = case.runner.device == "cuda"
        try:
            with peak_memory(cuda) as memory:  # the cold call: what this case adds to the footprint
                call_synced(case.call, cuda)
            for _ in range(ctx.options.warmup - 1):
                call_synced(case.call, cuda)
        except Exception as exc:
            failed[case.runner.name] = f"{type(exc).__name__}: {exc}"
            ctx.log(f"{case.runner.name}: error ({failed[case.runner.name]})")
            continue
        ready.append((case, memory))
    return [(c, m) for c, m in ready if c.runner.name not in failed]


def _run_cases(ctx: _Context, cases: list[_Case], failed: dict[str, str]) -> list[dict[str, Any]]:
    """Warm-up and memory per case, then timed rounds over all of them (``time_interleaved``)."""
    o = ctx.options
    ready = _prepare(ctx, cases, failed)
    budget = None if o.max_seconds is None else o.max_seconds * len(ready)
    timings = time_interleaved(
        [(c.call, c.runner.device == "cuda") for c, _m in ready], o.warmup, o.repeats, budget
    )
    rows = []
    for (case, memory), t in zip(ready, timings, strict=True):
        name, extra = case.runner.name, case.extra
        row = case_row(
            name, case.stage, case.batch, ctx.tile, ctx.scale, t, memory, precision=case.runner.precision
        )
        rows.append(row | extra)
        what = f"{case.stage} N={extra['steps']}" if "steps" in extra else case.stage
        ctx.log(f"{name:18s} b{case.batch:<2d} {what:14s} p50 {t.p50_ms:9.2f} ms  p95 {t.p95_ms:9.2f} ms")
    return rows


def _add_traced_peaks(
    rows: list[dict[str, Any]], runners: list[bk.Runner], tiles: dict[int, Any], plan: StepPlan
) -> None:
    """Python/numpy heap peak (tracemalloc) of one request at the fewest steps, per CPU backend and batch."""
    for row in rows:
        runner = next((r for r in runners if r.name == row["backend"] and r.device == "cpu"), None)
        if runner is not None and row["stage"] == "request" and row["steps"] == plan.num_steps:
            row["traced_python_peak_mib"] = traced_peak_mib(runner.request_call(tiles[row["batch"]], plan))


def _reference_rows(ctx: _Context, statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper code's sampling procedure: eager ancestral DDPM over all T steps, batch 1."""
    try:
        runner = bk.open_runner("eager", ctx.bundle, ctx.options.device, ctx.options.threads, ctx.models)
    except bk.BackendSkipped as exc:
        statuses.append({"name": "reference", "status": "skipped", "reason": str(exc)})
        return []
    plan = plan_steps(ctx.bundle.manifest.schedule.array(), "ddpm")
    lr = lr_tiles(ctx.photo, 1, ctx.tile, ctx.scale)
    warm = ctx.options.warmup if not any(s["name"] == "eager" for s in statuses) else 0
    call = runner.request_call(lr, plan)
    cuda = runner.device == "cuda"
    if warm:  # warm the eager path up with a 1-step run rather than a whole T-step one
        one_step = plan_steps(ctx.bundle.manifest.schedule.array(), "ddim", 1)
        time_call(runner.request_call(lr, one_step), warm, 1, cuda=cuda)
    with peak_memory(cuda) as memory:
        repeats = min(ctx.options.repeats, 3)
        timing = time_call(call, 0, repeats, cuda=cuda, max_seconds=ctx.options.max_seconds, min_repeats=1)
    ctx.log(f"reference eager DDPM over T={plan.num_steps}: p50 {timing.p50_ms:.1f} ms")
    statuses.append(
        {
            "name": "reference",
            "status": "ok",
            "what": "eager ancestral DDPM over all T steps "
            "(esrdf.diffusion.samplers.ddpm_sample = the paper code's procedure)",
        }
    )
    return [
        case_row(
            "eager",
            "request",
            1,
            ctx.tile,
            ctx.scale,
            timing,
            memory,
            precision="fp32",
            steps=plan.num_steps,
            sampler="ddpm",
            reference=True,
        )
    ]
