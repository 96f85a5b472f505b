"""The fastest CPU path for the step graph, checked against the parity bars (docs/DESIGN.md section 4).

The step graph (paper Eq. 5-7, update included) is N of the N + 1 engine calls of a request, so it is
what is tuned. Starting from the onnxruntime engine's own session settings (``esrdf.engines.
onnxruntime_engine``: default intra-op threads, one inter-op thread, ORT_ENABLE_ALL, memory arena on,
sequential execution), one setting at a time is changed: intra-op threads, graph optimisation level,
memory arena, execution mode, thread spinning, and the mixed fp16 graph. Then the best value of each fp32
setting is combined and timed once more. torch runs the same step eagerly in fp32 (the ratio's baseline)
and, where the CPU has avx512_bf16 or AMX, under bf16 autocast.

bf16 in onnxruntime: its CPU execution provider has a bf16 fast-math GEMM only on ARM64 (session option
``mlas.enable_gemm_fastmath_arm64_bfloat16``); on x86-64 there is no bf16 compute path, so the bf16
candidates here are torch's (oneDNN) autocast and OpenVINO's ``INFERENCE_PRECISION_HINT`` (where openvino
is installed): the OpenVINO engine at f32 and bf16, each at its default threads, 1 thread and every usable
CPU, with the LATENCY performance hint (the engine's) and THROUGHPUT.

Every candidate's output is compared with the eager fp32 step on real-photo inputs built as export builds
them (``esrdf.export.parity.make_feeds``: coefs (0, 1, 0), so the output is eps itself): fp32 candidates
against the fp32 graph bar, fp16 ones against the fp16 graph bar, bf16 ones against the bf16 graph bar.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from esrdf.bench.latency import time_call, workload_photo
from esrdf.bench.machine import bf16_support, usable_cpus
from esrdf.runtime.bundle import Bundle
from esrdf.runtime.graph_spec import PREDICTOR, STEP, graph_spec
from esrdf.runtime.tolerances import BF16_GRAPH, FP16_GRAPH, FP32_GRAPH

if TYPE_CHECKING:
    import onnxruntime as ort

OPT_LEVELS = ("basic", "extended", "layout", "all")
ORT_BF16_NOTE = (
    "onnxruntime's CPU EP has bf16 fast-math GEMM only on ARM64 (mlas.enable_gemm_fastmath_"
    "arm64_bfloat16); on x86-64 it has no bf16 compute path"
)
Log = Callable[[str], None]


@dataclass(frozen=True)
class OrtConfig:
    """onnxruntime session settings; the defaults are the onnxruntime engine's."""

    label: str
    precision: str = "fp32"
    threads: int | None = None  # None: onnxruntime's default (one per physical core)
    opt_level: str = "all"
    mem_arena: bool = True
    parallel: bool = False  # ORT_PARALLEL execution (inter-op threads = intra-op threads)
    spinning: bool | None = None  # None: onnxruntime's default (spin-wait on)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "label"}


def session_options(config: OrtConfig) -> ort.SessionOptions:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if config.threads is not None:
        options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = (config.threads or 0) if config.parallel else 1
    level = {
        "basic": "ORT_ENABLE_BASIC",
        "extended": "ORT_ENABLE_EXTENDED",
        "layout": "ORT_ENABLE_LAYOUT",
        "all": "ORT_ENABLE_ALL",
    }[config.opt_level]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.enable_cpu_mem_arena = config.mem_arena
    if config.parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if config.spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    return options


