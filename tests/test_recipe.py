"""The default model's recipe (esrdf/default_model/recipe.py): configs that round-trip strictly, state kept
outside the work tree, stage timings that accumulate over resumes, and the quality goals' logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esrdf.config import ModelConfig
from esrdf.default_model import RECOMMENDED_SAMPLING, recipe
from esrdf.default_model.goals import check_goals
from esrdf.training.config import TrainConfig


def test_recipe_configs_round_trip_strictly(tmp_path: Path) -> None:
    cfg = recipe.default_model_config()
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert ModelConfig.from_json_file(tmp_path / "config.json") == cfg
    for train in (recipe.predictor_train_config(recipe.PREDICTOR_STEPS),
                  recipe.diffusion_train_config(recipe.DIFFUSION_STEPS)):  # fmt: skip
        path = tmp_path / f"{train.kind}.json"
        path.write_text(json.dumps(train.to_dict()))
        assert TrainConfig.from_json_file(path) == train
        assert train.amp == "bf16" and train.decode_cache  # the measured CPU speed-ups
    assert recipe.diffusion_train_config(10).crop % cfg.unet.multiple_of == 0
    assert 1 <= RECOMMENDED_SAMPLING.steps <= cfg.schedule.timesteps


def test_state_is_kept_in_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESRDF_CACHE", str(tmp_path))
    assert recipe.default_state_dir() == tmp_path / "default_model"
    monkeypatch.delenv("ESRDF_CACHE")
    assert recipe.default_state_dir() == Path.home() / ".cache" / "esrdf" / "default_model"


def test_stage_timings_accumulate_over_resumes(tmp_path: Path) -> None:
    for _ in range(2):
        with recipe._timed_stage(tmp_path, "predictor"):
            sum(range(10_000))
    timings = json.loads((tmp_path / recipe.TIMINGS_FILE).read_text())
    assert timings["predictor"]["runs"] == 2 and timings["predictor"]["cpu_s"] > 0
    assert (tmp_path / "recipe.log").read_text().count("predictor: start") == 2


def _report(rows: dict[str, dict[str, tuple[float, float, float]]]) -> dict:
    """An esrdf-eval report's JSON form from (psnr_rgb, lpips, residual entropy) per photo and method."""
    keys = ("psnr_rgb", "lpips", "residual_entropy_bits")
    images = [
        {"name": name, "scores": {m: dict(zip(keys, v, strict=True)) for m, v in methods.items()}}
        for name, methods in rows.items()
    ]
    means = {m: {k: sum(i["scores"][m][k] for i in images) / len(images) for k in keys} for m in rows["a"]}
    return {"images": images, "means": means}


def test_goals_name_what_is_met_and_missed(tmp_path: Path) -> None:
    good = _report({
        "a": {"bicubic": (26.0, 0.32, 5.0), "predictor": (27.0, 0.30, 4.0), "esrdf": (27.0, 0.29, 4.1)},
        "b": {"bicubic": (30.0, 0.30, 5.0), "predictor": (30.9, 0.28, 4.5), "esrdf": (30.8, 0.27, 4.6)},
    })  # fmt: skip
    assert [g.met for g in check_goals(good)] == [True, True, True, True]
    bad = _report({
        "a": {"bicubic": (26.0, 0.32, 5.0), "predictor": (27.0, 0.30, 4.0), "esrdf": (26.9, 0.31, 4.1)},
        "b": {"bicubic": (30.0, 0.30, 5.0), "predictor": (30.9, 0.28, 5.5), "esrdf": (29.9, 0.29, 4.6)},
    })  # fmt: skip
    psnr, lpips, per_photo, entropy, size = check_goals(bad, tmp_path)
    assert not psnr.met and "+0.40" in psnr.detail  # 28.40 vs 28.00 bicubic
    assert not lpips.met and "ESRDF 0.3000, predictor 0.2900" in lpips.detail
    assert not per_photo.met and "b -0.10" in per_photo.detail
    assert not entropy.met and "1/2" in entropy.detail
    assert size.met and size.detail == "0.0 MiB"
