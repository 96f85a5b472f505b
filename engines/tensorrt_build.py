"""Build fp16 TensorRT engines from a bundle's mixed-precision ONNX graphs.

See docs/DESIGN.md section 1, "Two graphs".

Precision is decided in the ONNX: the fp16 graphs keep norms, softmax and the sampler update in fp32 (the
step graph computes paper Eq. 5-7 with the update folded in). TensorRT therefore builds them *strongly
typed*: it honours the graph's types instead of choosing its own. That is the only mode of TensorRT 11 and
works from TensorRT 10, so no precision builder flag (BuilderFlag.FP16 is gone in 11) is ever set. One flag is
cleared: TF32, on by default, would let fp32 plans run fp32 convolutions and matmuls in TF32, which this
project measured (on cuDNN, the same arithmetic) to move the step output ~10x past the fp32 bar.

Plans are keyed by the TensorRT version as MAJOR.MINOR.PATCH (``version_key``; the C++ runtime builds the
same string from the headers' NV_TENSORRT_MAJOR/MINOR/PATCH): the build number is not part of the key, and
older manifests' 4-part keys compare by their first three parts.

Each plan is saved with an ``EngineKey`` (TensorRT version, GPU name, SM, profile, precision, ONNX sha256)
in the manifest; ``esrdf.engines.tensorrt_engine`` refuses a plan whose key does not match the machine.
The timing cache is optional and keyed by GPU name + SM + TensorRT version, so it is never shared across
GPU models (vs-mlrt keys its caches the same way; NVIDIA/TensorRT #2874 shows what path-keyed caches do).
A cache TensorRT rejects (corrupt, or from another build) is replaced: that build runs with a fresh cache,
says so, and writes the fresh one.

Adding plans to a bundle takes a lock beside the bundle (``esrdf.atomic.file_lock``) and re-reads the
manifest under it, so two builds running at once (say, two buckets) keep each other's rows.

tensorrt and torch are imported inside the functions: this module imports on any machine, and
``tensorrt_unavailable_reason()`` says why the build cannot run here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from esrdf.atomic import atomic_path, file_lock, link_or_copy
from esrdf.runtime.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleError,
    EngineEntry,
    EngineKey,
    Manifest,
    load_bundle,
    write_bundle_atomically,
    write_manifest,
)
from esrdf.runtime.graph_spec import GRAPH_ROLES, GraphSpec, ShapeProfile, graph_spec

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

DEFAULT_OPT_LEVEL = 3  # TensorRT's own default; 0..5 trades build time for kernel search
# The module is runnable (``python -m``) so the rebuild hint names a command that exists whatever CLI wiring
# the export tool has.
REBUILD_MODULE = "esrdf.engines.tensorrt_build"


class TensorRTUnavailable(RuntimeError):
    """tensorrt or a CUDA device is missing; the message says which."""


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT engines can be built and run here, else one sentence saying why not."""
    try:
        import tensorrt
    except ImportError:
        return (
            "tensorrt is not installed: install TensorRT 10 or 11 for your CUDA version from NVIDIA's "
            "own package index"
        )
    if not hasattr(tensorrt, "Builder"):
        # tensorrt-stubs installs an importable ``tensorrt`` namespace package that holds only .pyi files.
        return "only the type stubs of tensorrt (tensorrt-stubs) are installed, not TensorRT itself"
    try:
        import torch
    except ImportError:
        return "torch is not installed; the TensorRT path allocates its CUDA buffers with torch"
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def require_tensorrt() -> None:
    """Raise ``TensorRTUnavailable`` with the reason unless tensorrt and a CUDA device are usable here."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(reason)


@functools.cache
def trt_logger() -> trt.ILogger:
    """One TensorRT logger per process: builder and runtime keep a reference to it for their lifetime."""
    require_tensorrt()
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def version_key(version: str) -> str:
    """A TensorRT version as a plan key: MAJOR.MINOR.PATCH (``"10.13.3.9"`` -> ``"10.13.3"``).

    The same format as the C++ runtime's ``tensorrt_version_key`` (runtime/cpp/src/engine_keys.h).
    """
    parts = version.strip().split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise ValueError(f"not a TensorRT version (MAJOR.MINOR.PATCH[.BUILD]): {version!r}")
    return ".".join(parts[:3])


@dataclass(frozen=True)
class MachineIdentity:
    """The parts of an ``EngineKey`` that the running machine determines."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor"

    @property
    def slug(self) -> str:
        """File-name-safe GPU + SM + TensorRT tag, e.g. ``nvidia-h100-80gb-hbm3-sm90-trt10.13.0``."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        return f"{gpu}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt_version}"


def machine_identity(device_index: int | None = None) -> MachineIdentity:
    """TensorRT version, GPU name and SM of the current (or given) CUDA device."""
    require_tensorrt()
    import tensorrt as trt
    import torch

    index = torch.cuda.current_device() if device_index is None else device_index
    props = torch.cuda.get_device_properties(index)
    return MachineIdentity(
        tensorrt_version=version_key(str(trt.__version__)),
        gpu_name=str(props.name),
        compute_capability=f"{props.major}.{props.minor}",
    )


def shape_profile(manifest: Manifest, tile: int, batch: int, dynamic: bool = False) -> ShapeProfile:
    """The optimisation profile of one tile/batch bucket: static (min = opt = max) unless ``dynamic``.

    A dynamic profile spans batch 1..``batch`` and LR tiles from the smallest legal size up to ``tile``.
    """
    if tile <= 0 or tile % manifest.lr_multiple_of:
        raise ValueError(
            f"tile must be a positive multiple of {manifest.lr_multiple_of} "
            f"(the U-Net's size requirement at scale {manifest.scale}), got {tile}"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dynamic:
        return ShapeProfile.dynamic(
            max_batch=batch, tile=tile, scale=manifest.scale, min_tile=manifest.lr_multiple_of
        )
    return ShapeProfile.static(batch, tile, manifest.scale)


def profile_key(profile: ShapeProfile) -> dict[str, dict[str, int]]:
    """ShapeProfile -> the manifest's ``EngineKey.profile`` form."""
    return {"min": dict(profile.min), "opt": dict(profile.opt), "max": dict(profile.max)}