def ort_candidates(cpus: int) -> list[OrtConfig]:
    """The engine default, then one changed setting per candidate."""
    import onnxruntime as ort

    base = OrtConfig("engine default")
    found = [base]
    for threads in sorted({1, max(1, cpus // 2), cpus}):
        found.append(dataclasses.replace(base, label=f"intra-op threads {threads}", threads=threads))
    for level in OPT_LEVELS[:-1]:
        if level != "layout" or hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
            found.append(dataclasses.replace(base, label=f"graph optimisation {level}", opt_level=level))
    found.append(dataclasses.replace(base, label="memory arena off", mem_arena=False))
    found.append(dataclasses.replace(base, label="parallel execution", parallel=True))
    found.append(dataclasses.replace(base, label="spinning off", spinning=False))
    found.append(dataclasses.replace(base, label="fp16 graph", precision="fp16"))
    return found


def combined_best(results: list[dict[str, Any]]) -> OrtConfig | None:
    """Each fp32 setting at its fastest tested value; None when that is just one tested candidate."""
    base = OrtConfig("combined best")
    ok = [r for r in results if r["engine"] == "onnxruntime" and r["precision"] == "fp32" and "p50_ms" in r]
    if not ok:
        return None
    winners: dict[str, Any] = {}
    for name in ("threads", "opt_level", "mem_arena", "parallel", "spinning"):
        default = getattr(base, name)
        varied = [
            r for r in ok if all(r["settings"][k] == getattr(base, k) for k in r["settings"] if k != name)
        ]
        best = min(varied, key=lambda r: r["p50_ms"], default=None)
        if best is not None and best["settings"][name] != default:
            winners[name] = best["settings"][name]
    return dataclasses.replace(base, **winners) if len(winners) > 1 else None


def _parity(output: np.ndarray, reference: np.ndarray, precision: str) -> dict[str, Any]:
    from esrdf.export.parity import bar_failures, compare

    bar, bar_name = {
        "fp32": (FP32_GRAPH, "fp32_graph"),
        "fp16": (FP16_GRAPH, "fp16_graph"),
        "bf16": (BF16_GRAPH, "bf16_graph"),
    }[precision]
    figures = compare(output, reference)
    failures = bar_failures(figures, bar, f"step {precision}")
    return {
        "parity": figures.as_manifest(),
        "bar": bar_name,
        "within_bar": not failures,
        "failures": failures,
    }


def _time_ort(
    bundle: Bundle,
    config: OrtConfig,
    feeds: dict[str, np.ndarray],
    timing: dict[str, Any],
    reference: np.ndarray,
) -> dict[str, Any]:
    import onnxruntime as ort

    path = str(bundle.graph_path(STEP, config.precision))
    session = ort.InferenceSession(
        path, sess_options=session_options(config), providers=["CPUExecutionProvider"]
    )
    output = np.asarray(session.run(None, feeds)[0])
    t = time_call(lambda: session.run(None, feeds), **timing)
    return {
        "label": config.label,
        "engine": "onnxruntime",
        "precision": config.precision,
        "settings": config.settings(),
        **t.as_dict(),
        **_parity(output, reference, config.precision),
    }


@dataclass(frozen=True)
class OpenVinoConfig:
    """OpenVINO CPU settings for the step graph; the defaults are the OpenVINO engine's (LATENCY hint)."""

    label: str
    precision: str = "fp32"
    threads: int | None = None  # None: OpenVINO's default (every core)
    hint: str = "LATENCY"

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "label"}


def openvino_candidates(cpus: int, native_bf16: bool) -> list[OpenVinoConfig]:
    found = []
    for precision in ("fp32", "bf16") if native_bf16 else ("fp32",):
        found.append(OpenVinoConfig(f"openvino {precision}", precision))
        found.append(OpenVinoConfig(f"openvino {precision}, THROUGHPUT", precision, hint="THROUGHPUT"))
        for threads in sorted({1, cpus}):
            found.append(OpenVinoConfig(f"openvino {precision}, {threads} thread(s)", precision, threads))
    return found


def _time_openvino(
    bundle: Bundle,
    config: OpenVinoConfig,
    feeds: dict[str, np.ndarray],
    timing: dict[str, Any],
    reference: np.ndarray,
) -> dict[str, Any]:
    from esrdf.engines.openvino_engine import HINTS, shared_core

    model = shared_core().read_model(str(bundle.graph_path(STEP, "fp32")))
    model.reshape({k: list(v.shape) for k, v in feeds.items()})
    settings: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": HINTS[config.precision],
        "PERFORMANCE_HINT": config.hint,
    }
    if config.threads is not None:
        settings["INFERENCE_NUM_THREADS"] = config.threads
    request = shared_core().compile_model(model, "CPU", settings).create_infer_request()
    inputs = [feeds[name] for name in graph_spec(STEP).input_names]
    output = np.asarray(request.infer(inputs, share_outputs=False)[0])
    t = time_call(lambda: request.infer(inputs), **timing)
    return {
        "label": config.label,
        "engine": "openvino",
        "precision": config.precision,
        "settings": config.settings(),
        **t.as_dict(),
        **_parity(output, reference, config.precision),
    }


def _time_torch(
    step_module: Any,
    dtype: Any,
    label: str,
    feeds: dict[str, np.ndarray],
    timing: dict[str, Any],
    reference: np.ndarray,
) -> dict[str, Any]:
    import torch

    step_module.compute_dtype = dtype
    args = [torch.from_numpy(v) for v in feeds.values()]

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return step_module(*args)

    output = run().float().numpy()
    t = time_call(run, **timing)
    precision = "fp32" if dtype is None else "bf16"
    return {
        "label": label,
        "engine": "torch",
        "precision": precision,
        "settings": {"threads": torch.get_num_threads(), "autocast": str(dtype)},
        **t.as_dict(),
        **_parity(output, reference, precision),
    }


def _torch_candidates(
    step_module: Any, feeds: dict[str, np.ndarray], timing: dict[str, Any], reference: np.ndarray
) -> tuple[list[dict[str, Any]], bool, str]:
    """Eager fp32 at the benchmark's threads (the ratio's baseline), at 1 thread (oversubscribed OpenMP
    pools spin on a shared CPU), and bf16 autocast where the CPU has native bf16."""
    import torch

    threads = torch.get_num_threads()
    results = [_time_torch(step_module, None, "torch eager fp32", feeds, timing, reference)]
    if threads > 1:
        torch.set_num_threads(1)
        try:
            results.append(
                _time_torch(step_module, None, "torch eager fp32, 1 thread", feeds, timing, reference)
            )
        finally:
            torch.set_num_threads(threads)
    native_bf16, evidence = bf16_support()
    if native_bf16:
        results.append(
            _time_torch(step_module, torch.bfloat16, "torch bf16 autocast", feeds, timing, reference)
        )
    step_module.compute_dtype = None
    return results, native_bf16, evidence


def run_cpu_tuning(
    bundle: Bundle,
    models: Callable[[], tuple[Any, Any]],
    lr_tile: int,
    repeats: int,
    warmup: int,
    max_seconds: float | None,
    log: Log = print,
) -> dict[str, Any]:
    """Time the step graph under every candidate at batch 1; pick the fastest within its parity bar."""
    from esrdf.export.parity import make_feeds, run_eager
    from esrdf.models.step_module import PredictorModule, StepModule

    predictor, unet = models()
    photo, source = workload_photo()
    scale = bundle.manifest.scale
    feeds = make_feeds(
        PredictorModule(predictor).eval(), bundle.manifest.schedule.array(), photo, 1, lr_tile, lr_tile, scale
    )[STEP]
    step_module = StepModule(unet).eval()
    reference = run_eager(step_module, feeds)
    timing = {"warmup": warmup, "repeats": repeats, "max_seconds": max_seconds}
    results, native_bf16, evidence = _torch_candidates(step_module, feeds, timing, reference)
    candidates = [c for c in ort_candidates(usable_cpus()) if c.precision in bundle.precisions()]
    for config in candidates:
        results.append(_time_ort(bundle, config, feeds, timing, reference))
        log(f"cpu tuning: {config.label:28s} p50 {results[-1]['p50_ms']:9.2f} ms")
    combined = combined_best(results)
    if combined is not None:
        results.append(_time_ort(bundle, combined, feeds, timing, reference))
        log(f"cpu tuning: {combined.label:28s} p50 {results[-1]['p50_ms']:9.2f} ms")
    if importlib.util.find_spec("openvino") is not None:
        for ov_config in openvino_candidates(usable_cpus(), native_bf16):
            results.append(_time_openvino(bundle, ov_config, feeds, timing, reference))
            log(f"cpu tuning: {ov_config.label:28s} p50 {results[-1]['p50_ms']:9.2f} ms")
    return summarize_tuning(results, lr_tile, scale, source, native_bf16, evidence)


def summarize_tuning(
    results: list[dict[str, Any]], lr_tile: int, scale: int, photo: str, native_bf16: bool, bf16_evidence: str
) -> dict[str, Any]:
    """Ratios against eager fp32, and the fastest candidates overall / within bars / fp32 within bars."""
    eager = next(r["p50_ms"] for r in results if r["label"] == "torch eager fp32")
    for r in results:
        r["speedup_vs_eager_fp32"] = round(eager / r["p50_ms"], 3)
    within = [r for r in results if r["within_bar"]]
    default = next((r for r in results if r["label"] == "engine default"), None)

    def fastest(rows: list[dict[str, Any]]) -> str | None:
        return min(rows, key=lambda r: r["p50_ms"])["label"] if rows else None

    return {
        "graph": STEP,
        "batch": 1,
        "lr_tile": lr_tile,
        "hr_tile": lr_tile * scale,
        "inputs": photo,
        "note": f"the {PREDICTOR} graph runs once per request and is not tuned separately",
        "bf16": {"native": native_bf16, "evidence": bf16_evidence, "onnxruntime": ORT_BF16_NOTE},
        "eager_fp32_p50_ms": eager,
        "engine_default_p50_ms": None if default is None else default["p50_ms"],
        "candidates": results,
        "fastest": fastest(results),
        "fastest_within_bars": fastest(within),
        "fastest_onnxruntime_fp32_within_bar": fastest(
            [r for r in within if r["engine"] == "onnxruntime" and r["precision"] == "fp32"]
        ),
        "fastest_openvino_within_bar": fastest([r for r in within if r["engine"] == "openvino"]),
    }
