"""``esrdf-export``: checkpoint -> bundle. A thin shell over ``esrdf.export.bundle_writer.export_bundle``."""

from __future__ import annotations

from pathlib import Path

import click

from esrdf.cli.errors import OneLineErrorCommand
from esrdf.cli.sampling import sampling_options
from esrdf.config import SamplingOptions
from esrdf.export.bundle_writer import DEFAULT_BATCH, DEFAULT_OPSET, DEFAULT_TILE, PRECISION_CHOICES


@click.command(cls=OneLineErrorCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", "ckpt", required=True, help="Checkpoint directory (config.json + model.safetensors).")
@click.option(
    "--out", "out", required=True, help="Bundle directory to write (refused if it exists, see --force)."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="both",
    show_default=True,
    help="Graphs to write: fp32, mixed-precision fp16 (norms, softmax, update in fp32), or both.",
)
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (18 or later).")
@click.option(
    "--tile",
    type=int,
    default=DEFAULT_TILE,
    show_default=True,
    help="LR tile size the runtime defaults to; parity is measured at this size.",
)
@click.option(
    "--batch",
    type=int,
    default=DEFAULT_BATCH,
    show_default=True,
    help="Tiles per engine call the runtime defaults to.",
)
@sampling_options("the checkpoint's sampling.json", seed=False)
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option(
    "--no-parity-gate",
    is_flag=True,
    help="Write the bundle even if a graph misses a parity bar (the figures are still recorded).",
)
@click.option(
    "--no-torch-weights",
    is_flag=True,
    help="Leave the eager weights out of the bundle (the torch backend then cannot serve it).",
)
@click.option(
    "--save-eager-io",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write each graph's parity inputs and eager outputs here, in polygraphy's JSON format.",
)
@click.option(
    "--trt", is_flag=True, help="Also build fp16 TensorRT engines into the bundle (needs tensorrt and CUDA)."
)
@click.option("--trt-dynamic", is_flag=True, help="One dynamic TensorRT profile up to --batch, not static.")
@click.option("--trt-opt-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option(
    "--timing-cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of TensorRT timing caches (one per GPU model and TensorRT version).",
)
@click.option(
    "--aoti",
    is_flag=True,
    help="Also compile AOTInductor packages of both graphs into the bundle (aoti/), for the C++ runtime's "
    "libtorch backend (needs a C++ compiler).",
)
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write a Triton model repository here: the TensorRT plans (or, without them, the ONNX graphs) "
    "and a Python-backend model that runs the sampler loop.",
)
@click.option("--quiet", "-q", is_flag=True, help="No per-stage progress.")
def main(
    ckpt: str,
    out: str,
    precision: str,
    opset: int,
    tile: int,
    batch: int,
    sampling: SamplingOptions,
    force: bool,
    no_parity_gate: bool,
    no_torch_weights: bool,
    save_eager_io: Path | None,
    trt: bool,
    trt_dynamic: bool,
    trt_opt_level: int,
    timing_cache: Path | None,
    aoti: bool,
    triton_repo: Path | None,
    quiet: bool,
) -> None:
    """Export a checkpoint's predictor and step graphs to an ONNX bundle, with parity figures.

    The sampling flags set the defaults the bundle records for every consumer; what they leave out comes
    from the checkpoint's sampling.json, then DDIM, min(50, T) steps, eta 0 and the matched prior
    (x_T ~ N(0, (1 - alpha_bar_T) I)); --prior paper records the paper's N(0, I)."""
    from esrdf.checkpoint import CheckpointError
    from esrdf.config import ConfigError
    from esrdf.export.bundle_writer import ExportError, export_bundle
    from esrdf.export.parity import ParityError
    from esrdf.runtime.bundle import BundleError

    if trt:
        _check_tensorrt_request(precision)
    if aoti and no_torch_weights:
        raise click.ClickException("--aoti compiles the bundle's torch weights: drop --no-torch-weights")
    try:
        bundle = export_bundle(
            ckpt,
            out,
            precision=precision,
            opset=opset,
            tile=tile,
            batch=batch,
            force=force,
            progress=not quiet,
            parity_gate=not no_parity_gate,
            torch_weights=not no_torch_weights,
            save_eager_io=save_eager_io,
            sampling=sampling,
        )
    except (CheckpointError, ConfigError, ExportError, ParityError, BundleError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote bundle {bundle}")
    if trt:
        from esrdf.engines.tensorrt_build import build_engines_into_bundle

        entries = build_engines_into_bundle(
            bundle, tile, batch, dynamic=trt_dynamic, opt_level=trt_opt_level, timing_cache_dir=timing_cache,
            progress=None if quiet else click.echo,
        )  # fmt: skip
        click.echo(f"built {len(entries)} TensorRT engine(s) into {bundle}")
    if aoti:
        _add_aoti_packages(bundle, quiet)
    if triton_repo is not None:
        _write_triton_repo(bundle, triton_repo, tile, batch, force)


def _add_aoti_packages(bundle: Path, quiet: bool) -> None:
    """AOTInductor packages for the C++ runtime (``esrdf.export.aoti``), at the bundle's tile and batch."""
    from esrdf.export.aoti import AotiError, add_aoti_packages
    from esrdf.runtime.bundle import BundleError

    try:
        target = add_aoti_packages(bundle, progress=None if quiet else click.echo)
    except (AotiError, BundleError, OSError) as exc:
        raise click.ClickException(f"--aoti: {exc}") from exc
    click.echo(f"wrote AOTInductor packages to {target}")


def _write_triton_repo(bundle: Path, target: Path, tile: int, batch: int, force: bool) -> None:
    """The Triton model repository for ``bundle`` (``esrdf.export.triton_repo``), with its notes."""
    from esrdf.export.triton_repo import TritonRepoOptions, write_triton_repo
    from esrdf.runtime.bundle import BundleError

    try:
        repo = write_triton_repo(bundle, target, TritonRepoOptions(tile=tile, batch=batch), force=force)
    except (BundleError, OSError) as exc:
        raise click.ClickException(f"--triton-repo: {exc}") from exc
    click.echo(f"wrote Triton model repository {repo.path} ({repo.platform} models)")
    for note in repo.notes:
        click.echo(f"note: {note}")


def _check_tensorrt_request(precision: str) -> None:
    """Fail before any work when --trt cannot be honoured here, saying why."""
    from esrdf.engines.tensorrt_build import tensorrt_unavailable_reason

    if precision == "fp32":
        raise click.ClickException("--trt builds from the mixed fp16 graphs: use --precision fp16 or both")
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise click.ClickException(f"--trt: cannot build TensorRT engines on this machine: {reason}")


if __name__ == "__main__":  # pragma: no cover
    main()
