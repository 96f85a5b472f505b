"""Markdown tables of a benchmark report, for the console and the README results section."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and not r.get("reference"):
            return r
    return None


def latency_table(report: dict[str, Any]) -> str:
    """Per backend: predictor and step at batch 1, requests per N at batch 1, throughput at the best batch."""
    rows, steps = report["latency"], sorted(set(report["options"]["steps"]))
    header = [
        "backend",
        "precision",
        "predictor ms",
        "step ms",
        *[f"N={n} ms (p95)" for n in steps],
        "step GFLOP/s (of GEMM peak)",
        "best batch: tiles/s at N=" + str(max(steps)),
        "RSS added MiB / GPU peak MiB",
    ]
    body = []
    for status in report["backends"]:
        name = status["name"]
        if name == "reference":
            continue  # its one row is in the comparison table
        if status["status"] != "ok":
            body.append(
                [name, "-", f"{status['status']}: {status.get('reason', '')}"] + [""] * (len(header) - 3)
            )
            continue
        pred, step = (
            _find(rows, backend=name, stage="predictor", batch=1),
            _find(rows, backend=name, stage="step", batch=1),
        )
        requests = [_find(rows, backend=name, stage="request", batch=1, steps=n) for n in steps]
        best = report.get("best_batch", {}).get(name, {}).get("batch", 1)
        best_req = _find(rows, backend=name, stage="request", batch=best, steps=max(steps))
        flops = "-" if step is None or "achieved_gflops" not in step else f"{step['achieved_gflops']:.1f}"
        if step is not None and "fraction_of_gemm_peak" in step:
            flops += f" ({100 * step['fraction_of_gemm_peak']:.0f}%)"
        gpu = [
            r["peak_gpu_allocated_mib"]
            for r in rows
            if r["backend"] == name and "peak_gpu_allocated_mib" in r
        ]
        memory = max(gpu) if gpu else status.get("rss_added_mib")
        body.append(
            [
                name,
                status.get("precision", "-"),
                _fmt(pred and pred["p50_ms"]),
                _fmt(step and step["p50_ms"]),
                *[f"{r['p50_ms']:.1f} ({r['p95_ms']:.1f})" if r else "-" for r in requests],
                flops,
                f"b{best}: {best_req['tiles_per_s']:.2f}" if best_req else "-",
                _fmt(memory, 0),
            ]
        )
    return _table(header, body)


def comparison_table(report: dict[str, Any]) -> str:
    """Per (backend, N): the speed-up over eager PyTorch at the same N and over the DDPM-over-T reference."""
    rows = report.get("comparisons") or []
    keys = list(dict.fromkeys((r["backend"], r["steps"]) for r in rows))
    body = []
    for backend, steps in keys:
        mine = [r for r in rows if (r["backend"], r["steps"]) == (backend, steps)]
        eager = next((r for r in mine if r["versus"].startswith("eager")), None)
        ref = next((r for r in mine if r["versus"].startswith("paper")), None)
        body.append(
            [
                backend,
                str(steps),
                _fmt(mine[0]["p50_ms"]),
                _fmt(eager and eager["baseline_p50_ms"]),
                _speedup(eager),
                _fmt(ref and ref["baseline_p50_ms"]),
                _speedup(ref),
            ]
        )
    ref_label = next(
        (r["versus"].split(": ")[-1] for r in rows if r["versus"].startswith("paper")), "reference"
    )
    return _table(
        [
            "backend",
            "N",
            "ours p50 ms (batch 1)",
            "eager PyTorch, same N, ms",
            "speed-up",
            f"{ref_label} ms",
            "speed-up",
        ],
        body,
    )


def _speedup(row: dict[str, Any] | None) -> str:
    return f"{row['speedup']:.2f}x" if row and row.get("speedup") else "-"


def flops_table(report: dict[str, Any]) -> str:
    flops = report.get("flops")
    if not isinstance(flops, list):
        return f"FLOPs: {flops}"
    body = [
        [f["graph"], str(f["batch"]), f"{f['lr_tile']} -> {f['hr_tile']}", f"{f['gflop']:.3f}"] for f in flops
    ]
    peaks = ", ".join(f"{k} {v.get('gflops')} GFLOP/s" for k, v in (report.get("gemm_peak") or {}).items())
    return (
        _table(["graph", "batch", "tile (LR -> HR)", "GFLOP per call"], body)
        + f"\n\nMeasured GEMM peak: {peaks}"
    )


def tuning_table(tuning: dict[str, Any]) -> str:
    body = [
        [
            c["label"],
            c["engine"],
            c["precision"],
            _fmt(c["p50_ms"]),
            _fmt(c["p95_ms"]),
            f"{c['speedup_vs_eager_fp32']:.2f}x",
            "yes" if c["within_bar"] else "no: " + "; ".join(c["failures"]),
        ]
        for c in tuning["candidates"]
    ]
    return _table(
        ["candidate", "engine", "precision", "step p50 ms", "p95 ms", "vs eager fp32", "within bar"], body
    )


def quality_table(quality: dict[str, Any]) -> str:
    body = []
    for r in quality["rows"]:
        what = r["method"] if r["sampler"] is None else f"ESRDF {r['sampler'].upper()} {r['steps']}"
        what += f" (eta {r['eta']:g})" if r["sampler"] == "ddim" else ""
        body.append(
            [
                what,
                _fmt(r["psnr_rgb"], 2),
                _fmt(r["ssim_rgb"], 4),
                _fmt(r["psnr_y"], 2),
                _fmt(r["ssim_y"], 4),
                _fmt(r["lpips"], 4),
                _fmt(r.get("wall_seconds_per_image"), 2),
            ]
        )
    return _table(["method", "PSNR RGB", "SSIM RGB", "PSNR Y", "SSIM Y", "LPIPS", "s/photo (eager)"], body)


def checks_table(checks: list[dict[str, Any]]) -> str:
    """The GPU check's consistency checks: bit-exactness, or PSNR against its bar."""
    body = []
    for c in checks:
        if "bit_exact" in c:
            result = "bit-exact" if c["bit_exact"] else "NOT bit-exact"
        else:
            result = f"{c['psnr_db']:.2f} dB" + ("" if c["within_bar"] else " (below the bar)")
        body.append([c["check"], str(c["batch"]), str(c["steps"]), result])
    return _table(["check", "batch", "N", "result"], body)


def machine_line(machine: dict[str, Any]) -> str:
    libs = machine.get("libraries", {})
    where = machine.get("gpu") or f"{machine.get('cpu_model')} ({machine.get('usable_cpus')} usable CPUs)"
    return (
        f"{where}; SIMD {', '.join(machine.get('simd_flags', []))}; torch {libs.get('torch')} "
        f"({machine.get('torch_threads')} threads), onnxruntime {libs.get('onnxruntime')}; "
        f"load average {machine.get('load_average')} -> {machine.get('load_average_end')}"
    )


def markdown_report(report: dict[str, Any]) -> str:
    """Everything of the report a README shows, as markdown sections."""
    parts = [f"**Machine:** {machine_line(report['machine'])}", ""]
    parts += [f"- {note}" for note in report.get("notes", [])] + ["", latency_table(report)]
    if report.get("comparisons"):
        parts += ["", comparison_table(report)]
    if isinstance(report.get("flops"), list):
        parts += ["", flops_table(report)]
    if report.get("cpu_tuning"):
        parts += ["", tuning_table(report["cpu_tuning"])]
    if report.get("quality"):
        parts += ["", quality_table(report["quality"])]
    return "\n".join(parts) + "\n"