def profile_from_key(key: EngineKey) -> ShapeProfile:
    return ShapeProfile(
        min=dict(key.profile["min"]), opt=dict(key.profile["opt"]), max=dict(key.profile["max"])
    )


def rebuild_command(bundle_dir: str | os.PathLike[str], profile: ShapeProfile) -> str:
    """The one command that rebuilds the engines of ``profile`` for this machine."""
    static = profile.min == profile.max
    tile, batch = profile.max["lr_height"], profile.max["batch"]
    return f"python -m {REBUILD_MODULE} {bundle_dir} --tile {tile} --batch {batch}" + (
        "" if static else " --dynamic"
    )


def timing_cache_path(cache_dir: str | os.PathLike[str], identity: MachineIdentity) -> Path:
    """One cache file per GPU model + SM + TensorRT version: a cache never crosses GPU models."""
    return Path(cache_dir) / f"esrdf-timing-{identity.slug}.cache"


def clear_tf32_for_fp32(config: trt.IBuilderConfig, precision: str) -> bool:
    """fp32 plans are IEEE fp32: clear BuilderFlag.TF32 (TensorRT's default is on). True if cleared."""
    import tensorrt as trt

    if precision != "fp32":
        return False
    config.clear_flag(trt.BuilderFlag.TF32)
    return True


