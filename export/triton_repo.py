"""A Triton Inference Server model repository from a bundle, for GPU fleets (``esrdf-export --triton-repo``).

    repo/
      esrdf_predictor/config.pbtxt   platform "tensorrt_plan" (or "onnxruntime_onnx" without plans)
      esrdf_predictor/1/model.plan   one plan per GPU model, chosen by compute capability (cc_model_filenames)
      esrdf_step/config.pbtxt        the U-Net with the sampler update folded in (runtime/graph_spec.py)
      esrdf_step/1/model.plan
      esrdf/config.pbtxt             Python backend (BLS): the whole-image model clients call
      esrdf/1/model.py               esrdf.runtime.serving.triton_bls.model: tiles, predictor + N step calls
      esrdf/1/manifest.json          the bundle's manifest: the schedule the step coefficients come from

The BLS model runs the runtime's own driver (esrdf.runtime.driver.upscale_array) with an engine whose
``predictor``/``step`` are BLS requests to the two models, so the sampler loop, noise and tiling are the
ones the in-process runtime uses. Each BLS instance serves one image at a time; the step model's dynamic
batcher merges the step calls of all instances (tile batches of different requests, same shapes).
``esrdf`` has the same I/O as the model ``esrdf-serve`` binds (``esrdf.runtime.serving.triton_models``),
so one client works against both.

TensorRT plans are GPU- and TensorRT-version-specific: build them (``esrdf-export --trt``, on each GPU
model of the fleet, with the TensorRT version of the Triton container) before writing the repository.
Where the bundle has no plans (a CPU machine), the graphs are written as ``onnxruntime_onnx`` models
instead, and ``TritonRepo.notes`` says so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from esrdf.atomic import atomic_dir, link_or_copy
from esrdf.runtime.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleError,
    EngineEntry,
    check_replaceable,
    load_bundle,
)
from esrdf.runtime.graph_spec import PREDICTOR, STEP, GraphSpec, graph_spec

PREDICTOR_MODEL = "esrdf_predictor"
STEP_MODEL = "esrdf_step"
BLS_MODEL = "esrdf"
MARKER = ".esrdf-triton-repo"  # marks a directory this module wrote (what --force may replace)
DEFAULT_BLS_INSTANCES = 4


class Ident(str):
    """A protobuf enum value: written bare in text format (``KIND_GPU``), not quoted."""


@dataclass(frozen=True)
class TritonRepoOptions:
    tile: int | None = None  # LR tile; default: the plans' profile, else the bundle's export tile
    overlap: int | None = None  # default tile / 8, as the runtime
    batch: int | None = None  # most tiles per engine call; default: the plans' profile, else the export batch
    precision: str = "fp32"  # of the ONNX graphs, when no plans are used
    gpu_instances: int = 1  # engine instances per GPU
    bls_instances: int = DEFAULT_BLS_INSTANCES  # images in flight
    queue_delay_us: int = 500  # dynamic batcher delay of the predictor and step models
    use_plans: bool = True  # False writes onnxruntime_onnx models even where plans exist


@dataclass(frozen=True)
class TritonRepo:
    path: Path
    platform: str  # "tensorrt_plan" | "onnxruntime_onnx"
    notes: list[str] = field(default_factory=list)


def pbtxt(message: Mapping[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a nested dict (dict = message, list = repeated, ``Ident`` = enum value).

    Hand-written, not ``google.protobuf.text_format`` over ``model_config_pb2``, so that exporting needs
    neither tritonclient nor protobuf; tests/test_triton_repo.py parses every file with the real
    ``model_config.proto`` to keep this honest.
    """
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping):
                lines += [f"{pad}{key} {{", pbtxt(item, indent + 1), f"{pad}}}"]
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    return "\n".join(line for line in lines if line)


def _scalar(value: object) -> str:
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a quoted string with JSON escapes, which text format accepts


def _tensor(
    name: str, dims: Sequence[int], reshape: Sequence[int] | None = None, optional: bool = False
) -> dict:
    entry: dict[str, Any] = {"name": name, "data_type": Ident("TYPE_FP32"), "dims": list(dims)}
    if reshape is not None:
        entry["reshape"] = {"shape": list(reshape)}  # an empty list writes "reshape { }": a scalar per row
    if optional:
        entry["optional"] = True
    return entry


