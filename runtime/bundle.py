"""The bundle: a directory of exported graphs described by ``manifest.json`` (docs/DESIGN.md section 3).

The runtime defines the format and reads it; ``esrdf.export`` writes it with ``write_bundle_atomically``.
Layout::

    bundle/
      manifest.json         Manifest.to_json()
      predictor.onnx        (file names are free; each GraphEntry names its file)
      step.onnx
      predictor.fp16.onnx   optional fp16 variants
      step.fp16.onnx
      *.plan                TensorRT engines, keyed by EngineKey
      torch/                optional: the eager weights (config.json + model.safetensors) for the torch engine

The manifest carries everything the runtime needs without importing the training code: scale, size
requirements, the noise schedule (alphas_cumprod in float64; paper Eq. 1-3), each graph's file, sha256 and
I/O contract, engine keys, and the parity figures export measured against the eager model. Everything a
reader uses is a typed field: ``export`` (the checkpoint it came from, quoted in re-export hints; the LR
tile and tile batch export measured at, the run-time defaults) and ``torch_weights`` (file and sha256,
checked by ``load_bundle`` like the graphs). ``provenance`` is free-form (tool versions, export time, ...)
and nothing reads it.

``sampling`` holds the model's sampling defaults (sampler, steps, eta, the x_T prior and its std), what every
consumer runs when its caller gives nothing. It was added within format version 2: a manifest without it
still loads, runs the built-in defaults of ``esrdf.config.SamplingOptions.resolve`` (DDIM, min(50, T)
steps, eta 0, the matched prior), and ``load_bundle`` logs one line saying so, with the re-export command.
Why the matched prior is the default: docs/DESIGN.md section 7, and README "Sampling defaults and the prior".

Format version 2 (this one) typed what version 1 kept in a free ``export_info`` dict; a version-1 bundle is
refused with the command that re-exports it.

JSON floats: Python writes the shortest repr that round-trips, so float64 schedule values reload bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from esrdf.atomic import atomic_dir
from esrdf.config import (
    ADDED_LATER,
    ConfigError,
    ModelConfig,
    Prior,
    Sampler,
    SamplingOptions,
    strict_from_dict,
    to_jsonable,
)
from esrdf.runtime.graph_spec import GRAPH_ROLES, graph_spec
from esrdf.runtime.sampling import init_noise_std

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"

Role = Literal["predictor", "step"]
Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")

T = TypeVar("T")
log = logging.getLogger(__name__)


class BundleError(RuntimeError):
    """A bundle that cannot be used as it stands: missing, tampered, stale, or from another format version."""


@dataclass(frozen=True)
class TensorEntry:
    """One graph input or output: ints are fixed axes, strings are named dynamic axes."""

    name: str
    dims: list[int | str]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Accept graph_spec's tuples; store lists so a JSON round trip compares equal.
        object.__setattr__(self, "dims", list(self.dims))


@dataclass(frozen=True)
class GraphEntry:
    role: Role
    precision: Precision
    file: str  # relative to the bundle root
    sha256: str
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    opset: int


@dataclass(frozen=True)
class EngineKey:
    """What a TensorRT plan depends on; a plan whose key differs from the running system is refused."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    precision: Precision
    profile: dict[str, dict[str, int]]  # {"min"|"opt"|"max": {axis name: size}}
    onnx_sha256: str


@dataclass(frozen=True)
class EngineEntry:
    role: Role
    precision: Precision
    file: str
    sha256: str
    key: EngineKey


