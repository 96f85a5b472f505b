"""Training on real photos: the predictor learns, diffusion trains on its residuals, resume is exact,
Ctrl-C saves, and the esrdf-train CLI is a thin, strict shell."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from esrdf.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from esrdf.cli.train import main
from esrdf.config import ConfigError, preset
from esrdf.data import bicubic_downsample, load_rgb, to_tensor
from esrdf.losses.total import PredictorLoss
from esrdf.models.build import build_predictor, build_unet, count_parameters
from esrdf.training.config import train_preset
from esrdf.training.diffusion import train_diffusion
from esrdf.training.predictor import train_predictor

TINY = preset("tiny")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory, training_photos: list[Path]) -> Path:
    """Six real training photos, shrunk to 256 px (fast to decode, still full of texture)."""
    folder = tmp_path_factory.mktemp("photos")
    picks = [training_photos[i] for i in np.linspace(0, len(training_photos) - 1, 6).astype(int)]
    for i, path in enumerate(picks):
        Image.fromarray(load_rgb(path, max_side=256)).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def predictor_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny predictor checkpoint (fresh weights: diffusion only needs a fixed predictor)."""
    torch.manual_seed(7)
    return save_checkpoint(tmp_path_factory.mktemp("pred") / "ckpt", TINY, build_predictor(TINY))


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _diffusion_cfg(steps: int):
    return train_preset("tiny", "diffusion").replace(
        steps=steps, batch=4, crop=32, save_every=3, ema_decay=0.9
    )


def test_diffusion_run_trains_on_residuals_and_writes_both_networks(photo_folder, predictor_ckpt, tmp_path):
    out = tmp_path / "diff"
    result = train_diffusion(photo_folder, predictor_ckpt, out, _diffusion_cfg(4), progress=False)
    assert result.step == 4 and not result.interrupted
    assert all(np.isfinite(result.losses)) and 0.0 < result.losses[0] < 2.0  # L1 on eps ~ N(0, I)
    loaded = load_checkpoint(out)
    assert loaded.unet is not None and loaded.unet_weights == "ema"
    assert _states_equal(loaded.predictor, load_checkpoint(predictor_ckpt).predictor)  # frozen
    assert _states_equal(loaded.unet, result.modules["unet_ema"])
    assert not _states_equal(loaded.unet, build_unet(TINY))
    assert load_training_state(out).meta["step"] == 4
    log = (tmp_path / "diff.log").read_text().splitlines()  # beside the checkpoint, kept across saves
    assert len(log) == 1 and "diffusion step 4/4 loss" in log[0]


def _interrupt_after_first_save(out: Path) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(photo_folder, predictor_ckpt, tmp_path):
    out = tmp_path / "interrupted"
    watcher = _interrupt_after_first_save(out)
    stopped = train_diffusion(photo_folder, predictor_ckpt, out, _diffusion_cfg(10_000), progress=False)
    watcher.join()
    assert stopped.interrupted and 3 <= stopped.step < 10_000
    state = load_training_state(out)
    assert state.meta["interrupted"] and state.meta["step"] == stopped.step

    total = stopped.step + 2
    resumed = train_diffusion(photo_folder, None, out, _diffusion_cfg(total), resume=True, progress=False)
    fresh = train_diffusion(
        photo_folder, predictor_ckpt, tmp_path / "fresh", _diffusion_cfg(total), progress=False
    )
    assert resumed.step == fresh.step == total
    assert resumed.losses == fresh.losses[-2:]  # same samples, same t and eps, same weights
    for name in ("unet", "unet_ema", "predictor"):
        assert _states_equal(resumed.modules[name], fresh.modules[name]), name