def _graph_io(spec: GraphSpec, sizes: dict[str, int], batched: bool) -> tuple[list[dict], list[dict]]:
    """Triton inputs/outputs of one graph. ``sizes`` maps named axes to ints (-1 for dynamic ones).

    A batched config leaves the batch axis out; ``t`` (shape [batch]) then has no dims left, so it is
    declared as [1] and reshaped to a scalar per row, Triton's way of batching a per-row scalar.
    """

    def convert(tensors: Sequence[Any]) -> list[dict]:
        out = []
        for t in tensors:
            dims = [sizes[d] if isinstance(d, str) else d for d in t.dims]
            if batched:
                dims = dims[1:]
            out.append(_tensor(t.name, dims or [1], reshape=[] if not dims else None))
        return out

    return convert(spec.inputs), convert(spec.outputs)


def _engine_config(name: str, platform: str, spec: GraphSpec, sizes: dict[str, int], max_batch: int,
                   options: TritonRepoOptions, files: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    batched = max_batch > 0
    inputs, outputs = _graph_io(spec, sizes, batched)
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    config: dict[str, Any] = {
        "name": name, "platform": platform, "max_batch_size": max_batch, "input": inputs, "output": outputs,
        "instance_group": [{"kind": Ident(kind), "count": options.gpu_instances}],
    }  # fmt: skip
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.queue_delay_us}
    if len(files) > 1:
        config["cc_model_filenames"] = [{"key": cc, "value": f} for cc, f in sorted(files.items())]
    else:
        config["default_model_filename"] = next(iter(files.values()))
    return config


def _pick_plans(bundle: Bundle, notes: list[str]) -> dict[str, list[EngineEntry]] | None:
    """fp16 plans per role sharing one profile (one config.pbtxt), one per compute capability; None if none.

    A dynamic-batch profile is preferred: only that lets Triton's dynamic batcher merge requests.
    """
    plans = [e for e in bundle.manifest.engines if e.precision == "fp16"]
    if not plans:
        return None
    profiles = {json.dumps(e.key.profile, sort_keys=True) for e in plans}

    def batch_range(p: str) -> int:
        key = json.loads(p)
        return int(key["max"]["batch"] - key["min"]["batch"])

    chosen = max(sorted(profiles), key=batch_range)
    if len(profiles) > 1:
        notes.append(f"the bundle's plans have {len(profiles)} profiles; wrote those with profile {chosen}")
    picked: dict[str, list[EngineEntry]] = {}
    for role in (PREDICTOR, STEP):
        by_cc: dict[str, EngineEntry] = {}
        for e in plans:
            if e.role == role and json.dumps(e.key.profile, sort_keys=True) == chosen:
                if e.key.compute_capability in by_cc:
                    notes.append(
                        f"{role}: several plans for SM {e.key.compute_capability}; kept {e.key.gpu_name}'s"
                    )
                by_cc[e.key.compute_capability] = e
        if not by_cc:
            raise BundleError(
                f"{bundle.root}: TensorRT plans for profile {chosen} lack a {role} plan; rebuild both"
            )
        picked[role] = list(by_cc.values())
    return picked


def _plan_models(
    bundle: Bundle, plans: dict[str, list[EngineEntry]], options: TritonRepoOptions, out: Path
) -> dict[str, Any]:
    """Write the two tensorrt_plan models; returns the tile settings the BLS model must use."""
    profile = plans[PREDICTOR][0].key.profile
    lo, hi = profile["min"], profile["max"]
    dynamic_batch = lo["batch"] != hi["batch"]
    tile = options.tile or hi["lr_height"]
    if not lo["lr_height"] <= tile <= hi["lr_height"]:
        raise BundleError(f"tile {tile} is outside the plans' profile ({lo['lr_height']}..{hi['lr_height']})")
    sizes = {axis: (-1 if lo[axis] != hi[axis] else hi[axis]) for axis in hi}
    batch = min(options.batch or hi["batch"], hi["batch"])
    for role, name in ((PREDICTOR, PREDICTOR_MODEL), (STEP, STEP_MODEL)):
        files = {}
        for e in plans[role]:
            file = f"model.sm{e.key.compute_capability.replace('.', '')}.plan"
            link_or_copy(bundle.root / e.file, out / name / "1" / file)
            files[e.key.compute_capability] = file
        max_batch = hi["batch"] if dynamic_batch else 0
        config = _engine_config(name, "tensorrt_plan", graph_spec(role, bundle.manifest.channels), sizes,
                                max_batch, options, files)  # fmt: skip
        _write_config(out / name, config)
    return {"tile": tile, "batch": batch if dynamic_batch else hi["batch"], "pad_batch": not dynamic_batch,
            "batched": dynamic_batch}  # fmt: skip


