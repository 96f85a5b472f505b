"""checkpoint -> bundle: export, clean up, convert to fp16, measure parity, write the manifest atomically.

The bundle format is ``esrdf.runtime.bundle`` (the reader owns it); this module only fills it in. The
bundle directory is built in a temp sibling and renamed into place by ``write_bundle_atomically``, so a
failed or interrupted export never leaves a half-written bundle at the target path.

Besides the ONNX graphs, a bundle carries the eager weights for the torch engine (the parity oracle and
the GPU path without TensorRT) as a checkpoint directory ``torch/`` (``config.json`` + ``model.safetensors``
with the U-Net weights export used, EMA when the checkpoint had them). The manifest's ``torch_weights``
names it with its sha256, which ``load_bundle`` checks like a graph's.

The manifest's ``sampling`` section records the model's sampling defaults: the export's ``sampling``
options, then the checkpoint's ``sampling.json``, then the built-in rule (DDIM, min(50, T) steps, eta 0,
and the matched prior, x_T ~ N(0, (1 - alpha_bar_T) I), which for alpha_bar_T > 0 is where training ended;
``prior="paper"`` records the paper's N(0, I)).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from esrdf.config import ModelConfig, SamplingOptions
from esrdf.runtime.bundle import (
    FORMAT_VERSION,
    BundleError,
    ExportSettings,
    GraphEntry,
    Manifest,
    SamplingEntry,
    ScheduleEntry,
    TensorEntry,
    WeightsEntry,
    sampling_entry,
    sha256_file,
    write_bundle_atomically,
    write_manifest,
)
from esrdf.runtime.graph_spec import GRAPH_ROLES, PREDICTOR, STEP, GraphSpec, TensorSpec, graph_spec

if TYPE_CHECKING:
    from torch import nn

    from esrdf.checkpoint import LoadedCheckpoint

PRECISION_CHOICES = ("fp32", "fp16", "both")
DEFAULT_TILE = 64  # LR pixels; HR tiles are scale * tile
DEFAULT_BATCH = 4
DEFAULT_OPSET = 18
PARITY_MAX_BATCH = 2  # parity figures are per pixel; two crops represent them at half the CPU time
TORCH_WEIGHTS_DIR = "torch"


class ExportError(RuntimeError):
    """The export cannot proceed as asked (bad options, unusable checkpoint, missed parity bar)."""


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "both"
    opset: int = DEFAULT_OPSET
    tile: int = DEFAULT_TILE
    batch: int = DEFAULT_BATCH
    parity_gate: bool = True
    torch_weights: bool = True
    save_eager_io: Path | None = None
    sampling: SamplingOptions = SamplingOptions()  # the export's flags; what they leave out: see the module

    @property
    def precisions(self) -> tuple[str, ...]:
        return ("fp32", "fp16") if self.precision == "both" else (self.precision,)


@dataclass
class Stages:
    """Per-stage progress on the console (rich), or silence; stage timings are kept either way."""

    enabled: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        from rich.console import Console

        console = Console(stderr=True)
        start = time.perf_counter()
        if self.enabled:
            with console.status(f"{name} ..."):
                yield
        else:
            yield
        self.timings[name] = time.perf_counter() - start
        if self.enabled:
            console.print(f"[green]done[/green] {name} ({self.timings[name]:.1f} s)")


def check_options(cfg: ModelConfig, options: ExportOptions) -> None:
    """Refuse options the graphs or the runtime cannot honour, with the fix in the message."""
    from esrdf.export.onnx_export import lr_multiple_of

    if options.precision not in PRECISION_CHOICES:
        raise ExportError(f"precision must be one of {PRECISION_CHOICES}, got {options.precision!r}")
    from esrdf.export.onnx_export import MAX_OPSET, MIN_OPSET

    if not MIN_OPSET <= options.opset <= MAX_OPSET:
        raise ExportError(
            f"opset must be in {MIN_OPSET}..{MAX_OPSET} (what torch.onnx's dynamo exporter "
            f"supports here), got {options.opset}"
        )
    if options.batch < 1:
        raise ExportError(f"batch must be >= 1, got {options.batch}")
    m = lr_multiple_of(cfg)
    if options.tile < 1 or options.tile % m:
        raise ExportError(
            f"tile must be a positive multiple of {m} for this model (scale {cfg.scale}, "
            f"U-Net multiple_of {cfg.unet.multiple_of}), got {options.tile}"
        )


def tensor_entries(spec: GraphSpec) -> tuple[list[TensorEntry], list[TensorEntry]]:
    def entries(tensors: tuple[TensorSpec, ...]) -> list[TensorEntry]:
        return [TensorEntry(name=t.name, dims=list(t.dims), dtype=t.dtype) for t in tensors]

    return entries(spec.inputs), entries(spec.outputs)


def graph_entry(root: Path, file: str, role: str, precision: str, channels: int) -> GraphEntry:
    model = onnx.load(str(root / file), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inputs, outputs = tensor_entries(graph_spec(role, channels))
    return GraphEntry(
        role=role,
        precision=precision,
        file=file,
        sha256=sha256_file(root / file),
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )


def _versions() -> dict[str, str | int]:
    import onnxconverter_common
    import onnxruntime
    import torch

    from esrdf import __version__

    return {
        "esrdf": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxconverter_common": onnxconverter_common.__version__,
        "exporter": "torch.onnx.export(dynamo=True)",
    }


def export_bundle(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    precision: str = "both",
    opset: int = DEFAULT_OPSET,
    tile: int = DEFAULT_TILE,
    batch: int = DEFAULT_BATCH,
    force: bool = False,
    progress: bool = True,
    parity_gate: bool = True,
    torch_weights: bool = True,
    save_eager_io: str | os.PathLike[str] | None = None,
    sampling: SamplingOptions | None = None,
) -> Path:
    """Export the checkpoint at ``ckpt_dir`` as a bundle at ``out_dir``; return the bundle path.

    ``precision`` picks the graphs ("fp32", "fp16" or "both"); ``tile``/``batch`` are the LR tile size and
    tiles per call the runtime defaults to (parity is measured there). A missed parity bar raises
    ``ParityError`` unless ``parity_gate=False`` (then the figures are still recorded). ``save_eager_io``
    writes polygraphy input/output files for each graph into that directory. ``sampling`` overrides the
    sampling defaults the manifest records (the seed is not one of them).
    """
    from esrdf.checkpoint import load_checkpoint, read_config, read_sampling_defaults

    options = ExportOptions(
        precision=precision,
        opset=opset,
        tile=tile,
        batch=batch,
        parity_gate=parity_gate,
        torch_weights=torch_weights,
        save_eager_io=Path(save_eager_io) if save_eager_io is not None else None,
        sampling=(sampling or SamplingOptions()).or_defaults(read_sampling_defaults(Path(ckpt_dir))),
    )
    stages = Stages(enabled=progress)
    target = Path(out_dir).absolute()
    cfg = read_config(Path(ckpt_dir))
    check_options(cfg, options)  # cheap checks before any work
    defaults = sampling_section(cfg, options.sampling)  # bad sampling flags fail here, before the export
    if target.exists() and not force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    with stages.stage("load checkpoint"):
        ckpt = load_checkpoint(Path(ckpt_dir))
    if ckpt.unet is None:
        raise ExportError(
            f"{ckpt_dir}: a predictor-only checkpoint (no unet.* weights); the bundle needs the "
            f"diffusion U-Net too: train the diffusion stage, then export"
        )

    write_bundle_atomically(
        target, lambda root: _build_bundle(root, ckpt, options, defaults, stages), force=force
    )
    return target


def sampling_section(cfg: ModelConfig, options: SamplingOptions) -> SamplingEntry:
    """The manifest's ``sampling`` section for ``cfg``'s schedule; ``ExportError`` for unusable options."""
    from esrdf.diffusion.schedule import make_schedule

    ab = np.asarray(make_schedule(cfg.schedule).alphas_cumprod, dtype=np.float64)
    schedule = ScheduleEntry(
        kind=cfg.schedule.kind, timesteps=cfg.schedule.timesteps, alphas_cumprod=ab.tolist()
    )
    try:
        return sampling_entry(schedule, options)
    except (BundleError, ValueError) as exc:
        raise ExportError(f"sampling defaults: {exc}") from exc


def _build_bundle(
    root: Path, ckpt: LoadedCheckpoint, options: ExportOptions, sampling: SamplingEntry, stages: Stages
) -> None:
    """Everything inside the temp bundle directory: graphs, parity, torch weights, manifest."""
    from esrdf.diffusion.schedule import make_schedule
    from esrdf.models.step_module import PredictorModule, StepModule

    assert ckpt.unet is not None
    cfg = ckpt.config
    modules: dict[str, nn.Module] = {
        PREDICTOR: PredictorModule(ckpt.predictor).eval(),
        STEP: StepModule.for_model(ckpt.unet, cfg).eval(),
    }
    files = _write_graphs(root, cfg, modules, options, stages)
    alphas_cumprod = np.asarray(make_schedule(cfg.schedule).alphas_cumprod, dtype=np.float64)
    with stages.stage("parity: eager vs onnxruntime"):
        parity, image_source = _measure_parity(root, files, cfg, modules, alphas_cumprod, options)
    provenance: dict[str, str | int] = {
        "unet_weights": str(ckpt.unet_weights),
        "opset": options.opset,
        "parity_image": image_source,
        "parity_batch": min(options.batch, PARITY_MAX_BATCH),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_versions(),
    }
    torch_weights = None
    if options.torch_weights:
        with stages.stage("write torch weights"):
            torch_weights = _write_torch_weights(root, ckpt)
    graphs = [
        graph_entry(root, file, role, prec, cfg.predictor.in_channels) for (role, prec), file in files.items()
    ]
    manifest = model_manifest(
        cfg,
        alphas_cumprod,
        graphs=graphs,
        export=ExportSettings(checkpoint=str(ckpt.path), tile=options.tile, batch=options.batch),
        parity=parity,
        torch_weights=torch_weights,
        provenance=provenance,
        sampling=sampling,
    )
    write_manifest(root, manifest)


def model_manifest(
    cfg: ModelConfig,
    alphas_cumprod: np.ndarray,
    graphs: list[GraphEntry],
    export: ExportSettings,
    **rest: Any,
) -> Manifest:
    """The manifest of ``cfg``'s model: what every bundle of it shares, plus ``graphs``, ``export`` and
    the optional fields in ``rest`` (parity, torch_weights, provenance, ...)."""
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name=cfg.name,
        scale=cfg.scale,
        channels=cfg.predictor.in_channels,
        hr_multiple_of=cfg.unet.multiple_of,
        value_range=[-1.0, 1.0],
        schedule=ScheduleEntry(
            kind=cfg.schedule.kind, timesteps=cfg.schedule.timesteps, alphas_cumprod=alphas_cumprod.tolist()
        ),
        graphs=graphs,
        export=export,
        model_config=cfg.to_dict(),
        **rest,
    )


def _write_graphs(
    root: Path, cfg: ModelConfig, modules: dict[str, nn.Module], options: ExportOptions, stages: Stages
) -> dict[tuple[str, str], str]:
    """Export each graph once in fp32, then write the requested precisions; {(role, precision): file}."""
    from esrdf.export.cleanup import cleanup_graph, save_graph
    from esrdf.export.fp16 import convert_to_mixed_fp16
    from esrdf.export.onnx_export import export_graph

    files: dict[tuple[str, str], str] = {}
    for role in GRAPH_ROLES:
        spec = graph_spec(role, cfg.predictor.in_channels)
        with stages.stage(f"export {role} graph (opset {options.opset})"):
            try:
                raw = export_graph(modules[role], role, cfg, opset=options.opset)
            except Exception as exc:  # the exporter raises many types; the CLI shows one line
                raise ExportError(f"torch.onnx could not export the {role} graph: {exc}") from exc
        for precision in options.precisions:
            model = onnx.ModelProto()
            model.CopyFrom(raw)
            file = f"{role}.onnx" if precision == "fp32" else f"{role}.fp16.onnx"
            what = "clean up" if precision == "fp32" else "mixed fp16 + clean up"
            with stages.stage(f"{what} -> {file}"):
                if precision == "fp16":
                    model = convert_to_mixed_fp16(model)
                save_graph(cleanup_graph(model, spec), root / file)
            files[(role, precision)] = file
    return files


def _measure_parity(
    root: Path,
    files: dict[tuple[str, str], str],
    cfg: ModelConfig,
    modules: dict[str, nn.Module],
    alphas_cumprod: np.ndarray,
    options: ExportOptions,
) -> tuple[dict[str, dict[str, float]], str]:
    """Figures per graph file against the eager fp32 modules; gate on the bars of docs/DESIGN.md section 4."""
    from esrdf.export.parity import (
        ParityError,
        bar_failures,
        bar_for,
        make_feeds,
        measure_graph,
        parity_photo,
        run_eager,
        save_polygraphy_io,
    )

    photo, source = parity_photo()
    batch = min(options.batch, PARITY_MAX_BATCH)
    feeds = make_feeds(
        modules[PREDICTOR], alphas_cumprod, photo, batch, options.tile, options.tile, cfg.scale
    )
    parity: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    for role in GRAPH_ROLES:
        eager = run_eager(modules[role], feeds[role])
        if options.save_eager_io is not None:
            save_polygraphy_io(
                options.save_eager_io, role, feeds[role], graph_spec(role).output_names[0], eager
            )
        for precision in options.precisions:
            figures = measure_graph(root / files[(role, precision)], feeds[role], eager)
            parity[f"{role}_{precision}"] = figures.as_manifest()
            failures += bar_failures(figures, bar_for(precision), f"{role} {precision}")
    if failures and options.parity_gate:
        raise ParityError(
            "exported graphs miss the parity bars (esrdf.runtime.tolerances): "
            + "; ".join(failures)
            + " (pass --no-parity-gate to write the bundle anyway)"
        )
    if failures:
        parity["gate"] = {"overridden_failures": float(len(failures))}
    return parity, source


def _write_torch_weights(root: Path, ckpt: LoadedCheckpoint) -> WeightsEntry:
    """The eager weights export used, as a checkpoint directory inside the bundle, for the torch engine."""
    from esrdf.checkpoint import MODEL_FILE, save_checkpoint

    save_checkpoint(root / TORCH_WEIGHTS_DIR, ckpt.config, ckpt.predictor, ckpt.unet)
    rel = f"{TORCH_WEIGHTS_DIR}/{MODEL_FILE}"
    return WeightsEntry(file=rel, sha256=sha256_file(root / rel))