def _one_image01(batch: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> the B patches stacked as one (B*H, W, 3) image in [0, 1], so that
    ``esrdf.metrics.psnr_rgb`` scores the whole batch (one MSE over every pixel)."""
    image = (batch.detach().clamp(-1, 1) + 1) / 2
    return image.permute(0, 2, 3, 1).reshape(-1, batch.shape[-1], 3).double().numpy()


def _held_out_patches(
    eval_photos: dict[str, np.ndarray], crop: int, scale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre crops of the held-out evaluation photos: (lr, hr) batches in [-1, 1]."""
    lrs, hrs = [], []
    for img in eval_photos.values():
        h, w = img.shape[:2]
        for dy, dx in ((0, 0), (crop, 0), (0, crop)):
            y, x = (h - crop) // 2 + dy // 2, (w - crop) // 2 + dx // 2
            hr = np.ascontiguousarray(img[y : y + crop, x : x + crop])
            lrs.append(to_tensor(bicubic_downsample(hr, scale)))
            hrs.append(to_tensor(hr))
    return torch.stack(lrs), torch.stack(hrs)


@pytest.mark.slow
def test_short_predictor_run_lowers_the_loss_and_beats_bicubic(photo_folder, eval_photos, tmp_path):
    # The tiny preset's loss: L_Em (32 bins) + L_Pixel; L_Feat is off for speed and so that no VGG weights
    # are needed. 150 steps gained +0.22 dB over bicubic here (measured on the 2-core CPU dev machine).
    cfg = train_preset("tiny", "predictor").replace(steps=150, batch=8, crop=64, lr=1e-3, save_every=1000)
    result = train_predictor(photo_folder, tmp_path / "pred", TINY, cfg, progress=False)
    assert np.mean(result.losses[-30:]) < np.mean(result.losses[:30])
    torch.manual_seed(cfg.seed)
    initial = build_predictor(TINY).eval()  # the weights training started from
    trained = load_checkpoint(tmp_path / "pred").predictor
    lr, hr = _held_out_patches(eval_photos, crop=64, scale=TINY.scale)
    criterion = PredictorLoss(cfg.predictor_loss)
    with torch.no_grad():
        before, after = criterion(initial(lr), hr).total.item(), criterion(trained(lr), hr).total.item()
        predicted = trained(lr)
    assert after < 0.9 * before
    bicubic = F.interpolate(lr, scale_factor=TINY.scale, mode="bicubic", align_corners=False)
    from esrdf.metrics import psnr_rgb  # scikit-image: imported here, so a GPU machine can collect this file

    target = _one_image01(hr)
    assert psnr_rgb(_one_image01(predicted), target) > psnr_rgb(_one_image01(bicubic), target) + 0.05


def test_predictor_resume_equals_uninterrupted_run(photo_folder, tmp_path):
    cfg = train_preset("tiny", "predictor").replace(steps=6, batch=4, crop=32, save_every=100)
    full = train_predictor(photo_folder, tmp_path / "full", TINY, cfg, progress=False)
    train_predictor(photo_folder, tmp_path / "part", TINY, cfg.replace(steps=3), progress=False)
    rest = train_predictor(photo_folder, tmp_path / "part", TINY, cfg, resume=True, progress=False)
    assert rest.losses == full.losses[3:]
    assert _states_equal(rest.modules["predictor"], full.modules["predictor"])


def test_cosine_schedule_resumes_exactly_and_ties_steps(photo_folder, tmp_path):
    """The rate is a function of the step, so a stopped cosine run resumes on its schedule; its length is
    part of the schedule, so resuming with other ``steps`` is refused."""
    cfg = train_preset("tiny", "predictor").replace(
        steps=6, batch=4, crop=32, save_every=2, lr_schedule="cosine", warmup_steps=2
    )
    full = train_predictor(photo_folder, tmp_path / "full", TINY, cfg, progress=False)
    part = tmp_path / "part"
    watcher = _interrupt_after_first_save(part)
    stopped = train_predictor(photo_folder, part, TINY, cfg, progress=False)
    watcher.join()
    assert stopped.interrupted and 2 <= stopped.step < 6
    with pytest.raises(ConfigError, match="tied to steps"):
        train_predictor(photo_folder, part, TINY, cfg.replace(steps=8), resume=True, progress=False)
    rest = train_predictor(photo_folder, part, TINY, cfg, resume=True, progress=False)
    assert rest.losses == full.losses[stopped.step :]
    assert _states_equal(rest.modules["predictor"], full.modules["predictor"])


# ---------------------------------------------------------------------------------------------- CLI


def test_describe_prints_the_exact_parameter_counts() -> None:
    result = CliRunner().invoke(main, ["describe", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["parameters"] == {"predictor": 2_381_948, "unet": 97_807_491}
    assert described["config"] == preset("paper").to_dict()
    assert described["training"]["diffusion"]["batch"] == 80
    tiny = json.loads(CliRunner().invoke(main, ["describe", "--preset", "tiny", "--scale", "2"]).stdout)
    cfg = preset("tiny", 2)
    assert tiny["parameters"] == {
        "predictor": count_parameters(build_predictor(cfg)),
        "unet": count_parameters(build_unet(cfg)),
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["describe", "--preset", "huge"], "Invalid value for '--preset'"),
        (["describe", "--preset", "tiny", "--scale", "3"], "Invalid value for '--scale'"),
        (["predictor", "--out", "{tmp}/o", "--data", "{tmp}/missing"], "does not exist"),
        (["predictor", "--out", "{tmp}/o", "--data", "{photos}", "--offline-photos"], "exactly one of"),
        (["predictor", "--out", "{tmp}/o", "--data", "{photos}", "--resume"], "does not exist"),
        (["predictor", "--out", "{photos}", "--data", "{photos}", "--preset", "tiny"], "pass --resume"),
        (
            ["predictor", "--out", "{tmp}/o", "--data", "{photos}", "--crop", "30", "--preset", "tiny"],
            "multiple",
        ),
        (["diffusion", "--out", "{tmp}/o", "--data", "{photos}"], "--predictor CKPT_DIR is required"),
        (
            ["diffusion", "--out", "{tmp}/o", "--data", "{photos}", "--predictor", "{photos}"],
            "model.safetensors",
        ),
        (
            ["predictor", "--out", "{tmp}/o", "--data", "{photos}", "--steps", "0"],
            "Invalid value for '--steps'",
        ),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(args, message, photo_folder, tmp_path) -> None:
    args = [a.format(tmp=tmp_path, photos=photo_folder) for a in args]
    result = CliRunner().invoke(main, [*args, "--no-progress"] if args[0] != "describe" else args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_cli_trains_diffusion_and_refuses_to_change_the_data_order_on_resume(
    photo_folder, predictor_ckpt, tmp_path
):
    out = tmp_path / "cli_diff"
    common = ["--data", str(photo_folder), "--out", str(out), "--crop", "32", "--batch", "4", "--no-progress"]
    result = CliRunner().invoke(
        main, ["diffusion", "--predictor", str(predictor_ckpt), "--steps", "2", *common]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["step"] == 2 and not summary["interrupted"] and np.isfinite(summary["final_loss"])
    assert load_checkpoint(out).unet_weights == "ema"
    refused = CliRunner().invoke(main, ["diffusion", "--resume", "--steps", "3", "--seed", "5", *common])
    assert refused.exit_code == 1 and "cannot change seed: 0 -> 5 when resuming" in refused.stderr
    resumed = CliRunner().invoke(main, ["diffusion", "--resume", "--steps", "3", *common])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["step"] == 3


def test_learning_rate_schedule_golden() -> None:
    from esrdf.training.config import learning_rate

    cfg = train_preset("tiny", "predictor").replace(steps=110, lr=1e-3, lr_schedule="cosine", warmup_steps=10)
    rates = [learning_rate(cfg, step) for step in range(cfg.steps)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # linear warm-up to lr
    assert rates[10] == pytest.approx(1e-3) and rates[60] == pytest.approx(5e-4)  # cos(pi/2) half-way
    assert rates[-1] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    constant = cfg.replace(lr_schedule="constant", warmup_steps=0)
    assert {learning_rate(constant, step) for step in (0, 50, 109)} == {1e-3}


def test_train_config_round_trips_strictly_through_json(tmp_path) -> None:
    from esrdf.config import ConfigError
    from esrdf.training.config import TRAIN_PRESETS, TrainConfig

    for cfg in TRAIN_PRESETS.values():
        path = tmp_path / "train.json"
        path.write_text(json.dumps(cfg.to_dict()))
        assert TrainConfig.from_json_file(path) == cfg
    data = TRAIN_PRESETS[("paper", "diffusion")].to_dict()
    assert (data["batch"], data["steps"], data["lr"], data["weight_decay"]) == (80, 100_000, 1e-4, 5e-4)
    assert (TRAIN_PRESETS[("paper", "predictor")].steps, TRAIN_PRESETS[("paper", "predictor")].batch) == (
        1000,
        96,
    )
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr_decay'\]"):
        TrainConfig.from_dict(data | {"lr_decay": 0.5})
    with pytest.raises(ConfigError, match="missing key 'crop'"):
        TrainConfig.from_dict({k: v for k, v in data.items() if k != "crop"})
    # A train.json written before these keys existed still resumes, meaning what it meant then.
    older = {k: v for k, v in data.items() if k not in ("lr_schedule", "warmup_steps", "decode_cache")}
    restored = TrainConfig.from_dict(older)
    assert (restored.lr_schedule, restored.warmup_steps, restored.decode_cache) == ("constant", 0, False)
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig.from_dict(data | {"amp": "fp8"})
