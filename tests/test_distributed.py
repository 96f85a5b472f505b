"""A real 2-process data-parallel run (torchrun, gloo on the CPU): both ranks end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from esrdf.checkpoint import load_checkpoint, load_training_state
from esrdf.data import load_rgb

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    from safetensors.torch import save_file
    from esrdf.config import preset
    from esrdf.training.config import train_preset
    from esrdf.training.diffusion import train_diffusion
    from esrdf.training.predictor import train_predictor

    photos, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")  # the trainers join this group instead of creating their own
    rank = dist.get_rank()
    tiny = preset("tiny")
    pred_cfg = train_preset("tiny", "predictor").replace(steps=3, batch=4, crop=32)
    pred = train_predictor(photos, out / "pred", tiny, pred_cfg, progress=False)
    diff_cfg = train_preset("tiny", "diffusion").replace(steps=3, batch=4, crop=32, ema_decay=0.5)
    diff = train_diffusion(photos, out / "pred", out / "diff", diff_cfg, progress=False)
    state = {}
    for name, module in ({"trained_predictor": pred.modules["predictor"]} | diff.modules).items():
        state |= {f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"pred": pred.losses, "diff": diff.losses}))
    dist.destroy_process_group()
    """
)


@pytest.fixture()
def photo_folder(tmp_path: Path, training_photos: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(training_photos[:4]):
        Image.fromarray(load_rgb(path, max_side=192)).save(folder / f"photo{i}.png")
    return folder


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical(photo_folder: Path, tmp_path: Path) -> None:
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(script),
        str(photo_folder),
        str(out),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks differ in {different[:5]}"
    # Each rank trained on its own shard: their per-rank losses differ.
    losses = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0]["pred"] != losses[1]["pred"] and losses[0]["diff"] != losses[1]["diff"]
    assert all(np.isfinite(losses[0]["diff"]))
    # Rank 0's checkpoints hold exactly those weights.
    pred = load_checkpoint(out / "pred").predictor.state_dict()
    assert all(torch.equal(v, rank0[f"trained_predictor.{k}"]) for k, v in pred.items())
    diff = load_checkpoint(out / "diff", use_ema=False)
    assert diff.unet is not None
    assert all(torch.equal(v, rank0[f"unet.{k}"]) for k, v in diff.unet.state_dict().items())
    assert load_training_state(out / "diff").meta["world_size"] == 2
