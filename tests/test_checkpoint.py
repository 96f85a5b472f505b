"""Checkpoints: exact round trip, atomic saves, strict shapes, and no unpickling, ever."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esrdf.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    TrainingState,
    flatten_optimizer_state,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    unflatten_optimizer_state,
)
from esrdf.config import preset
from esrdf.models.build import build_predictor, build_unet

CFG = preset("tiny")


def _networks(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    predictor, unet, ema = build_predictor(CFG), build_unet(CFG), build_unet(CFG)
    with torch.no_grad():  # distinct, non-default values everywhere, buffers included
        for module in (predictor, unet, ema):
            for t in module.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
    return predictor, unet, ema


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, tuple[torch.nn.Module, ...]]:
    nets = _networks()
    return save_checkpoint(tmp_path / "ckpt", CFG, *nets), nets


def test_round_trip_is_exact_and_prefers_ema(saved) -> None:
    path, (predictor, unet, ema) = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", MODEL_FILE]
    loaded = load_checkpoint(path)
    assert loaded.config == CFG
    assert _same_state(loaded.predictor, predictor)
    assert loaded.unet_weights == "ema" and _same_state(loaded.unet, ema)
    raw = load_checkpoint(path / MODEL_FILE, use_ema=False)  # the file path works too
    assert raw.unet_weights == "raw" and _same_state(raw.unet, unet)
    assert not loaded.predictor.training


def test_predictor_only_checkpoint_and_training_state(tmp_path: Path) -> None:
    predictor = _networks()[0]
    opt = torch.optim.AdamW(predictor.parameters(), lr=1e-3)
    predictor(torch.rand(2, 3, 8, 8) * 2 - 1).square().mean().backward()
    opt.step()
    state = flatten_optimizer_state(opt.state_dict())
    state.meta["step"] = 1
    path = save_checkpoint(
        tmp_path / "p", CFG, predictor, train_config={"kind": "predictor"}, training_state=state
    )
    loaded = load_checkpoint(path)
    assert loaded.unet is None and loaded.unet_weights is None
    back = load_training_state(path)
    assert back.meta["step"] == 1
    restored = unflatten_optimizer_state(back, back.meta)
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for pid, entry in original["state"].items():
        for name, value in entry.items():
            assert torch.equal(restored["state"][pid][name], value)


def test_saving_is_atomic_and_never_overwrites_by_accident(saved, tmp_path: Path) -> None:
    path, _ = saved
    other = _networks(seed=1)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, CFG, *other)
    # A save that fails half-way (safetensors refuses tensors sharing memory) leaves the old one intact.
    shared = torch.zeros(4)
    bad_state = TrainingState({"a": shared, "b": shared}, {})
    with pytest.raises(RuntimeError):
        save_checkpoint(path, CFG, *other, training_state=bad_state, overwrite=True)
    assert _same_state(load_checkpoint(path).predictor, saved[1][0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old dirs left behind
    save_checkpoint(path, CFG, *other, overwrite=True)
    assert _same_state(load_checkpoint(path).predictor, other[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


class _Payload:
    """A pickle that creates a file when unpickled: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_by_extension_and_by_content(saved, tmp_path: Path) -> None:
    path, (predictor, _, _) = saved
    pt = tmp_path / "weights.pt"
    torch.save(predictor.state_dict(), pt)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(pt)
    pt_dir = tmp_path / "pt_only"
    pt_dir.mkdir()
    torch.save(predictor.state_dict(), pt_dir / "model.pth")
    with pytest.raises(CheckpointError, match="model.pth is a pickle"):
        load_checkpoint(pt_dir)
    # torch.save's zip archive disguised as model.safetensors
    torch.save(predictor.state_dict(), path / MODEL_FILE)
    with pytest.raises(CheckpointError, match="zip archive"):
        load_checkpoint(path)
    # a malicious plain pickle disguised as model.safetensors is never unpickled
    marker = tmp_path / "pwned"
    (path / MODEL_FILE).write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_mismatched_missing_and_unknown_keys_are_named(saved) -> None:
    path, _ = saved
    file = path / MODEL_FILE
    tensors = load_file(file)
    key = next(k for k in tensors if k.startswith("unet_ema.") and tensors[k].dim() == 4)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: key '{key}' has shape"):
        load_checkpoint(path)
    del tensors[key]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=rf"missing key '{key}'"):
        load_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    config["predictor"]["colour"] = "blue"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown key\(s\) \['colour'\]"):
        load_checkpoint(path)


def test_truncated_file_names_the_file_and_the_first_missing_tensor(saved) -> None:
    path, _ = saved
    file = path / MODEL_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor '(predictor|unet|unet_ema)\..+' is truncated"
    ):
        load_checkpoint(path)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "empty")