def attach_timing_cache(config: trt.IBuilderConfig, timing_cache: Path) -> bool:
    """Give the build the cache file's contents; if TensorRT rejects them, a fresh cache. True: accepted.

    ``set_timing_cache`` returns False for a cache it will not use, and ``get_timing_cache`` would then be
    None after the build: without a fresh cache a finished build would crash and lose its plan.
    """
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    # ignore_mismatch=False: TensorRT itself also refuses a cache from another device.
    if config.set_timing_cache(config.create_timing_cache(blob), False):
        return True
    log.warning("TensorRT rejected the timing cache %s; building with a fresh one instead", timing_cache)
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise RuntimeError("TensorRT refused even a fresh timing cache")
    return False


def save_timing_cache(config: trt.IBuilderConfig, timing_cache: Path) -> bool:
    """Write the build's timing cache atomically; False (logged) when TensorRT has none to give."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache after the build; %s is left as it was", timing_cache)
        return False
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(timing_cache, suffix=".tmp") as tmp:
        tmp.write_bytes(bytes(cache.serialize()))
    return True


def build_serialized_engine(
    onnx_path: Path,
    spec: GraphSpec,
    profile: ShapeProfile,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache: Path | None = None,
    precision: str = "fp16",
) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a plan with one optimisation profile."""
    require_tensorrt()
    import tensorrt as trt

    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    clear_tf32_for_fp32(config, precision)
    trt_profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        shapes = [trt.Dims(list(tensor.shape(sizes))) for sizes in (profile.min, profile.opt, profile.max)]
        trt_profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(trt_profile)
    if timing_cache is not None:
        attach_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)
    return bytes(serialized)


@dataclass(frozen=True)
class BuiltPlan:
    entry: EngineEntry
    plan: bytes


def plan_file_name(role: str, precision: str, profile: ShapeProfile, identity: MachineIdentity) -> str:
    """Unique per (role, precision, bucket, machine), so engines for several GPUs or buckets coexist."""
    lo, hi = profile.min, profile.max
    if lo == hi:
        bucket = f"b{hi['batch']}-t{hi['lr_height']}"
    else:
        bucket = f"b{lo['batch']}-{hi['batch']}-t{lo['lr_height']}-{hi['lr_height']}"
    return f"{role}.{precision}.{bucket}.{identity.slug}.plan"


def build_role(
    bundle: Bundle,
    role: str,
    precision: str,
    profile: ShapeProfile,
    identity: MachineIdentity,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache: Path | None = None,
) -> BuiltPlan:
    """Build one graph's plan and the manifest row that keys it."""
    graph = bundle.manifest.graph(role, precision)
    onnx_path = bundle.graph_path(role, precision)  # raises with a re-export hint when missing
    assert graph is not None
    spec = graph_spec(role, bundle.manifest.channels)
    plan = build_serialized_engine(onnx_path, spec, profile, opt_level, timing_cache, graph.precision)
    key = EngineKey(
        tensorrt_version=identity.tensorrt_version,
        gpu_name=identity.gpu_name,
        compute_capability=identity.compute_capability,
        precision=graph.precision,
        profile=profile_key(profile),
        onnx_sha256=graph.sha256,
    )
    file = plan_file_name(role, precision, profile, identity)
    entry = EngineEntry(
        role=graph.role,
        precision=graph.precision,
        file=file,
        sha256=hashlib.sha256(plan).hexdigest(),
        key=key,
    )
    return BuiltPlan(entry=entry, plan=plan)


def _supersedes(new: EngineEntry, old: EngineEntry) -> bool:
    """A new plan replaces an old one for the same role, precision, bucket and GPU model."""
    return (new.role, new.precision, new.key.profile, new.key.gpu_name, new.key.compute_capability) == (
        old.role,
        old.precision,
        old.key.profile,
        old.key.gpu_name,
        old.key.compute_capability,
    )


