"""PNG plots of a benchmark report: latency against steps per backend, quality against steps.

matplotlib is an optional extra (``pip install 'esrdf[plot]'``); without it ``PlotUnavailable`` says so.
Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global figure registry, no
interactive backend, safe in a headless service or a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL_HINT = "plots need matplotlib: pip install 'esrdf[plot]' (or pip install 'matplotlib>=3.7')"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable(INSTALL_HINT) from exc
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def quality_plot_path(latency_path: Path) -> Path:
    """Where the quality plot goes, next to the latency plot: OUT.png -> OUT.quality.png."""
    return latency_path.with_name(latency_path.stem + ".quality.png")


def _title(report: dict[str, Any]) -> str:
    bundle, machine, work = report["bundle"], report["machine"], report["workload"]
    where = machine.get("gpu") or f"{machine.get('cpu_model', '?')}, {machine.get('usable_cpus', '?')} CPUs"
    return f"{bundle['model']} model, {work['hr_tile']}x{work['hr_tile']} HR tiles, batch 1 - {where}"


def plot_latency(report: dict[str, Any], path: Path) -> Path:
    """Request p50 (bar to p95) against DDIM steps, one line per backend at batch 1; the eager DDPM-over-T
    reference as a star. Log-log axes: a request costs one predictor pass plus N steps."""
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    rows = [r for r in report["latency"] if r["stage"] == "request" and r["batch"] == 1]
    for backend in dict.fromkeys(r["backend"] for r in rows if not r.get("reference")):
        mine = sorted(
            (r for r in rows if r["backend"] == backend and not r.get("reference")), key=lambda r: r["steps"]
        )
        steps = [r["steps"] for r in mine]
        p50 = [r["p50_ms"] for r in mine]
        spread = [[0.0] * len(mine), [r["p95_ms"] - r["p50_ms"] for r in mine]]
        ax.errorbar(steps, p50, yerr=spread, marker="o", capsize=3, label=backend)
    for r in (r for r in rows if r.get("reference")):
        ax.plot(
            [r["steps"]],
            [r["p50_ms"]],
            marker="*",
            markersize=14,
            linestyle="none",
            color="black",
            label=f"reference: eager DDPM, T={r['steps']}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps N (DDIM; reference: DDPM over all T)")
    ax.set_ylabel("request latency, p50 (ms); bar to p95")
    ax.set_title(_title(report), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


ETA_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown")


def _quality_panel(ax: Any, rows: list[dict[str, Any]], scores: tuple[str, ...], label: str) -> None:
    """One score family: a DDIM line per eta and convention, DDPM stars, bicubic/predictor levels."""
    etas = sorted({r["eta"] for r in rows if r["sampler"] == "ddim"})
    for score, style in zip(scores, ("-", ":"), strict=False):
        if any(r[score] is None for r in rows):
            continue
        for eta, colour in zip(etas, ETA_COLOURS, strict=False):
            ddim = sorted(
                (r for r in rows if r["sampler"] == "ddim" and r["eta"] == eta), key=lambda r: r["steps"]
            )
            ax.plot([r["steps"] for r in ddim], [r[score] for r in ddim], marker="o", linestyle=style,
                    color=colour, label=f"DDIM eta={eta:g} ({score})")  # fmt: skip
        for r in (r for r in rows if r["sampler"] == "ddpm"):
            ax.plot([r["steps"]], [r[score]], marker="*", markersize=12, linestyle="none", color="black",
                    label=f"DDPM T={r['steps']} ({score})")  # fmt: skip
        for r, colour in zip((x for x in rows if x["sampler"] is None), ("grey", "tab:green"), strict=False):
            ax.axhline(r[score], color=colour, linestyle=style, label=f"{r['method']} ({score})")
    ax.set_xscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def plot_quality(quality: dict[str, Any], path: Path) -> Path:
    """PSNR, SSIM (Y border-cropped solid, RGB full image dotted) and LPIPS against steps: a DDIM line per
    eta, the DDPM-over-T point as a star, bicubic and predictor-only as horizontal lines."""
    fig = _figure(12.0, 4.2)
    panels = [
        ("PSNR (dB)", ("psnr_y", "psnr_rgb")),
        ("SSIM", ("ssim_y", "ssim_rgb")),
        ("LPIPS (lower is better)", ("lpips",)),
    ]
    for index, (label, scores) in enumerate(panels):
        _quality_panel(fig.add_subplot(1, len(panels), index + 1), quality["rows"], scores, label)
    checkpoint = "/".join(Path(quality["checkpoint"]).parts[-2:])
    fig.suptitle(f"{quality['model']} model ({checkpoint}), {len(quality['images'])} held-out photos "
                 f"(crops <= {quality['max_size']} px)", fontsize=9)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
