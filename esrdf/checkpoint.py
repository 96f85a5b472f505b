"""Checkpoints: a directory of strict JSON and safetensors files. Loading never unpickles.

Layout of ``CKPT_DIR/`` (docs/DESIGN.md section 1, "Checkpoint")::

    config.json                  ModelConfig.to_dict() (strict: unknown or missing keys are an error)
    model.safetensors            predictor.*, unet.* (raw weights), unet_ema.* (EMA of the U-Net)
    sampling.json                optional: the model's sampling defaults (SamplingOptions fields, no seed),
                                 which esrdf-eval runs and esrdf-export writes into the bundle's manifest
    train.json                   the TrainConfig of the run that wrote it (training only)
    training_state.safetensors   optimizer tensors and other resume tensors (training only)
    training_state.json          step, data fingerprint, optimizer scalars, ... (training only)

A predictor-only checkpoint has no ``unet.*``; a diffusion checkpoint holds both networks. Export and
inference use ``unet_ema.*`` when present. A checkpoint is written into a temporary sibling directory and
renamed into place (``esrdf.atomic``), so the target path never holds a half-written checkpoint.

``torch.load`` unpickles, and a pickle from a stranger can run any code; so ``.pt``/``.pth``/``.ckpt``/
``.bin``/``.pkl`` files are refused by name, and a pickle or zip archive renamed to ``.safetensors`` is
refused by its first bytes. Every tensor file is checked before it is read: a truncated file names the first
tensor whose bytes are missing, and a shape that does not fit the config names the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from esrdf.atomic import OLD_TAG, atomic_dir
from esrdf.config import (
    ConfigError,
    ModelConfig,
    SamplingOptions,
    read_json_object,
    strict_from_dict,
    to_jsonable,
)
from esrdf.models.build import build_predictor, build_unet
from esrdf.models.predictor import Predictor
from esrdf.models.unet import UNet

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TRAIN_CONFIG_FILE = "train.json"
SAMPLING_FILE = "sampling.json"
TRAIN_STATE_FILE = "training_state.safetensors"
TRAIN_STATE_JSON = "training_state.json"
PREDICTOR, UNET, UNET_EMA = "predictor", "unet", "unet_ema"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar"})
# A safetensors header is JSON metadata only; a huge declared length means a foreign or corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, truncated, mismatched, or a pickle."""


@dataclass
class TrainingState:
    """What resuming needs beyond the weights: tensors (optimizer moments, ...) and JSON metadata."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedCheckpoint:
    path: Path
    config: ModelConfig
    predictor: Predictor
    unet: UNet | None
    unet_weights: Literal["ema", "raw"] | None  # which U-Net tensors ``unet`` holds


def _refuse_pickle(file: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: {why}; refusing to load it, because unpickling can run arbitrary code. ESRDF checkpoints "
        f"are directories of {CONFIG_FILE} + {MODEL_FILE}; convert trusted weights with safetensors first."
    )


def check_safetensors_file(file: Path) -> dict[str, Any]:
    """Validate ``file`` as safetensors without reading tensors; return its header.

    The format is an 8-byte little-endian header length, a JSON header mapping each key to its dtype, shape
    and ``data_offsets``, then the data. The safetensors library rejects a bad file too, but its message
    names neither the key nor the cause, so the structure is checked here first.
    """
    file = Path(file)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(file, f"a '{file.suffix}' file is a torch.save pickle")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04"):
            raise _refuse_pickle(file, "this is a zip archive (torch.save format), not safetensors")
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            raise _refuse_pickle(file, f"this is a pickle (protocol {head[1]}), not safetensors")
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes; not even a safetensors header)")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{file}: truncated or not safetensors (header of {header_len} bytes declared, "
                f"file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file}: not a safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = int(info["data_offsets"][1])
        if end > data_size:
            raise CheckpointError(
                f"{file}: tensor {key!r} is truncated (its data ends at byte {end} of the "
                f"data section, which holds only {data_size} bytes)"
            )
    return header


def read_tensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, after :func:`check_safetensors_file`."""
    check_safetensors_file(file)
    return load_file(file, device=str(device))


