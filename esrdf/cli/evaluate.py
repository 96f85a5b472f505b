"""``esrdf-eval``: score a checkpoint on a folder of HR photos (bicubic vs predictor vs ESRDF).

A thin shell over :func:`esrdf.evaluate.evaluate`: parse, call it, print a table, write JSON. Bad input
(missing folder or checkpoint, bad option, missing weights) is one line on stderr and exit status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from esrdf.cli.sampling import sampling_options
from esrdf.config import SamplingOptions


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _score_cells(scores: Any) -> list[str]:
    """Table cells of one MethodScores-like object or means dict, in column order."""
    get = scores.get if isinstance(scores, dict) else lambda k: getattr(scores, k)
    return [
        _fmt(get("psnr_rgb"), 2),
        _fmt(get("ssim_rgb"), 4),
        _fmt(get("psnr_y"), 2),
        _fmt(get("ssim_y"), 4),
        _fmt(get("lpips"), 4),
        _fmt(get("residual_entropy_bits"), 3),
    ]


def render(report: Any) -> list[Any]:
    """Rich renderables for an ``EvalReport``: per-image rows, then the means, then claims and caveats."""
    from rich.table import Table

    title = (
        f"ESRDF evaluation: {report.model} x{report.scale}, {report.sampler} {report.steps} steps, "
        f"eta {report.eta}, {report.prior} prior, seed {report.seed}, {report.device}"
    )
    table = Table(title=title)
    for column in ("image", "method", "PSNR RGB", "SSIM RGB", "PSNR Y", "SSIM Y", "LPIPS", "H(res) bits"):
        table.add_column(column, justify="left" if column in ("image", "method") else "right")
    for image in report.images:
        for i, method in enumerate(report.methods):
            table.add_row(image.name if i == 0 else "", method, *_score_cells(image.scores[method]))
        table.add_section()
    for i, method in enumerate(report.methods):
        label = f"mean of {len(report.images)}" if i == 0 else ""
        table.add_row(label, method, *_score_cells(report.means[method]), style="bold")
    claim = report.entropy_claim
    lines = [
        table,
        f"Residual entropy (paper's claim H(hr - P(lr)) < H(hr - bicubic)): lower for the predictor on "
        f"{claim['predictor_lower_than_bicubic']} of {claim['images']} image(s), "
        f"mean {claim['mean_bits_saved']:+.3f} bits saved.",
        "PSNR/SSIM RGB: full image, as the paper; Y: BT.601 luma, scale-px border cropped (SR convention).",
    ]
    if report.fid is not None:
        values = ", ".join(f"{m} {v:.2f}" for m, v in report.fid.fid_vs_reference.items()) or "not computed"
        lines.append(f"{report.fid.label} vs HR: {values}")
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"skipped: {entry}" for entry in report.skipped]
    return lines


def _expected_errors() -> tuple[type[BaseException], ...]:
    from esrdf.checkpoint import CheckpointError
    from esrdf.config import ConfigError
    from esrdf.data import DataError
    from esrdf.evaluate import EvalError
    from esrdf.fid import FidUnavailableError
    from esrdf.vgg import MissingWeightsError

    return (
        EvalError,
        CheckpointError,
        ConfigError,
        DataError,
        MissingWeightsError,
        FidUnavailableError,
        OSError,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", "ckpt", required=True, type=click.Path(path_type=Path), help="Checkpoint directory.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="Folder of HR images.")
@sampling_options(
    "the checkpoint's sampling.json",
    seed_help="Image i uses seed + i",
)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report here."
)
@click.option(
    "--side-by-side",
    "side_by_side",
    type=click.Path(path_type=Path),
    default=None,
    help="Write bicubic | predictor | ESRDF | HR PNGs into this folder.",
)
@click.option(
    "--fid", is_flag=True, help="Also compute FID (offline Inception port; meaningless on few images)."
)
@click.option("--no-lpips", "no_lpips", is_flag=True, help="Skip LPIPS (needs `esrdf-train vgg-weights`).")
@click.option(
    "--max-size",
    type=int,
    default=512,
    show_default=True,
    help="Centre-crop HR images larger than this per side; 0 = whole image.",
)
@click.option("--max-images", type=int, default=None, help="Evaluate at most this many images.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available."
)
def main(
    ckpt: Path,
    data: Path,
    sampling: SamplingOptions,
    json_out: Path | None,
    side_by_side: Path | None,
    fid: bool,
    no_lpips: bool,
    max_size: int,
    max_images: int | None,
    device: str | None,
) -> None:
    """Compare bicubic, predictor-only and full ESRDF outputs on the HR images under --data.

    Sampling flags not given come from the checkpoint's sampling.json; without one: DDIM over all T steps,
    eta 0, the matched prior."""
    from rich.console import Console

    from esrdf.evaluate import evaluate

    try:
        report = evaluate(
            ckpt,
            data,
            sampling,
            device=device,
            lpips=not no_lpips,
            fid=fid,
            side_by_side_dir=side_by_side,
            max_images=max_images,
            max_size=max_size or None,
        )
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(report.to_json() + "\n")
    except _expected_errors() as exc:
        hint = " (or pass --no-lpips)" if type(exc).__name__ == "MissingWeightsError" else ""
        raise click.ClickException(" ".join(str(exc).split()) + hint) from exc
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    for renderable in render(report):
        console.print(renderable)
    if json_out is not None:
        console.print(f"wrote {json_out}")


if __name__ == "__main__":
    main()