@dataclass(frozen=True)
class ScheduleEntry:
    """The forward-process schedule (paper Eq. 1-3): alphas_cumprod[t] for t = 0..T-1, float64 values."""

    kind: str
    timesteps: int
    alphas_cumprod: list[float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas_cumprod", [float(a) for a in self.alphas_cumprod])
        ab = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ab.shape != (self.timesteps,):
            raise BundleError(f"schedule: {ab.size} alphas_cumprod values for {self.timesteps} timesteps")
        if not (np.all(ab >= 0.0) and np.all(ab <= 1.0) and np.all(np.diff(ab) <= 0.0)):
            raise BundleError("schedule: alphas_cumprod must be non-increasing values in [0, 1]")

    def array(self) -> np.ndarray:
        """alphas_cumprod as float64, shape (T,)."""
        return np.asarray(self.alphas_cumprod, dtype=np.float64)


@dataclass(frozen=True)
class ExportSettings:
    """How the bundle was exported, as far as the runtime reads it."""

    checkpoint: str  # the checkpoint directory exported; re-export hints quote it
    tile: int  # LR tile size export measured parity at; the runtime's default tile
    batch: int  # tiles per engine call export targeted; the runtime's default batch


@dataclass(frozen=True)
class WeightsEntry:
    """A file of eager weights in the bundle (``torch/model.safetensors``), hash-checked like a graph."""

    file: str  # relative to the bundle root
    sha256: str


@dataclass(frozen=True)
class SamplingEntry:
    """The model's sampling defaults: what Upscaler, services, the CLIs and the C++ runtime run when their
    caller leaves a field out. ``init_noise_std`` is the std of x_T under ``prior`` for this schedule
    (``esrdf.runtime.sampling.init_noise_std``: 1 for "paper", sqrt(1 - alpha_bar_{T-1}) for "matched");
    it is written out for readers that do not derive it, and checked against the schedule on load."""

    sampler: Sampler
    steps: int
    eta: float
    prior: Prior
    init_noise_std: float

    def options(self) -> SamplingOptions:
        """These defaults as options (no seed: a request's seed is its own, 0 when not given)."""
        return SamplingOptions(sampler=self.sampler, steps=self.steps, eta=self.eta, prior=self.prior)


def sampling_entry(schedule: ScheduleEntry, options: SamplingOptions) -> SamplingEntry:
    """The ``sampling`` section for ``options`` on ``schedule``: what they leave out filled by the built-in
    rule (``SamplingOptions.resolve``), and the x_T std of their prior."""
    s = options.resolve(schedule.timesteps)
    entry = SamplingEntry(s.sampler, s.steps, s.eta, s.prior, init_noise_std(schedule.array(), s.prior))  # type: ignore[arg-type]
    _check_sampling(entry, schedule)
    return entry


def _check_sampling(entry: SamplingEntry, schedule: ScheduleEntry) -> None:
    """A sampling section the schedule can run, whose x_T std is its prior's; ``BundleError`` otherwise."""
    t = schedule.timesteps
    if entry.sampler == "ddpm" and entry.steps != t:
        raise BundleError(f"sampling: ddpm runs all T={t} steps, the section says steps={entry.steps}")
    if not 1 <= entry.steps <= t:
        raise BundleError(f"sampling: steps must be in 1..{t} (the schedule's T), got {entry.steps}")
    if not 0.0 <= entry.eta <= 1.0:
        raise BundleError(f"sampling: eta must be in [0, 1], got {entry.eta}")
    expected = init_noise_std(schedule.array(), entry.prior)
    if not math.isclose(entry.init_noise_std, expected, rel_tol=1e-12):
        raise BundleError(
            f"sampling: init_noise_std {entry.init_noise_std!r} is not the {entry.prior} prior's "
            f"{expected!r} for this schedule"
        )


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model_name: str
    scale: int
    channels: int
    hr_multiple_of: int  # HR tile height and width must be divisible by this (the U-Net's downsampling)
    value_range: list[float]  # [-1.0, 1.0]: images enter and leave the graphs in this range
    schedule: ScheduleEntry
    graphs: list[GraphEntry]
    export: ExportSettings
    engines: list[EngineEntry] = field(default_factory=list)
    parity: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. {"step_fp16": {"psnr_db": 61.2}}
    torch_weights: WeightsEntry | None = None  # None: exported with --no-torch-weights
    provenance: dict[str, str | int] = field(default_factory=dict)  # free-form; nothing reads it
    model_config: dict[str, Any] = field(default_factory=dict)  # ModelConfig.to_dict()
    # None: a bundle exported before the section existed (the built-in defaults apply; see the module notes)
    sampling: SamplingEntry | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.sampling is not None:
            _check_sampling(self.sampling, self.schedule)

    @property
    def lr_multiple_of(self) -> int:
        """LR tile sizes must be divisible by this so that scale * tile meets ``hr_multiple_of``."""
        return self.hr_multiple_of // int(np.gcd(self.hr_multiple_of, self.scale))

    def graph(self, role: str, precision: str) -> GraphEntry | None:
        for g in self.graphs:
            if g.role == role and g.precision == precision:
                return g
        return None

    def model(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_config)

    def sampling_defaults(self) -> SamplingOptions:
        """What a caller's ``SamplingOptions`` are resolved against: the bundle's section, or nothing (the
        built-in defaults) for a bundle without one."""
        return SamplingOptions() if self.sampling is None else self.sampling.options()

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return strict_from_dict(cls, data, "manifest")

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise BundleError("manifest must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            # Checked before the strict decode so another format gets this message, not "unknown key".
            raise BundleError(
                f"bundle format version {version!r}; this runtime reads version {FORMAT_VERSION}"
            )
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise BundleError(str(exc)) from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed (graphs can be hundreds of MB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``directory``, a bundle being built (the bundle is the atomic unit)."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def graph_path(self, role: str, precision: str) -> Path:
        entry = self.manifest.graph(role, precision)
        if entry is None:
            have = sorted(f"{g.role}/{g.precision}" for g in self.manifest.graphs)
            raise BundleError(
                f"{self.root}: no {precision} {role} graph (bundle has {have}); "
                f"{_reexport_hint(self.root, self.manifest, precision)}"
            )
        return self.root / entry.file

    def precisions(self) -> list[str]:
        """Precisions for which the bundle has both graphs."""
        return [p for p in PRECISIONS if all(self.manifest.graph(r, p) for r in GRAPH_ROLES)]


def _reexport_hint(root: Path, manifest: Manifest | None, precision: str = "both") -> str:
    ckpt = manifest.export.checkpoint if manifest else "CKPT_DIR"
    return _reexport_command(root, ckpt, precision)


def _inside_installed_package(root: Path) -> bool:
    """Whether ``root`` lies inside the esrdf package itself (the shipped default model's bundle)."""
    import esrdf

    package = Path(esrdf.__file__).resolve().parent
    return root.resolve().is_relative_to(package)


def _reexport_command(root: Path, checkpoint: str, precision: str) -> str:
    """How to renew a broken bundle. Names the manifest's checkpoint only where that folder exists here
    (a clone or another machine has no ``out/...``), and never suggests ``--force`` into the package's own
    files: the shipped bundle is restored by reinstalling the package."""
    if _inside_installed_package(root):
        return (
            "this is the default model shipped inside the esrdf package: reinstall the package "
            "(pip install --force-reinstall --no-deps esrdf), or pass --engine with a bundle of your own"
        )
    if checkpoint != "CKPT_DIR" and not Path(checkpoint).is_dir():
        return (
            f"re-export it from its checkpoint (the manifest names {checkpoint}, which is not here): "
            f"esrdf-export --ckpt CKPT_DIR --out {root} --precision {precision} --force"
        )
    return f"re-export with: esrdf-export --ckpt {checkpoint} --out {root} --precision {precision} --force"


def _other_format_hint(root: Path, text: str) -> str:
    """The re-export command for a manifest of another format version, from what it says (version 1 kept
    the checkpoint in ``export_info``), so an old bundle's error names the command that renews it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _reexport_hint(root, None)
    info = data.get("export", data.get("export_info")) if isinstance(data, dict) else None
    ckpt = info.get("checkpoint") if isinstance(info, dict) else None
    graphs = data.get("graphs") if isinstance(data, dict) else None
    found = {g.get("precision") for g in graphs if isinstance(g, dict)} if isinstance(graphs, list) else set()
    precision = str(next(iter(found))) if len(found) == 1 and found <= set(PRECISIONS) else "both"
    return _reexport_command(root, ckpt if isinstance(ckpt, str) else "CKPT_DIR", precision)


def load_bundle(directory: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read and validate a bundle: format version, graph I/O names, and (``verify``) every file's sha256."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not root.exists():
        raise BundleError(f"{root}: does not exist (expected a bundle folder written by esrdf-export)")
    if not path.is_file():
        raise BundleError(f"{root}: not an ESRDF bundle (no {MANIFEST_NAME}); {_reexport_hint(root, None)}")
    text = path.read_text(encoding="utf-8")
    try:
        manifest = Manifest.from_json(text)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}; {_other_format_hint(root, text)}") from exc
    _check_graph_contracts(root, manifest)
    # (file, sha256, the precision a re-export must write) of every file the manifest lists
    entries: list[GraphEntry | EngineEntry] = [*manifest.graphs, *manifest.engines]
    files = [(e.file, e.sha256, str(e.precision)) for e in entries]
    if manifest.torch_weights is not None:
        files.append((manifest.torch_weights.file, manifest.torch_weights.sha256, "both"))
    for name, sha256, precision in files:
        file = root / name
        if not file.is_file():
            raise BundleError(
                f"{file}: listed in the manifest but missing; {_reexport_hint(root, manifest, precision)}"
            )
        if verify and sha256_file(file) != sha256:
            raise BundleError(
                f"{file}: sha256 does not match the manifest (modified or corrupted); "
                f"{_reexport_hint(root, manifest, precision)}"
            )
    if manifest.sampling is None:
        _notice_no_sampling(root, manifest)
    return Bundle(root=root, manifest=manifest)


def _notice_no_sampling(root: Path, manifest: Manifest) -> None:
    """One line per load of a bundle without a sampling section: what runs instead, and how to renew it."""
    s = SamplingOptions().resolve(manifest.schedule.timesteps)
    std = init_noise_std(manifest.schedule.array(), s.prior)
    hint = _reexport_hint(root, manifest, _precision_of(manifest))
    log.warning(
        "%s: the manifest has no sampling defaults (exported before they were recorded); using the built-in "
        "ones: %s, %d steps, eta %g, %s prior (x_T std %.4f); %s",
        root, s.sampler, s.steps, s.eta, s.prior, std, hint,
    )  # fmt: skip


def _precision_of(manifest: Manifest) -> str:
    """The --precision that re-exports what the bundle holds: its one graph precision, or both."""
    found = {g.precision for g in manifest.graphs}
    return str(next(iter(found))) if len(found) == 1 else "both"


def _check_graph_contracts(root: Path, manifest: Manifest) -> None:
    """Each graph's I/O names must be the ones ``graph_spec`` declares, or the engines would bind wrongly."""
    for g in manifest.graphs:
        spec = graph_spec(g.role, manifest.channels)
        names = ([t.name for t in g.inputs], [t.name for t in g.outputs])
        if names != (list(spec.input_names), list(spec.output_names)):
            raise BundleError(
                f"{root / g.file}: I/O names {names} differ from the {g.role} graph contract "
                f"{(list(spec.input_names), list(spec.output_names))}; "
                f"{_reexport_hint(root, manifest, g.precision)}"
            )


def write_bundle_atomically(
    target: str | os.PathLike[str], build_fn: Callable[[Path], T], force: bool = False
) -> T:
    """Build a bundle with ``build_fn(tmp_dir)`` next to ``target``, verify it, then rename it into place
    (``esrdf.atomic.atomic_dir``).

    A failure or KeyboardInterrupt removes the temp dir, so a half-written bundle never stands at ``target``.
    An existing ``target`` is refused unless ``force``; even then only a previous bundle or an empty directory
    is replaced, never an unrelated folder.
    """
    target = Path(target).absolute()
    check_replaceable(target, force)
    with atomic_dir(target) as tmp:
        result = build_fn(tmp)
        load_bundle(tmp, verify=True)  # never rename an inconsistent bundle into place
        check_replaceable(target, force)
    return result


def check_replaceable(
    target: Path, force: bool, marker: str = MANIFEST_NAME, what: str = "an ESRDF bundle"
) -> None:
    """Refuse to write over ``target`` unless ``force``, and even then unless it is a folder this project
    wrote (it holds ``marker``) or an empty one: never replace an unrelated folder."""
    if not target.exists():
        return
    if not force:
        raise BundleError(f"{target} already exists; pass --force to replace it")
    if not target.is_dir() or not ((target / marker).is_file() or not any(target.iterdir())):
        raise BundleError(f"{target} exists and is not {what}; refusing to replace it even with --force")
