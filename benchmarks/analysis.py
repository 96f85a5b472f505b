"""What a benchmark's rows mean together: achieved FLOP/s, best batch, speed-ups over the baselines.

Pure functions of the report's rows (JSON dicts), so they can be re-run on a saved report.
"""

from __future__ import annotations

import math
from typing import Any


def _flops_of(report: dict[str, Any], graph: str, batch: int) -> int | None:
    for f in report.get("flops") or []:
        if isinstance(f, dict) and f.get("graph") == graph and f.get("batch") == batch:
            return int(f["flops"])
    return None


def annotate_flops(report: dict[str, Any]) -> None:
    """Add counted GFLOP, achieved GFLOP/s and the fraction of the GEMM ceiling to every row."""
    peaks = report.get("gemm_peak") or {}
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    for row in report["latency"]:
        pred, step = _flops_of(report, "predictor", row["batch"]), _flops_of(report, "step", row["batch"])
        if pred is None or step is None:
            continue
        flops = {"predictor": pred, "step": step}.get(row["stage"], pred + row.get("steps", 0) * step)
        achieved = flops / (row["p50_ms"] / 1000.0) / 1e9
        row["gflop"] = round(flops / 1e9, 4)
        row["achieved_gflops"] = round(achieved, 2)
        peak = peaks.get(dtype.get(row.get("precision", "fp32"), "float32"), {})
        if isinstance(peak, dict) and peak.get("gflops"):
            row["fraction_of_gemm_peak"] = round(achieved / peak["gflops"], 4)


def best_batches(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per backend: the step-stage batch with the most tiles/s."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["stage"] == "step" and r["tiles_per_s"] > best.get(r["backend"], {}).get("tiles_per_s", -1.0):
            best[r["backend"]] = {"batch": r["batch"], "tiles_per_s": r["tiles_per_s"]}
    return best


def _request(rows: list[dict[str, Any]], backend: str, batch: int, steps: int, ref: bool = False) -> Any:
    for r in rows:
        if (r["backend"], r["stage"], r["batch"], r.get("steps"), bool(r.get("reference"))) == (
            backend,
            "request",
            batch,
            steps,
            ref,
        ):
            return r
    return None


def comparisons(rows: list[dict[str, Any]], timesteps: int) -> list[dict[str, Any]]:
    """Speed-ups of each runtime backend over eager (same N, batch 1) and over the DDPM-T reference."""
    out = []
    reference = _request(rows, "eager", 1, timesteps, ref=True)
    runtime = [r for r in rows if r["stage"] == "request" and r["batch"] == 1 and r["backend"] != "eager"]
    for r in runtime:
        eager = _request(rows, "eager", 1, r["steps"])
        base = {"backend": r["backend"], "steps": r["steps"], "batch": 1, "p50_ms": r["p50_ms"]}
        if eager is not None:
            out.append(
                base
                | {
                    "versus": f"eager PyTorch, DDIM N={r['steps']}",
                    "baseline_p50_ms": eager["p50_ms"],
                    "speedup": _ratio(eager["p50_ms"], r["p50_ms"]),
                }
            )
        if reference is not None:
            out.append(
                base
                | {
                    "versus": f"paper-code reference: eager DDPM over T={timesteps}",
                    "baseline_p50_ms": reference["p50_ms"],
                    "speedup": _ratio(reference["p50_ms"], r["p50_ms"]),
                }
            )
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 and math.isfinite(a / b) else None


def footprint_mib(opened_mib: float | None, rows: list[dict[str, Any]], backend: str) -> float | None:
    """RSS a backend added: opening it (weights, sessions) plus the growth of its cases' cold calls.

    Backends share a process, so this is incremental: torch modules that another backend loaded first
    (eager and torch-bf16 share them) are counted where they were loaded.
    """
    if opened_mib is None:
        return None
    growth = sum(r.get("rss_growth_mib") or 0.0 for r in rows if r["backend"] == backend)
    return round(opened_mib + growth, 1)
