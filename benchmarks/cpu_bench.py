"""The reproducible CPU benchmark behind the README results section: one command, JSON + plots + tables.

    .venv/bin/python -m esrdf.bench.cpu_bench    # writes out/bench/ (git-ignored); 10-14 min, 2-core VM

It builds checkpoints, exports bundles (fp32 + mixed fp16) with ``esrdf-export``'s function, and runs
``esrdf-bench`` (printed, so each step can be re-run alone) on three models:

- ``paper``: the paper's networks (2.38M-parameter predictor, 97.8M-parameter U-Net) with seeded random
  weights (latency does not depend on them), 32 px LR / 128 px HR tiles, batch 1, every CPU backend and
  the CPU settings search (onnxruntime, torch and OpenVINO candidates);
- ``small``: the ``small`` preset, random weights, 32 px LR / 128 px HR tiles, batch search 1, 2, 4, and
  the paper code's reference procedure (eager DDPM over all T = 200 steps);
- ``default``: the shipped trained model (``esrdf.default_model``) when present: latency (batch search
  1, 2, 4; eager, onnxruntime and the three OpenVINO rows) and quality (PSNR, SSIM, LPIPS against steps
  on the held-out photos) of a real checkpoint.

Then it gathers the markdown tables into ``out/bench/RESULTS.md``. Bundles are cached under
``out/bench/work/`` (``--rebuild`` re-exports). ``--quick`` is a smoke run of the whole pipeline (minutes).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = "eager,torch,torch-bf16,onnxruntime,onnxruntime-fp16,openvino,openvino-bf16,openvino-auto"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    p.add_argument("--rebuild", action="store_true", help="re-create checkpoints and re-export bundles")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few repeats, no paper model")
    p.add_argument("--models", default="paper,small,default", help="which of paper,small,default to run")
    p.add_argument(
        "--no-quality", action="store_true", help="latency only: skip the default model's quality sweep"
    )
    # One thread by default: the README's numbers come from a 2-core VM shared with other jobs, where two
    # spinning thread pools (onnxruntime's, OpenMP's) slowed single calls up to 20x when another process ran.
    p.add_argument("--threads", type=int, default=1, help="threads for every backend; 0: all usable CPUs")
    return p.parse_args(argv)


def shipped_checkpoint() -> Path | None:
    """The shipped trained checkpoint, or None where the package has none."""
    try:
        from esrdf.default_model import default_checkpoint_dir

        return default_checkpoint_dir()
    except (ImportError, FileNotFoundError) as exc:
        print(f"default model: skipped ({exc})", flush=True)
        return None


def _same_weights(a: Path, b: Path) -> bool:
    from esrdf.runtime.bundle import sha256_file

    files = [p / "model.safetensors" for p in (a, b)]
    return all(f.is_file() for f in files) and sha256_file(files[0]) == sha256_file(files[1])


def bundle_for(name: str, work: Path, tile: int, rebuild: bool) -> tuple[Path, Path] | None:
    """(checkpoint, bundle) of model ``name`` (a preset, or "default"), exported once per tile and cached."""
    from esrdf.export.bundle_writer import export_bundle

    ckpt, bundle = work / f"{name}_ckpt", work / f"{name}_t{tile}_bundle"
    source = shipped_checkpoint() if name == "default" else None
    if name == "default" and source is None:
        return None
    stale = source is not None and not _same_weights(source, ckpt)  # the shipped model was retrained
    if rebuild or stale:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
    if (bundle / "manifest.json").is_file() and (ckpt / "config.json").is_file():
        return ckpt, bundle
    if not (ckpt / "config.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        if source is not None:
            shutil.copytree(source, ckpt)
        else:
            from esrdf.bench.random_model import random_checkpoint
            from esrdf.config import preset

            random_checkpoint(ckpt, preset(name))
    print(f"exporting {name} (fp32 + fp16) -> {bundle}", flush=True)
    export_bundle(ckpt, bundle, precision="both", tile=tile, batch=1, force=True, progress=False)
    return ckpt, bundle


@dataclass(frozen=True)
class ModelRun:
    tile: int  # LR tile
    args: tuple[str, ...]  # esrdf-bench arguments
    backends: str = BACKENDS


def plans(quick: bool, quality_sweep: bool = True) -> dict[str, ModelRun]:
    """Per model: LR tile and esrdf-bench arguments, sized so the whole run fits ~10 min on 2 CPU cores."""
    if quick:
        common: tuple[str, ...] = ("--repeats", "3", "--warmup", "1", "--max-seconds", "2", "--steps", "1,4")
        quality: tuple[str, ...] = (
            "--quality",
            "--quality-steps",
            "1,4",
            "--quality-max-size",
            "64",
            "--no-ddpm-quality",
        )
        return {
            "small": ModelRun(8, (*common, "--batch", "1,2", "--reference")),
            "default": ModelRun(16, (*common, *quality), "eager,onnxruntime"),
        }
    common = ("--repeats", "5", "--warmup", "1", "--max-seconds", "5")
    quality = (
        "--quality",
        "--quality-steps",
        "1,2,5,10,20,50",
        "--quality-eta",
        "0,1",
        "--quality-max-size",
        "128",
    )
    quality = quality if quality_sweep else ()
    return {
        # 32 px LR / 128 px HR: the size of the paper-step goal (issue 13); the eager DDPM-over-T reference
        # (200 steps at ~0.4 s) is timed on the small model only, to keep the run near its budget.
        "paper": ModelRun(32, (*common, "--steps", "1,4", "--batch", "1", "--cpu-tuning")),
        "small": ModelRun(32, (*common, "--steps", "1,4,10,20", "--batch", "1,2,4", "--reference")),
        "default": ModelRun(
            32,
            (*common, "--steps", "1,4,10,20", "--batch", "1,2,4", *quality),
            "eager,onnxruntime,onnxruntime-fp16,openvino,openvino-bf16,openvino-auto",
        ),
    }


def run_bench(name: str, ckpt: Path, bundle: Path, run: ModelRun, out: Path, threads: int | None) -> bool:
    cmd = [sys.executable, "-m", "esrdf.bench.cli", "--engine", str(bundle), "--ckpt", str(ckpt)]
    cmd += ["--backends", run.backends, "--tile", str(run.tile), *run.args]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--json", str(out / f"{name}.json"), "--plot", str(out / f"{name}_latency.png")]
    print("\n$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    return done.returncode == 0


def gather(out: Path, names: list[str], seconds: float, command: str) -> Path:
    """One markdown file: every model's tables in ``out`` (this run's and earlier ones), plots, command."""
    parts = [
        f"# ESRDF CPU benchmark\n\nReproduce: `{command}` ({seconds / 60:.1f} min for {', '.join(names)}).\n"
    ]
    for name in ("paper", "small", "default"):
        md = out / f"{name}.json"
        if md.with_suffix(".md").is_file():
            parts.append(f"## {name}\n\n![latency]({name}_latency.png)\n")
            if (out / f"{name}_latency.quality.png").is_file():
                parts.append(f"![quality]({name}_latency.quality.png)\n")
            parts.append(md.with_suffix(".md").read_text())
    path = out / "RESULTS.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    wanted = [m for m in args.models.split(",") if m]
    ran: list[str] = []
    failed: list[str] = []
    for name, run in plans(args.quick, not args.no_quality).items():
        if name not in wanted:
            continue
        pair = bundle_for(name, work, run.tile, args.rebuild)
        if pair is not None:
            (ran if run_bench(name, *pair, run, args.out, args.threads) else failed).append(name)
    command = "python -m esrdf.bench.cpu_bench" + (" --quick" if args.quick else "")
    results = gather(args.out, ran, time.monotonic() - start, command)
    print(f"\nwrote {results}; {len(ran)} model(s) benchmarked, failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
