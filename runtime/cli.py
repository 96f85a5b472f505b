"""``esrdf-run``: upscale an image or a folder of images with an exported bundle.

    esrdf-run -i photo.png -o photo_x4.png                 # the default model shipped in the package
    esrdf-run --engine bundle/ -i photo.png -o photo_x4.png
    esrdf-run --engine bundle/ -i photos/ -o photos_x4/ --steps 20 --seed 1

A folder run processes the folder's image files (not subfolders), keeps their names, and skips outputs
that already exist unless ``--overwrite``; since every output is written atomically (temp file, then
rename), an interrupted run leaves no partial image and rerunning the same command resumes it. It never
writes over its input. Images keep what they are: gray stays gray, alpha is kept, 16-bit grayscale stays
16-bit where the output format holds it (``--output-bits``).

Before any compute (``esrdf.runtime.preflight``): the inputs exist and are images, no output is an input,
the run's tile, overlap, batch and precision suit the bundle, and every output folder can be created and
written. Each failure is one line. Exit codes: 0 done; 1 an image failed (one line each, the run goes on)
or the bundle or engine cannot be used; 2 a bad command (options, inputs, outputs); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from esrdf.cli.sampling import sampling_options
from esrdf.config import SamplingOptions
from esrdf.runtime.backend_choice import AUTO
from esrdf.runtime.backends import BACKENDS
from esrdf.runtime.bundle import BundleError
from esrdf.runtime.engine import EngineError
from esrdf.runtime.images import (
    DEFAULT_MAX_PIXELS,
    OUTPUT_BITS,
    SIXTEEN_BIT_FORMATS,
    ImageError,
    load_picture,
    output_format,
    remove_stale_partials,
    save_picture,
)
from esrdf.runtime.preflight import OutputError, RunSettingsError, prepared_outputs
from esrdf.runtime.progress import BarProgress, ImageCount, LineProgress, run_progress
from esrdf.runtime.upscaler import Upscaler

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
)
EXIT_FAILED, EXIT_BAD_COMMAND, EXIT_INTERRUPTED = 1, 2, 130


class BadCommand(click.ClickException):
    """A command that cannot run as given (inputs, outputs, options): one ``Error:`` line, exit 2."""

    exit_code = EXIT_BAD_COMMAND


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path


@dataclass
class RunReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0


def plain_console() -> Console:
    """stderr, one line per message however long (no wrapping), and no markup parsing of file names."""
    return Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def plan_jobs(source: Path, target: Path) -> list[Job]:
    """Pair inputs with outputs; ``BadCommand`` for a run that would overwrite its input or has no images."""
    if source.is_dir():
        if target.exists() and not target.is_dir():
            raise BadCommand(f"-i is a folder, so -o must be a folder too ({target} is a file)")
        if _same_file(source, target):
            raise BadCommand(
                f"-o {target} is the input folder; choose another so inputs are never overwritten"
            )
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        jobs = [Job(p, target / p.name) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not jobs:
            raise BadCommand(
                f"no images found in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    else:
        # An existing folder, or a name without an extension, is a folder to write into.
        into_folder = target.is_dir() or not target.suffix
        jobs = [Job(source, target / source.name if into_folder else target)]
        try:
            output_format(jobs[0].target)
        except ImageError as exc:
            raise BadCommand(str(exc)) from None
    for job in jobs:
        if _same_file(job.source, job.target):
            raise BadCommand(f"-o would overwrite the input {job.source}; choose another output")
    return jobs


def check_output_bits(jobs: list[Job], bits: str) -> None:
    """``--output-bits 16`` needs outputs whose format holds 16 bits (PNG, TIFF): refused once, up front."""
    if bits != "16":
        return
    for job in jobs:
        fmt = output_format(job.target)
        if fmt not in SIXTEEN_BIT_FORMATS:
            raise BadCommand(
                f"--output-bits 16: {job.target} would be {fmt}, which holds 8 bits; write .png or .tif"
            )


def _upscale_one(
    upscaler: Upscaler,
    job: Job,
    options: SamplingOptions,
    max_pixels: int,
    progress: LineProgress | BarProgress,
    place: tuple[int, int],
    bits: str,
) -> None:
    picture = load_picture(job.source, max_pixels=max_pixels)
    height, width = picture.color.shape[:2]
    count = ImageCount(place[0], place[1], job.source.name, upscaler.tile_count(height, width))
    with progress.image(count) as update:
        hr = upscaler.upscale_picture(picture, options, progress=update)
    job.target.parent.mkdir(parents=True, exist_ok=True)  # made by the pre-flight check in esrdf-run
    remove_stale_partials(job.target)
    try:
        save_picture(job.target, hr, bits)
    except OSError as exc:  # disk full, or the folder changed since the pre-flight probe: name the output
        raise ImageError(f"{job.target}: cannot write this output ({exc.strerror or exc})") from None


def run_jobs(
    upscaler: Upscaler,
    jobs: list[Job],
    options: SamplingOptions,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    console: Console | None = None,
    bits: str = "auto",
) -> RunReport:
    """Upscale each job, skipping finished ones; a failing image is one line, the others still run."""
    console = console or plain_console()
    report = RunReport()
    todo = [job for job in jobs if overwrite or not job.target.exists()]
    report.skipped = len(jobs) - len(todo)
    with run_progress(console, len(todo)) as progress:
        for index, job in enumerate(todo, start=1):
            try:
                _upscale_one(upscaler, job, options, max_pixels, progress, (index, len(todo)), bits)
                report.done += 1
                console.print(f"wrote {job.target}")
            except ImageError as exc:
                report.failed += 1
                console.print(f"error: {exc}")
            except (ValueError, RuntimeError, OSError) as exc:
                report.failed += 1
                console.print(f"error: {job.source}: {exc}")
    return report


def shipped_bundle_dir() -> Path:
    """The default model's bundle inside the package (imported here, lazily: it is only needed without
    --engine; the import is standard-library only, so the runtime stays torch-free)."""
    from esrdf.default_model import default_bundle_dir

    try:
        return default_bundle_dir()
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc}; or pass --engine BUNDLE_DIR") from None


def describe_choice(upscaler: Upscaler) -> list[str]:
    """What ``-v`` prints: the backend and why, each graph's precision and the parity figures behind it."""
    choice = upscaler.choice
    lines = [f"backend: {choice.backend} ({choice.reason})"]
    describe = getattr(upscaler.engine, "describe", None)
    lines.append(f"engine: {describe() if describe else f'{choice.backend} {choice.precision}'}")
    parity = getattr(upscaler.engine, "parity", None) or {}
    for role, reason in parity.get("reasons", {}).items():
        lines.append(f"  {role}: {parity['precisions'][role]}, {reason}")
    e2e = parity.get("end_to_end")
    if e2e:
        sampled = f"{e2e['steps']} {e2e['sampler']} steps, same noise"
        lines.append(f"  end to end vs f32: {e2e['psnr_db']:.1f} dB ({sampled})")
    if parity:
        cached = "cached record" if parity.get("cached") else f"measured now in {parity['measure_seconds']} s"
        lines.append(f"  parity: {cached}, on this machine")
    lines.append(f"tiles: {upscaler.tile} LR px, batch {upscaler.batch}, overlap {upscaler.overlap}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Bundle folder [the default model shipped with esrdf].",
)
@click.option(
    "-i",
    "--input",
    "source",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Image file or folder of images.",
)
@click.option(
    "-o",
    "--output",
    "target",
    required=True,
    type=click.Path(path_type=Path),
    help="Output file, or folder (created if missing).",
)
@sampling_options("the bundle")
@click.option("--tile", type=click.IntRange(min=0), default=None, help="LR tile size; 0 = whole image.")
@click.option("--overlap", type=click.IntRange(min=0), default=None, help="LR pixels; default tile / 8.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Tiles per engine call.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default=None,
    help="Graph precision [the backend's best within the parity bars: OpenVINO bf16 per graph, else fp32].",
)
@click.option(
    "--backend",
    type=click.Choice((AUTO, *BACKENDS)),
    default=AUTO,
    show_default=True,
    help="auto: OpenVINO bf16 on CPUs with AVX512_BF16 or AMX, else onnxruntime; CUDA engines on cuda.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (onnxruntime, openvino)."
)
@click.option("--overwrite", is_flag=True, help="Redo outputs that already exist.")
@click.option("-v", "--verbose", is_flag=True, help="Say which backend and precisions were picked, and why.")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Refuse larger inputs (LR pixels).",
)
@click.option(
    "--no-cuda-graph", is_flag=True, help="On CUDA, run the sampler as stream execution, not graph replays."
)
@click.option(
    "--output-bits",
    type=click.Choice(OUTPUT_BITS),
    default="auto",
    show_default=True,
    help="Bits per sample written: auto keeps a 16-bit grayscale input 16-bit in PNG/TIFF; 16 writes "
    "grayscale as 16-bit (colour stays 8-bit: Pillow writes no 16-bit RGB).",
)
def main(
    engine_dir: Path | None, source: Path, target: Path, sampling: SamplingOptions,
    tile: int | None, overlap: int | None, batch: int | None, precision: str | None, backend: str,
    device: str, threads: int | None, overwrite: bool, verbose: bool, max_pixels: int, no_cuda_graph: bool,
    output_bits: str,
) -> None:  # fmt: skip
    """Upscale IN (an image or a folder of images) into OUT with an ESRDF bundle.

    Sampling flags not given come from the bundle's sampling defaults (its manifest's "sampling" section)."""
    jobs = plan_jobs(source, target)
    check_output_bits(jobs, output_bits)
    console = plain_console()
    options = sampling  # what it leaves out, Upscaler.sampling fills from the bundle
    todo = [job.target for job in jobs if overwrite or not job.target.exists()]
    try:
        with prepared_outputs(todo):  # every output folder made and probed before any compute
            upscaler = Upscaler(
                engine_dir or shipped_bundle_dir(), backend, device, precision, threads, tile, overlap, batch,
                cuda_graph=not no_cuda_graph,
            )  # fmt: skip
            upscaler.step_plan(options)  # bad sampling options fail once here, not once per image
            if verbose:
                for line in describe_choice(upscaler):
                    console.print(line)
            report = run_jobs(upscaler, jobs, options, overwrite, max_pixels, console, output_bits)
    except (RunSettingsError, OutputError) as exc:
        raise BadCommand(str(exc)) from None
    except (BundleError, EngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume (finished images are kept)")
        sys.exit(EXIT_INTERRUPTED)
    console.print(f"{report.done} upscaled, {report.skipped} already done, {report.failed} failed")
    if report.failed:
        sys.exit(EXIT_FAILED)