def _onnx_models(bundle: Bundle, options: TritonRepoOptions, out: Path) -> dict[str, Any]:
    """Write the two graphs as onnxruntime_onnx models with dynamic batch and tile axes."""
    tile = options.tile or bundle.manifest.export.tile
    batch = options.batch or bundle.manifest.export.batch
    sizes = {"batch": -1, "lr_height": -1, "lr_width": -1, "height": -1, "width": -1}
    for role, name in ((PREDICTOR, PREDICTOR_MODEL), (STEP, STEP_MODEL)):
        link_or_copy(bundle.graph_path(role, options.precision), out / name / "1" / "model.onnx")
        # Room for every BLS instance's tile batch in one execution: that is what the batcher merges.
        config = _engine_config(name, "onnxruntime_onnx", graph_spec(role, bundle.manifest.channels), sizes,
                                batch * options.bls_instances, options, {"": "model.onnx"})  # fmt: skip
        _write_config(out / name, config)
    return {"tile": tile, "batch": batch, "pad_batch": False, "batched": True}


def bls_config(settings: Mapping[str, Any], options: TritonRepoOptions) -> dict[str, Any]:
    """The Python-backend model: whole images in and out (the same I/O as esrdf-serve's ``esrdf``)."""
    scalars = [
        ("seed", "TYPE_UINT64"),
        ("steps", "TYPE_INT32"),
        ("sampler", "TYPE_STRING"),
        ("eta", "TYPE_FP32"),
        ("prior", "TYPE_STRING"),
    ]
    optional = [{"name": n, "data_type": Ident(t), "dims": [1], "optional": True} for n, t in scalars]
    image = {"name": "image", "data_type": Ident("TYPE_UINT8"), "dims": [-1, -1, 3]}
    params = {**settings, "predictor_model": PREDICTOR_MODEL, "step_model": STEP_MODEL}
    return {
        "name": BLS_MODEL, "backend": "python", "max_batch_size": 0,
        "input": [image, *optional],
        "output": [dict(image)],
        "instance_group": [{"kind": Ident("KIND_CPU"), "count": options.bls_instances}],
        "parameters": [{"key": k, "value": {"string_value": _param(v)}} for k, v in sorted(params.items())],
    }  # fmt: skip


def _param(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _write_config(model_dir: Path, config: Mapping[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(pbtxt(config) + "\n", encoding="utf-8")


def bls_model_source() -> str:
    """The text of the BLS ``model.py`` (package data: ``esrdf.runtime.serving.triton_bls``)."""
    package = resources.files("esrdf.runtime.serving.triton_bls")
    return package.joinpath("model.py").read_text(encoding="utf-8")


def _build(bundle: Bundle, options: TritonRepoOptions, out: Path) -> TritonRepo:
    notes: list[str] = []
    plans = _pick_plans(bundle, notes) if options.use_plans else None
    if plans is None:
        notes.append(
            "no TensorRT plans in the bundle (build them with esrdf-export --trt on each GPU model): wrote "
            f"{options.precision} ONNX graphs as onnxruntime_onnx models, which Triton runs on CPU instances"
        )
        settings = _onnx_models(bundle, options, out)
    else:
        settings = _plan_models(bundle, plans, options, out)
    if settings["tile"] % bundle.manifest.lr_multiple_of:
        raise BundleError(f"tile {settings['tile']} is not a multiple of {bundle.manifest.lr_multiple_of}")
    tile = settings["tile"]
    settings["overlap"] = tile // 8 if options.overlap is None else options.overlap
    if not 0 <= settings["overlap"] < tile:
        raise BundleError(f"overlap must be in [0, tile={tile}), got {settings['overlap']}")
    _write_config(out / BLS_MODEL, bls_config(settings, options))
    (out / BLS_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (out / BLS_MODEL / "1" / "model.py").write_text(bls_model_source(), encoding="utf-8")
    shutil.copy2(bundle.root / MANIFEST_NAME, out / BLS_MODEL / "1" / MANIFEST_NAME)
    (out / MARKER).write_text(
        json.dumps({"bundle": str(bundle.root), **settings}, indent=2) + "\n", encoding="utf-8"
    )
    return TritonRepo(out, "onnxruntime_onnx" if plans is None else "tensorrt_plan", notes)


def write_triton_repo(
    bundle_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: TritonRepoOptions | None = None,
    force: bool = False,
) -> TritonRepo:
    """Write the repository atomically (a temp dir next to ``out_dir``, then rename), like a bundle.

    An existing ``out_dir`` is replaced only with ``force``, and only if it is a repository this function
    wrote or an empty directory.
    """
    bundle = load_bundle(bundle_dir)
    target = Path(out_dir).absolute()
    check_replaceable(target, force, MARKER, "an ESRDF Triton repository")
    with atomic_dir(target) as tmp:
        repo = _build(bundle, options or TritonRepoOptions(), tmp)
    return TritonRepo(target, repo.platform, repo.notes)
