"""Every consumer runs the bundle's sampling defaults (its manifest's ``sampling`` section) when the caller
gives nothing, and a caller's field overrides only that field: Upscaler, UpscalerService, esrdf-run, the
serving tile models, esrdf-eval (a checkpoint's sampling.json) and esrdf-export (flags over sampling.json).

The test bundle is a copy of the shared tiny bundle whose section differs from the built-in rule in every
field (DDIM 3 steps, eta 0.5, the paper's prior), so "used the defaults" cannot pass by coincidence.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_bundle import tiny_bundle, tiny_checkpoint

from esrdf.config import SamplingOptions
from esrdf.runtime import Upscaler
from esrdf.runtime.bundle import load_bundle, sampling_entry, write_manifest

DEFAULTS = SamplingOptions("ddim", 3, 0.5, prior="paper")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("defaults") / "bundle"
    shutil.copytree(tiny_bundle(tmp_path_factory.getbasetemp()), copy)
    manifest = load_bundle(copy).manifest
    write_manifest(copy, dataclasses.replace(manifest, sampling=sampling_entry(manifest.schedule, DEFAULTS)))
    return copy


@pytest.fixture(scope="module")
def crop(eval_photos: dict[str, np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(eval_photos["coffee"][100:111, 200:213])  # 11 x 13: two tiles, odd sizes


def _spelled(seed: int = 0, **changes: Any) -> SamplingOptions:
    """DEFAULTS written out in full, with ``changes``."""
    return dataclasses.replace(DEFAULTS, seed=seed, **changes)


def test_upscaler_resolves_against_the_bundle_and_overrides_one_field_at_a_time(bundle: Path) -> None:
    up = Upscaler(bundle, threads=1)
    assert up.sampling() == _spelled().resolve(200)
    assert up.sampling(SamplingOptions(prior="matched")) == _spelled(prior="matched").resolve(200)
    assert up.sampling(SamplingOptions(eta=0.0, seed=4)) == _spelled(4, eta=0.0).resolve(200)
    # Another sampler does not take the default's 3 steps: DDPM runs all T.
    assert up.sampling(SamplingOptions(sampler="ddpm")).steps == 200
    plan = up.step_plan()
    assert plan.num_steps == 3 and plan.eta == 0.5 and plan.init_noise_std == 1.0
    assert 0.0 < up.step_plan(SamplingOptions(prior="matched")).init_noise_std < 1.0


def test_upscaler_call_without_options_is_the_section_spelled_out(bundle: Path, crop: np.ndarray) -> None:
    up = Upscaler(bundle, threads=1)
    default = up(crop)
    np.testing.assert_array_equal(default, up(crop, _spelled()))
    assert not np.array_equal(default, up(crop, _spelled(prior="matched")))  # the prior reaches x_T


def test_service_uses_the_bundle_defaults(bundle: Path, crop: np.ndarray) -> None:
    from esrdf.runtime.serving.service import ServiceConfig, UpscalerService

    reference = Upscaler(bundle, threads=1)(crop, _spelled(seed=2))
    with UpscalerService(bundle, ServiceConfig(workers=1, threads_per_worker=1)) as service:
        np.testing.assert_array_equal(service.upscale(crop, SamplingOptions(seed=2), timeout=120), reference)


def test_esrdf_run_help_and_run_use_the_bundle(bundle: Path, crop: np.ndarray, tmp_path: Path) -> None:
    from esrdf.runtime.cli import main

    help_text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    for flag in ("--sampler", "--steps", "--eta", "--prior"):
        assert flag in help_text
    assert help_text.count("(default: from the bundle)") == 4
    source, target = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(crop).save(source)
    result = CliRunner().invoke(main, ["--engine", str(bundle), "-i", str(source), "-o", str(target)])
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(target).convert("RGB"))
    np.testing.assert_array_equal(out, Upscaler(bundle)(crop, _spelled()))


def test_tile_models_use_the_bundle_defaults(bundle: Path, crop: np.ndarray) -> None:
    """esrdf-serve's image model resolves a request against the section and sends the resolved options,
    prior included, with every tile; wired here to the tile model in-process, without Triton."""
    from esrdf.runtime.serving.triton_models import ImageModel, TileModel, decode_image_request

    up = Upscaler(bundle, threads=1)
    tiles = TileModel(up, max_batch=4)

    class Loopback:  # what pytriton's ModelClient.infer_batch does, minus the network
        def infer_batch(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
            return tiles([inputs])[0]

        def close(self) -> None:
            pass

    image = ImageModel(up, Loopback)
    np.testing.assert_array_equal(image.upscale(decode_image_request({"image": crop})), up(crop, _spelled()))
    matched = {"image": crop, "prior": np.array([b"matched"], object)}
    np.testing.assert_array_equal(
        image.upscale(decode_image_request(matched)), up(crop, _spelled(prior="matched"))
    )


def test_shipped_bundle_and_checkpoint_carry_the_recommended_sampling() -> None:
    from esrdf.checkpoint import read_sampling_defaults
    from esrdf.default_model import RECOMMENDED_SAMPLING, default_bundle_dir, default_checkpoint_dir

    manifest = load_bundle(default_bundle_dir()).manifest
    assert manifest.sampling is not None and manifest.sampling_defaults() == RECOMMENDED_SAMPLING
    assert read_sampling_defaults(default_checkpoint_dir()) == RECOMMENDED_SAMPLING
    assert Upscaler(default_bundle_dir()).sampling() == RECOMMENDED_SAMPLING.resolve(200)


def test_checkpoint_sampling_json_is_strict(tmp_path: Path) -> None:
    from esrdf.checkpoint import CheckpointError, read_sampling_defaults, write_sampling_defaults

    ckpt = Path(shutil.copytree(tiny_checkpoint(tmp_path.parent), tmp_path / "ckpt"))
    assert read_sampling_defaults(ckpt) is None
    write_sampling_defaults(ckpt, dataclasses.replace(DEFAULTS, seed=9))  # a seed is not a default
    assert json.loads((ckpt / "sampling.json").read_text()) == {
        "sampler": "ddim", "steps": 3, "eta": 0.5, "prior": "paper"
    }  # fmt: skip
    assert read_sampling_defaults(ckpt) == DEFAULTS
    (ckpt / "sampling.json").write_text(json.dumps({"sampler": "ddim", "steps": 3, "eta": 0.5}))
    with pytest.raises(CheckpointError, match="missing key 'prior'"):
        read_sampling_defaults(ckpt)


def test_export_sampling_section_defaults_to_the_matched_prior(tmp_path: Path) -> None:
    """What esrdf-export records when neither flags nor sampling.json say: the built-in rule, whose prior
    is the matched one wherever alpha_bar_T > 0; --prior paper records N(0, I)."""
    from esrdf.checkpoint import read_config
    from esrdf.export.bundle_writer import ExportError, sampling_section

    cfg = read_config(tiny_checkpoint(tmp_path.parent))
    built_in = sampling_section(cfg, SamplingOptions())
    assert (built_in.sampler, built_in.steps, built_in.eta, built_in.prior) == ("ddim", 50, 0.0, "matched")
    assert 0.0 < built_in.init_noise_std < 1.0  # the tiny preset keeps the paper's alpha_bar_T > 0
    paper = sampling_section(cfg, SamplingOptions(prior="paper"))
    assert (paper.prior, paper.init_noise_std) == ("paper", 1.0)
    with pytest.raises(ExportError, match="ddpm runs all T=200"):
        sampling_section(cfg, SamplingOptions("ddpm", 3))


@pytest.mark.slow
def test_esrdf_export_writes_flags_over_the_checkpoints_sampling_json(tmp_path: Path) -> None:
    from esrdf.checkpoint import write_sampling_defaults
    from esrdf.export.cli import main

    ckpt = Path(shutil.copytree(tiny_checkpoint(tmp_path.parent), tmp_path / "ckpt"))
    write_sampling_defaults(ckpt, DEFAULTS)
    out = tmp_path / "bundle"
    args = [
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--precision",
        "fp32",
        "--tile",
        "8",
        "--batch",
        "1",
        "-q",
    ]
    flags = ["--prior", "matched", "--steps", "5", "--no-torch-weights"]
    result = CliRunner().invoke(main, [*args, *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    section = load_bundle(out).manifest.sampling
    assert section is not None
    assert (section.sampler, section.steps, section.eta, section.prior) == ("ddim", 5, 0.5, "matched")
    bad = CliRunner().invoke(main, [*args, "--force", "--sampler", "ddpm", "--steps", "3"])
    assert bad.exit_code != 0 and "ddpm runs all T=200 steps" in bad.output
