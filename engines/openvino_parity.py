"""Which graphs of a bundle may run bf16 on this machine: measured on first use, then cached.

bf16 error depends on the CPU (AMX and AVX512_BF16 kernels round differently from the fp32 emulation), the
OpenVINO version and the graph, so it is measured where it runs, not at export. The bars are the table's
(``esrdf.runtime.tolerances``):

- ``BF16_GRAPH`` per graph, bf16 against OpenVINO f32 on the same inputs: LR tiles of the shipped photo
  (``esrdf.runtime.parity_inputs``) for the predictor; for the step, x_prev at each step of an f32 DDIM
  trajectory from those tiles (x_t, cond = P(lr), t, coefs and noise as the sampler feeds them, paper
  Eq. 6-7), so the step is judged on what it returns, at every noise level it sees.
- ``END_TO_END_BF16`` for the graphs that pass, together: the runtime's driver on a photo crop, with the
  same seeded noise, against all-f32, as PSNR on [0, 1] images, on one tile of the photo. Sampling is the
  default DDIM with at most ``E2E_MAX_STEPS`` steps: first use costs 36 step calls (about 10 s for the
  default model's 256x256 HR tiles on the 2-core dev VM, 30-60 s when it is loaded), once per machine.

A graph that misses its bar runs f32, the others bf16; if the mix then misses the end-to-end bar, both run
f32. The record (figures, bars, the precisions chosen) is written to the user cache under a digest of what
it depends on (OpenVINO version, CPU model and flags, both graphs' sha256, tile; not the thread count,
which changes rounding order only), and is what ``OpenVinoEngine.parity`` and ``esrdf-run -v`` show. It is
JSON at ``<cache>/openvino/parity/<digest>.json``; its ``precisions`` ({"predictor": "fp32"|"bf16",
"step": ...}) is what another runtime on the same machine (runtime/cpp's openvino backend) can read.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from esrdf.atomic import atomic_path
from esrdf.config import SamplingOptions
from esrdf.runtime.cpu_info import cpu_identity
from esrdf.runtime.driver import fixed_shape, upscale_array
from esrdf.runtime.graph_spec import GRAPH_ROLES, PREDICTOR, STEP
from esrdf.runtime.noise import noise_field
from esrdf.runtime.parity_inputs import photo_tiles
from esrdf.runtime.sampling import plan_steps
from esrdf.runtime.tolerances import BF16_GRAPH, END_TO_END_BF16, ParityBar
from esrdf.user_cache import user_cache_dir

if TYPE_CHECKING:
    from esrdf.engines.openvino_engine import OpenVinoEngine
    from esrdf.runtime.bundle import Bundle

PROCEDURE = 1  # bump when the measurement changes, so older records are measured again
GRAPH_TILES = 2  # photo tiles per graph measurement
STEP_TRAJECTORY = 4  # DDIM steps of the f32 trajectory the step graph is judged along
E2E_MAX_STEPS = 10
SEED = 0


def figures(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """median/max abs (in the graphs' [-1, 1] units), NaN/Inf count, PSNR on [0, 1] images."""
    cand, ref = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    nonfinite = int(cand.size - np.count_nonzero(np.isfinite(cand)))
    diff = np.abs(np.nan_to_num(cand, nan=np.inf) - ref)
    mse = float(np.mean((diff / 2.0) ** 2))  # [-1, 1] -> [0, 1]
    return {
        "median_abs": float(np.median(diff)),
        "max_abs": float(diff.max()),
        "nonfinite": nonfinite,
        "psnr_db": 100.0 if mse == 0.0 else min(100.0, -10.0 * math.log10(mse)),
    }


def passes(fig: dict[str, float], bar: ParityBar) -> bool:
    """NaN/Inf always fails; otherwise every bound the bar sets."""
    if fig["nonfinite"] or not math.isfinite(fig["max_abs"]):
        return False
    if bar.median_abs is not None and not fig["median_abs"] <= bar.median_abs:
        return False
    return bar.min_psnr_db is None or fig["psnr_db"] >= bar.min_psnr_db


def _shape(bundle: Bundle) -> tuple[int, int]:
    """(batch, LR tile) to measure at: what the graphs fix, else batch 1 at the export tile."""
    batch, tile = fixed_shape(bundle.manifest)
    return batch or 1, tile or bundle.manifest.export.tile


def _noise(k: int, batch: int, size: int, channels: int) -> np.ndarray:
    return np.stack([noise_field(SEED + i, k, 0, 0, size, size, channels) for i in range(batch)])


def graph_figures(f32: OpenVinoEngine, bf16: OpenVinoEngine, bundle: Bundle) -> dict[str, dict[str, float]]:
    """Per graph, bf16 against f32 on photo tiles and along an f32 trajectory (``BF16_GRAPH``'s inputs)."""
    m = bundle.manifest
    batch, tile = _shape(bundle)
    size = tile * m.scale
    lrs = [t[None] for t in photo_tiles(tile, GRAPH_TILES * batch)]
    lrs = [np.concatenate(lrs[i : i + batch]) for i in range(0, len(lrs), batch)]
    plan = plan_steps(m.schedule.array(), "ddim", min(STEP_TRAJECTORY, m.schedule.timesteps), 1.0)
    pred_out: list[tuple[np.ndarray, np.ndarray]] = []
    step_out: list[tuple[np.ndarray, np.ndarray]] = []
    for lr in lrs:
        coarse = f32.predictor(lr)
        pred_out.append((bf16.predictor(lr), coarse))
        x = _noise(0, batch, size, m.channels)
        for k in range(plan.num_steps):
            t = np.full(batch, plan.t[k], dtype=np.float32)
            coefs = np.repeat(plan.coefs[k : k + 1], batch, axis=0)
            z = _noise(k + 1, batch, size, m.channels)
            ref = f32.step(x, coarse, t, coefs, z)
            step_out.append((bf16.step(x, coarse, t, coefs, z), ref))
            x = ref
    return {
        role: figures(np.stack([c for c, _ in out]), np.stack([r for _, r in out]))
        for role, out in ((PREDICTOR, pred_out), (STEP, step_out))
    }


def end_to_end_figures(f32: OpenVinoEngine, mix: OpenVinoEngine, bundle: Bundle) -> dict[str, Any]:
    """The driver on one photo tile, same seed: the mix against all-f32 (``END_TO_END_BF16``)."""
    m = bundle.manifest
    batch, tile = _shape(bundle)
    crop = photo_tiles(tile, 1)[0]
    s = SamplingOptions().resolve(m.schedule.timesteps)
    steps = min(s.steps, E2E_MAX_STEPS)
    plan = plan_steps(m.schedule.array(), s.sampler, steps, s.eta)
    args: dict[str, Any] = {"seed": SEED, "tile": tile, "overlap": 0, "batch": batch}
    ref = upscale_array(f32, m, crop, plan, **args)
    out = upscale_array(mix, m, crop, plan, **args)
    return {
        **figures(out, ref),
        "sampler": s.sampler,
        "steps": steps,
        "eta": s.eta,
        "lr_size": list(crop.shape),
    }


def _record_path(bundle: Bundle, threads: int | None) -> Any:
    from esrdf.engines.openvino_engine import openvino_version

    graphs = {g.role: g.sha256 for g in bundle.manifest.graphs if g.precision == "fp32"}
    what = {
        "procedure": PROCEDURE,
        "openvino_version": openvino_version(),
        **cpu_identity(),
        "graphs": graphs,
        "shape": list(_shape(bundle)),
        "bars": {"bf16_graph": asdict(BF16_GRAPH), "end_to_end_bf16": asdict(END_TO_END_BF16)},
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    return user_cache_dir("openvino", "parity") / f"{digest}.json", what


def measure(bundle: Bundle, threads: int | None = None, graph_bar: ParityBar = BF16_GRAPH) -> dict[str, Any]:
    """Measure the bars on this machine and choose each graph's precision (no cache); ``graph_bar`` is
    ``BF16_GRAPH`` except where a test asks what a stricter bar would choose."""
    from esrdf.engines.openvino_engine import OpenVinoEngine

    paths = (bundle.graph_path(PREDICTOR, "fp32"), bundle.graph_path(STEP, "fp32"))
    start = time.perf_counter()
    f32 = OpenVinoEngine(*paths, threads=threads)
    bf16 = OpenVinoEngine(*paths, precisions=dict.fromkeys(GRAPH_ROLES, "bf16"), threads=threads)
    per_graph = graph_figures(f32, bf16, bundle)
    chosen = {role: "bf16" if passes(per_graph[role], graph_bar) else "fp32" for role in GRAPH_ROLES}
    reasons = {
        role: ("meets" if chosen[role] == "bf16" else "misses") + f" bf16_graph: median abs "
        f"{per_graph[role]['median_abs']:.3g} (bar {graph_bar.median_abs:g}), "
        f"{per_graph[role]['nonfinite']} NaN/Inf"
        for role in GRAPH_ROLES
    }
    e2e: dict[str, Any] | None = None
    if "bf16" in chosen.values():
        mix = bf16 if all(p == "bf16" for p in chosen.values()) else OpenVinoEngine(*paths, chosen, threads)
        e2e = end_to_end_figures(f32, mix, bundle)
        if not passes(e2e, END_TO_END_BF16):
            reasons = {r: f"{reasons[r]}; the mix misses end_to_end_bf16" for r in GRAPH_ROLES}
            chosen = dict.fromkeys(GRAPH_ROLES, "fp32")
    return {
        "precisions": chosen,
        "reasons": reasons,
        "graph_figures": per_graph,
        "end_to_end": e2e,
        "measure_seconds": round(time.perf_counter() - start, 2),
    }


def bf16_precisions(bundle: Bundle, threads: int | None = None) -> dict[str, Any]:
    """The cached record for this bundle on this machine, measured (and written) on first use."""
    path, what = _record_path(bundle, threads)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("key") == what:
                return {**record, "cached": True}
        except (OSError, json.JSONDecodeError):
            pass  # a damaged record is measured again and replaced
    record = {**measure(bundle, threads), "key": what}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {**record, "cached": False, "record_file": str(path)}
