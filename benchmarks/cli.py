"""``esrdf-bench``: a thin shell over ``esrdf.bench.suite.run_benchmark`` and ``esrdf.bench.quality``.

    esrdf-bench --engine bundle/ --backends onnxruntime,torch,eager --steps 1,4,10 --batch 1,2,4 \
        --reference --json out/bench/bench.json --plot out/bench/latency.png

Progress goes to stderr, the markdown tables to stdout (and next to the JSON as ``.md``). Bad input is one
``Error: ...`` line and a non-zero exit status.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from esrdf.bench.backends import BACKENDS
from esrdf.bench.quality import DEFAULT_STEPS, QualityError, QualityOptions
from esrdf.cli.errors import OneLineErrorCommand


class FloatList(click.ParamType):
    """A comma-separated list of numbers, e.g. ``0,1``."""

    name = "X[,X...]"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
        if not numbers:
            self.fail(f"{value!r}: give one or more numbers", param, ctx)
        return numbers


class IntList(click.ParamType):
    """A comma-separated list of positive integers, e.g. ``1,4,10``."""

    name = "N[,N...]"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not numbers or min(numbers) < 1:
            self.fail(f"{value!r}: give one or more positive integers", param, ctx)
        return numbers


def json_safe(value: Any) -> Any:
    """NaN/inf -> null, so the file is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _log(message: str) -> None:
    click.echo(message, err=True)


def _check_backends(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown backend(s) {unknown or value!r}; choose from {', '.join(BACKENDS)}",
            param_hint="--backends",
        )
    return names


def _check_plot_support() -> None:
    from esrdf.bench.plots import INSTALL_HINT

    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(INSTALL_HINT) from exc


@click.command(cls=OneLineErrorCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "engine", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option(
    "--backends",
    default="onnxruntime,torch",
    show_default=True,
    help=f"Comma-separated, from: {', '.join(BACKENDS)}. Missing ones are reported as skipped.",
)
@click.option("--steps", type=IntList(), default="1,4,10", show_default=True, help="DDIM step counts.")
@click.option(
    "--batch",
    "batches",
    type=IntList(),
    default="1",
    show_default=True,
    help="Batch sizes (tiles per engine call) to search; batch 1 is always measured.",
)
@click.option("--tile", type=int, default=None, help="LR tile size [default: the bundle's export tile].")
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed calls per case (at most).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed calls per case first.")
@click.option(
    "--max-seconds",
    type=float,
    default=20.0,
    show_default=True,
    help="Stop a case after this long once 3 timed calls are in (0: never).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="Intra-op threads for torch and onnxruntime.")
@click.option(
    "--reference", is_flag=True, help="Also time the paper code's procedure: eager DDPM over all T."
)
@click.option("--no-flops", is_flag=True, help="Skip FLOP counting and the GEMM-ceiling measurement.")
@click.option("--cpu-tuning", is_flag=True, help="Search onnxruntime/torch CPU settings for the step graph.")
@click.option("--quality", is_flag=True, help="Also score PSNR/SSIM/LPIPS against steps on held-out photos.")
@click.option(
    "--ckpt",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint for --quality and the eager backends [default: the bundle's torch weights].",
)
@click.option("--quality-steps", type=IntList(), default=",".join(map(str, DEFAULT_STEPS)), show_default=True)
@click.option(
    "--quality-max-size", type=int, default=128, show_default=True, help="HR crop side for --quality."
)
@click.option(
    "--quality-eta",
    type=FloatList(),
    default="0",
    show_default=True,
    help="DDIM eta values for --quality: 0 deterministic, 1 ancestral noise.",
)
@click.option("--no-ddpm-quality", is_flag=True, help="Leave the DDPM-over-T row out of --quality.")
@click.option("--no-lpips", is_flag=True, help="Do not score LPIPS.")
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Score --quality on this folder instead of the held-out photos.",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Latency PNG; with --quality the quality PNG goes next to it as OUT.quality.png.",
)
def main(
    engine: Path,
    backends: str,
    steps: tuple[int, ...],
    batches: tuple[int, ...],
    tile: int | None,
    repeats: int,
    warmup: int,
    max_seconds: float,
    device: str,
    threads: int | None,
    reference: bool,
    no_flops: bool,
    cpu_tuning: bool,
    quality: bool,
    ckpt: Path | None,
    quality_steps: tuple[int, ...],
    quality_max_size: int,
    quality_eta: tuple[float, ...],
    no_ddpm_quality: bool,
    no_lpips: bool,
    data: Path | None,
    json_out: Path | None,
    plot_out: Path | None,
) -> None:
    """Latency per backend and stage, FLOP/s, comparisons with eager PyTorch, and quality against steps."""
    from esrdf.bench.suite import BenchError, BenchOptions, run_benchmark
    from esrdf.bench.tables import markdown_report

    if plot_out is not None:
        _check_plot_support()
    options = BenchOptions(
        engine=engine,
        backends=_check_backends(backends),
        steps=steps,
        batches=batches,
        tile=tile,
        repeats=repeats,
        warmup=warmup,
        max_seconds=max_seconds or None,
        device=device,
        threads=threads,
        reference=reference,
        ckpt=ckpt,
        flops=not no_flops,
        cpu_tuning=cpu_tuning,
    )
    try:
        report = run_benchmark(options, log=_log)
        if quality:
            sweep = QualityOptions(
                steps=quality_steps,
                etas=quality_eta,
                ddpm=not no_ddpm_quality,
                lpips=not no_lpips,
                max_size=quality_max_size,
                device=device,
            )
            report["quality"] = _quality(report, ckpt, sweep, data)
    except (BenchError, QualityError) as exc:
        raise click.ClickException(str(exc)) from exc
    text = markdown_report(report)
    _write_outputs(report, text, json_out, plot_out)
    click.echo(text)


def _quality(
    report: dict[str, Any], ckpt: Path | None, options: QualityOptions, data: Path | None
) -> dict[str, Any]:
    """The quality sweep on ``ckpt``, or on the eager weights the benchmarked bundle carries."""
    from esrdf.bench.quality import quality_sweep
    from esrdf.runtime.bundle import load_bundle

    if ckpt is None:  # the eager weights the bundle carries (run_benchmark has verified its hashes)
        weights = load_bundle(report["bundle"]["path"], verify=False).manifest.torch_weights
        if weights is None:
            raise QualityError("--quality needs --ckpt (the bundle carries no torch weights)")
        ckpt = (Path(report["bundle"]["path"]) / weights.file).parent
    return quality_sweep(ckpt, options, data_dir=data, log=_log)


def _write_outputs(report: dict[str, Any], text: str, json_out: Path | None, plot_out: Path | None) -> None:
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
        json_out.with_suffix(".md").write_text(text)
        _log(f"wrote {json_out} and {json_out.with_suffix('.md')}")
    if plot_out is not None:
        from esrdf.bench.plots import plot_latency, plot_quality, quality_plot_path

        _log(f"wrote {plot_latency(report, plot_out)}")
        if report.get("quality"):
            _log(f"wrote {plot_quality(report['quality'], quality_plot_path(plot_out))}")


if __name__ == "__main__":
    main()
