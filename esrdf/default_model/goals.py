"""The default model's quality bar (issue 15), checked on an ``esrdf.evaluate`` report.

Goals, on the held-out photos at the bundle's default sampling:

1. ESRDF PSNR-RGB >= bicubic + 0.9 dB and >= predictor - 0.1 dB (means);
2. LPIPS: ESRDF < predictor < bicubic (means);
3. no photo where ESRDF's PSNR-RGB is below bicubic's;
4. the paper's residual-entropy claim on every photo: H(hr - P(lr)) < H(hr - bicubic(lr));
5. checkpoint and bundle together <= 30 MiB.

Pure Python on the report's JSON form, so it runs wherever the report is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PSNR_OVER_BICUBIC_DB = 0.9
PSNR_BELOW_PREDICTOR_DB = 0.1
MAX_SHIPPED_BYTES = 30 * 1024 * 1024


@dataclass(frozen=True)
class Goal:
    name: str
    met: bool
    detail: str


def _mean(report: Mapping[str, Any], method: str, score: str) -> float:
    return float(report["means"][method][score])


def psnr_goal(report: Mapping[str, Any]) -> Goal:
    bic, pred, esrdf = (_mean(report, m, "psnr_rgb") for m in ("bicubic", "predictor", "esrdf"))
    met = esrdf >= bic + PSNR_OVER_BICUBIC_DB and esrdf >= pred - PSNR_BELOW_PREDICTOR_DB
    return Goal(
        "PSNR-RGB >= bicubic + 0.9 and >= predictor - 0.1",
        met,
        f"ESRDF {esrdf:.2f} dB, bicubic {bic:.2f} ({esrdf - bic:+.2f}), "
        f"predictor {pred:.2f} ({esrdf - pred:+.2f})",
    )


def lpips_goal(report: Mapping[str, Any]) -> Goal:
    bic, pred, esrdf = (_mean(report, m, "lpips") for m in ("bicubic", "predictor", "esrdf"))
    return Goal(
        "LPIPS ESRDF < predictor < bicubic",
        esrdf < pred < bic,
        f"ESRDF {esrdf:.4f}, predictor {pred:.4f}, bicubic {bic:.4f}",
    )


def per_photo_goal(report: Mapping[str, Any]) -> Goal:
    gaps = {
        row["name"]: row["scores"]["esrdf"]["psnr_rgb"] - row["scores"]["bicubic"]["psnr_rgb"]
        for row in report["images"]
    }
    worst = min(gaps, key=lambda name: gaps[name])
    below = sorted(name for name, gap in gaps.items() if gap < 0)
    return Goal(
        "no photo where ESRDF is below bicubic (PSNR-RGB)",
        not below,
        f"worst {worst} {gaps[worst]:+.2f} dB" + (f"; below: {', '.join(below)}" if below else ""),
    )


def entropy_goal(report: Mapping[str, Any]) -> Goal:
    rows = report["images"]

    def lower(method: str) -> list[str]:
        key = "residual_entropy_bits"
        return [r["name"] for r in rows if r["scores"][method][key] < r["scores"]["bicubic"][key]]

    predictor, esrdf = lower("predictor"), lower("esrdf")
    return Goal(
        "residual entropy below bicubic's on every photo (predictor residual, the paper's claim)",
        len(predictor) == len(rows),
        f"predictor lower on {len(predictor)}/{len(rows)}, ESRDF lower on {len(esrdf)}/{len(rows)}",
    )


def shipped_bytes(package_dir: Path) -> int:
    """Bytes of the shipped checkpoint and bundle folders under ``package_dir``."""
    folders = (package_dir / "checkpoint", package_dir / "bundle")
    return sum(f.stat().st_size for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file())


def size_goal(package_dir: Path) -> Goal:
    size = shipped_bytes(package_dir)
    return Goal("checkpoint + bundle <= 30 MiB", size <= MAX_SHIPPED_BYTES, f"{size / 2**20:.1f} MiB")


def check_goals(report: Mapping[str, Any], package_dir: Path | None = None) -> list[Goal]:
    """Every goal that ``report`` (``EvalReport.to_dict()``) can decide, and the size goal when given the
    package directory."""
    goals = [psnr_goal(report), lpips_goal(report), per_photo_goal(report), entropy_goal(report)]
    return goals + ([size_goal(package_dir)] if package_dir is not None else [])