def _state_for_saving(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    path: Path,
    config: ModelConfig,
    predictor: nn.Module,
    unet: nn.Module | None = None,
    unet_ema: nn.Module | None = None,
    *,
    train_config: Mapping[str, Any] | None = None,
    training_state: TrainingState | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory atomically (``esrdf.atomic.atomic_dir``: temp sibling, files fsynced,
    then renamed into place; an old checkpoint is renamed aside, then deleted) and return its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists (pass overwrite=True to replace it)")
    if unet_ema is not None and unet is None:
        raise CheckpointError("an EMA U-Net needs the raw U-Net beside it")
    with atomic_dir(target, fsync=True) as tmp:
        _write_json(tmp / CONFIG_FILE, config.to_dict())
        tensors = _state_for_saving(predictor, PREDICTOR)
        if unet is not None:
            tensors |= _state_for_saving(unet, UNET)
        if unet_ema is not None:
            tensors |= _state_for_saving(unet_ema, UNET_EMA)
        save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt", "esrdf_model": config.name})
        if train_config is not None:
            _write_json(tmp / TRAIN_CONFIG_FILE, dict(train_config))
        if training_state is not None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in training_state.tensors.items()}
            save_file(state, tmp / TRAIN_STATE_FILE, metadata={"format": "pt"})
            _write_json(tmp / TRAIN_STATE_JSON, training_state.meta)
        if target.exists() and not overwrite:  # appeared while we wrote
            raise CheckpointError(f"{target} already exists (pass overwrite=True to replace it)")
    return target


def checkpoint_dir(path: Path) -> Path:
    """Resolve ``path`` to a checkpoint directory, refusing pickle files and explaining what is missing."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(path, f"a '{path.suffix}' file is a torch.save pickle")
        if path.name != MODEL_FILE:
            raise CheckpointError(
                f"{path}: expected a checkpoint directory (with {CONFIG_FILE} and {MODEL_FILE})"
            )
        path = path.parent
    if not path.is_dir():
        leftovers = sorted(path.parent.glob(f".{path.name}{OLD_TAG}*")) if path.parent.is_dir() else []
        hint = f"; an interrupted save left {leftovers[0]}: rename it to {path}" if leftovers else ""
        raise CheckpointError(f"checkpoint directory {path} does not exist{hint}")
    if not (path / MODEL_FILE).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(path / pickles[0], f"{MODEL_FILE} is missing and {pickles[0]} is a pickle")
        raise CheckpointError(f"{path}: {MODEL_FILE} is missing; not an ESRDF checkpoint directory")
    return path


def read_config(path: Path) -> ModelConfig:
    file = checkpoint_dir(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return ModelConfig.from_json_file(file)
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def read_sampling_defaults(path: Path) -> SamplingOptions | None:
    """The checkpoint's ``sampling.json`` (sampler, steps, eta, prior; strict keys), or None without one.
    Values are checked where they are used (the export's manifest, the evaluation's options)."""
    file = checkpoint_dir(path) / SAMPLING_FILE
    if not file.is_file():
        return None
    try:
        data = read_json_object(file)
        if "seed" in data:
            raise ConfigError("a seed belongs to a request, not to the model's defaults")
        return strict_from_dict(SamplingOptions, {**data, "seed": None}, str(file))
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def write_sampling_defaults(path: Path, options: SamplingOptions) -> Path:
    """Write ``options`` (without the seed) as the checkpoint's ``sampling.json``."""
    file = checkpoint_dir(path) / SAMPLING_FILE
    data = {k: v for k, v in to_jsonable(options).items() if k != "seed"}
    _write_json(file, data)
    return file