def add_plans_to_bundle(bundle: Bundle, built: Sequence[BuiltPlan]) -> Manifest:
    """Write ``built`` plans and their manifest rows into the bundle, atomically (temp dir, then rename).

    Under the bundle's lock the manifest is read again, so rows another build added since ``bundle`` was
    loaded are kept (only rows these plans supersede are dropped).
    """
    with file_lock(bundle.root):
        current = load_bundle(bundle.root, verify=False)  # the plans' sha256s are checked on publishing
        new_entries = [b.entry for b in built]
        kept = [e for e in current.manifest.engines if not any(_supersedes(n, e) for n in new_entries)]
        dropped = {e.file for e in current.manifest.engines} - {e.file for e in kept}
        manifest = dataclasses.replace(current.manifest, engines=[*kept, *new_entries])
        new_files = {b.entry.file: b.plan for b in built}

        def build_fn(tmp: Path) -> Manifest:
            for src in sorted(current.root.rglob("*")):
                rel = src.relative_to(current.root)
                skip = str(rel) in dropped or str(rel) in new_files or rel.name == MANIFEST_NAME
                if src.is_file() and not skip:
                    link_or_copy(src, tmp / rel)  # unchanged files: graphs are hundreds of MB
            for name, plan in new_files.items():
                (tmp / name).write_bytes(plan)
            write_manifest(tmp, manifest)
            return manifest

        return write_bundle_atomically(current.root, build_fn, force=True)


def build_engines_into_bundle(
    bundle_dir: str | os.PathLike[str],
    tile: int,
    batch: int,
    dynamic: bool = False,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache_dir: str | os.PathLike[str] | None = None,
    precision: str = "fp16",
    roles: Sequence[str] = GRAPH_ROLES,
    progress: Callable[[str], None] | None = None,
) -> list[EngineEntry]:
    """Build TensorRT plans for ``roles`` of a bundle and add them (and their EngineKeys) to its manifest.

    ``tile`` is the LR tile size and ``batch`` the tile batch (the maximum batch when ``dynamic``). Plans for
    the same role, precision, bucket and GPU model are replaced; others are kept. Raises
    ``TensorRTUnavailable`` (with the reason) where tensorrt or CUDA is missing.
    """
    require_tensorrt()
    bundle = load_bundle(bundle_dir, verify=True)
    identity = machine_identity()
    profile = shape_profile(bundle.manifest, tile, batch, dynamic)
    cache = None if timing_cache_dir is None else timing_cache_path(timing_cache_dir, identity)
    built = []
    for role in roles:
        if progress is not None:
            progress(
                f"building {precision} TensorRT engine for {role} ({identity.gpu_name}, "
                f"tile {tile}, batch {batch}{', dynamic' if dynamic else ''}, opt level {opt_level})"
            )
        built.append(build_role(bundle, role, precision, profile, identity, opt_level, cache))
    add_plans_to_bundle(bundle, built)
    return [b.entry for b in built]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tile", type=int, required=True, help="LR tile size of the engine's profile.")
@click.option("--batch", type=int, default=1, show_default=True, help="Tile batch (max batch if --dynamic).")
@click.option("--dynamic", is_flag=True, help="One dynamic profile (batch 1..N, small tiles up to --tile).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=DEFAULT_OPT_LEVEL, show_default=True)
@click.option(
    "--timing-cache",
    "timing_cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of timing caches (one per GPU model, SM and TensorRT version).",
)
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True)
def main(
    bundle_dir: Path,
    tile: int,
    batch: int,
    dynamic: bool,
    opt_level: int,
    timing_cache_dir: Path | None,
    precision: str,
) -> None:
    """Build TensorRT engines for BUNDLE_DIR on this machine and record them in its manifest."""
    try:
        entries = build_engines_into_bundle(
            bundle_dir, tile, batch, dynamic, opt_level, timing_cache_dir, precision, progress=click.echo
        )
    except (TensorRTUnavailable, BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for e in entries:
        click.echo(f"wrote {bundle_dir / e.file}")


if __name__ == "__main__":
    main()