def load_module_strict(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str, file: Path
) -> None:
    """Load the ``prefix.*`` tensors into ``module``; every missing, unexpected or misshapen key is an error
    naming the key and the file."""
    expected = module.state_dict()
    start = len(prefix) + 1
    got = {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file}: missing key '{prefix}.{missing[0]}'{more} for this config")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{file}: unexpected key '{prefix}.{unexpected[0]}'{more} for this config")
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{file}: key '{prefix}.{key}' has shape {tuple(got[key].shape)}, but the "
                f"config builds {tuple(ref.shape)}"
            )
    module.load_state_dict(got, strict=True)


def _check_prefixes(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    for key in tensors:
        if key.split(".", 1)[0] not in (PREDICTOR, UNET, UNET_EMA):
            raise CheckpointError(
                f"{file}: unexpected key {key!r} (expected predictor.*, unet.* or unet_ema.*)"
            )


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The validated tensors of a checkpoint's model.safetensors (on the CPU)."""
    file = checkpoint_dir(path) / MODEL_FILE
    tensors = read_tensors(file)
    _check_prefixes(tensors, file)
    return tensors


def has_unet(tensors: Mapping[str, torch.Tensor], prefix: str = UNET) -> bool:
    return any(k.startswith(prefix + ".") for k in tensors)


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, use_ema: bool = True
) -> LoadedCheckpoint:
    """Rebuild both networks from ``config.json`` and load their weights strictly; modules come back in eval
    mode on ``map_location``. ``unet`` holds the EMA weights when present and ``use_ema``, else the raw ones,
    and is None for a predictor-only checkpoint."""
    directory = checkpoint_dir(path)
    config = read_config(directory)
    tensors = read_model_tensors(directory)
    file = directory / MODEL_FILE
    predictor = build_predictor(config)
    load_module_strict(predictor, tensors, PREDICTOR, file)
    unet: UNet | None = None
    source: Literal["ema", "raw"] | None = None
    if has_unet(tensors, UNET) or has_unet(tensors, UNET_EMA):
        unet = build_unet(config)
        source = "ema" if use_ema and has_unet(tensors, UNET_EMA) else "raw"
        load_module_strict(unet, tensors, UNET_EMA if source == "ema" else UNET, file)
        unet = unet.to(map_location).eval()
    return LoadedCheckpoint(directory, config, predictor.to(map_location).eval(), unet, source)


def load_training_state(path: Path) -> TrainingState:
    """The resume state of a training checkpoint; an error when the checkpoint has none."""
    directory = checkpoint_dir(path)
    meta_file = directory / TRAIN_STATE_JSON
    if not meta_file.is_file():
        raise CheckpointError(f"{directory}: no {TRAIN_STATE_JSON}; this checkpoint cannot be resumed")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file}: not valid JSON ({exc})") from exc
    tensors = read_tensors(directory / TRAIN_STATE_FILE) if (directory / TRAIN_STATE_FILE).exists() else {}
    return TrainingState(tensors=tensors, meta=meta)


def read_train_config(path: Path) -> dict[str, Any]:
    """The raw ``train.json`` dict (the training package turns it into a TrainConfig)."""
    file = checkpoint_dir(path) / TRAIN_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; this checkpoint was not written by a training run")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def flatten_optimizer_state(state_dict: Mapping[str, Any], prefix: str = "optimizer") -> TrainingState:
    """torch optimizer ``state_dict()`` -> tensors ``prefix.state.<param>.<name>`` plus JSON for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]
    ]
    return TrainingState(tensors, {"param_groups": groups, "scalars": scalars})


def unflatten_optimizer_state(
    state: TrainingState, meta: Mapping[str, Any], prefix: str = "optimizer"
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; ``meta`` is the JSON part it returned."""
    entries: dict[int, dict[str, Any]] = {}
    head = prefix + ".state."
    for key, value in state.tensors.items():
        if key.startswith(head):
            param_id, name = key[len(head) :].split(".", 1)
            entries.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        entries.setdefault(int(param_id), {}).update(values)
    # JSON has no tuples; torch optimizers unpack betas either way, but keep their original type.
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": entries, "param_groups": groups}
