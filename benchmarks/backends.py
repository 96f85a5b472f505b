"""The backends a benchmark compares, each opened behind one small runner interface.

A runner turns inputs into zero-argument callables for the three timed stages: one predictor pass, one
step, and one whole request (predictor, N steps, c + x, download, blend). Runtime backends run requests
through the runtime's own driver (``esrdf.runtime.driver.upscale_array``), so the figures are what a
service gets; ``eager`` runs the eager sampler of ``esrdf.diffusion.samplers`` instead, which is what a
user of the paper's code would run (its ``ddpm_sample`` is the reference procedure: ancestral DDPM over
all T steps, eager; paper Eq. 4-7).

A backend that cannot run here (no CUDA, no tensorrt, no fp16 graphs in the bundle, no bf16 in the CPU)
raises ``BackendSkipped`` with the reason; the suite records it and goes on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from esrdf.bench.machine import bf16_support
from esrdf.runtime.backends import open_engine
from esrdf.runtime.bundle import Bundle, BundleError
from esrdf.runtime.driver import upscale_array
from esrdf.runtime.engine import EngineError
from esrdf.runtime.graph_spec import GRAPH_ROLES, PREDICTOR, STEP
from esrdf.runtime.sampling import StepPlan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esrdf.runtime.engine import Engine

# name -> what it is (written into the report next to each backend's figures)
BACKENDS: dict[str, str] = {
    "eager": "eager PyTorch fp32: esrdf.diffusion.samplers (the paper code's procedure), no runtime",
    "torch": "runtime driver + torch engine, fp32 eager modules",
    "torch-bf16": "runtime driver + torch engine under CPU autocast bf16 (update fp32); CPU only",
    "torch-fp16": "runtime driver + torch engine fp16 (fp16 weights on CUDA; norms, update fp32); CUDA only",
    "torch-cuda-graph": "torch engine fp16, whole sampler loop in one CUDA graph; CUDA only",
    "onnxruntime": "runtime driver + onnxruntime, fp32 graphs",
    "onnxruntime-fp16": "runtime driver + onnxruntime, mixed fp16 graphs (norms, softmax, update fp32)",
    "openvino": "runtime driver + OpenVINO CPU, fp32 graphs, f32 inference",
    "openvino-bf16": "runtime driver + OpenVINO CPU, bf16 inference (precision hint) on both graphs",
    "openvino-auto": "runtime driver + OpenVINO CPU, bf16 per graph where it meets the bf16 bars here "
    "(what --backend auto runs on a bf16 CPU)",
    "tensorrt-graph": "TensorRT fp16 plans, whole sampler loop in one CUDA graph; CUDA + tensorrt only",
}
CUDA_ONLY = ("torch-fp16", "torch-cuda-graph", "tensorrt-graph")
Call = Callable[[], Any]


class BackendSkipped(RuntimeError):
    """This backend cannot run on this machine or bundle; the message says why (not an error)."""


class Runner(Protocol):
    name: str
    device: str
    precision: str

    def predictor_call(self, lr_tiles: np.ndarray) -> Call: ...

    def step_call(self, feeds: dict[str, np.ndarray]) -> Call: ...

    def request_call(self, lr_tiles: np.ndarray, plan: StepPlan) -> Call: ...


@dataclass
class EngineRunner:
    """A runtime engine driven by ``upscale_array``; ``graph_sampler`` makes requests CUDA-graph replays."""

    name: str
    engine: Engine
    bundle: Bundle
    device: str
    precision: str
    graph_sampler: Any = None  # esrdf.engines.cuda_graph.CudaGraphSampler

    def predictor_call(self, lr_tiles: np.ndarray) -> Call:
        lr = self.engine.upload(lr_tiles)
        return lambda: self.engine.predictor(lr)

    def step_call(self, feeds: dict[str, np.ndarray]) -> Call:
        args = [self.engine.upload(feeds[k]) for k in ("x_t", "cond", "t", "coefs", "noise")]
        return lambda: self.engine.step(*args)

    def request_call(self, lr_tiles: np.ndarray, plan: StepPlan) -> Call:
        """The B tiles side by side as one (C, h, B*w) image, cut back into exactly B tiles (overlap 0)."""
        batch, _c, tile, _w = lr_tiles.shape
        image = np.concatenate(list(lr_tiles), axis=2)
        graphs = self.graph_sampler
        sampler = None if graphs is None else graphs.batch_sampler_factory(batch)
        manifest = self.bundle.manifest
        return lambda: upscale_array(
            self.engine,
            manifest,
            image,
            plan,
            seed=0,
            tile=tile,
            overlap=0,
            batch=batch,
            sampler=sampler,
        )


@dataclass
class EagerRunner:
    """The eager sampler on torch modules: what the runtime replaces."""

    predictor: nn.Module
    unet: nn.Module
    alphas_cumprod: np.ndarray
    device: str
    name: str = "eager"
    precision: str = "fp32"
    _schedule: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from esrdf.diffusion.schedule import Schedule

        self._schedule = Schedule.from_alphas_cumprod(self.alphas_cumprod)
        self.predictor = self.predictor.float().to(self.device).eval()
        self.unet = self.unet.float().to(self.device).eval()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def predictor_call(self, lr_tiles: np.ndarray) -> Call:
        import torch

        lr = self._tensor(lr_tiles)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return self.predictor(lr)

        return run

    def step_call(self, feeds: dict[str, np.ndarray]) -> Call:
        """One iteration of the eager DDIM sampler: a U-Net call and the textbook update (Eq. 6-7)."""
        from esrdf.diffusion.samplers import ddim_sample, unet_eps_fn

        x_t, cond, noise = (self._tensor(feeds[k]) for k in ("x_t", "cond", "noise"))
        eps_fn = unet_eps_fn(self.unet)
        return lambda: ddim_sample(eps_fn, self._schedule, x_t, cond, 1, noises=[noise])

    def request_call(self, lr_tiles: np.ndarray, plan: StepPlan) -> Call:
        """The eager pipeline end to end: sample_residual_sr (Eq. 7), clamp, back to host numpy."""
        import torch

        from esrdf.diffusion.samplers import sample_residual_sr

        lr = self._tensor(lr_tiles)
        sampler: Literal["ddim", "ddpm"] = "ddpm" if plan.sampler == "ddpm" else "ddim"
        steps = None if sampler == "ddpm" else plan.num_steps

        def run() -> np.ndarray:
            generator = torch.Generator(device=self.device).manual_seed(0)
            _coarse, sr = sample_residual_sr(
                self.predictor,
                self.unet,
                self._schedule,
                lr,
                sampler=sampler,
                steps=steps,
                eta=plan.eta,
                generator=generator,
                prior="matched" if plan.prior == "matched" else "paper",
            )
            return sr.clamp(-1.0, 1.0).cpu().numpy()

        return run


class CpuBf16Engine:
    """The eager step/predictor modules under CPU autocast bf16 (convs and matmuls in bf16), update fp32.

    The torch engine refuses reduced precision on the CPU (its fp16 is CUDA only); this adapter exists so
    the CPU bf16 path can be measured against the parity bars before anyone makes it a product path.
    """

    name = "torch-bf16"

    def __init__(self, predictor: nn.Module, unet: nn.Module) -> None:
        import torch

        from esrdf.models.step_module import PredictorModule, StepModule

        self.device = torch.device("cpu")
        self._predictor = PredictorModule(predictor.float(), torch.bfloat16).eval()
        self._step = StepModule(unet.float(), torch.bfloat16).eval()

    def upload(self, array: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def download(self, array: Any) -> np.ndarray:
        return np.asarray(array.detach().float().numpy())

    def predictor(self, lr: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self._predictor(lr)

    def step(self, x_t: Any, cond: Any, t: Any, coefs: Any, noise: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self._step(x_t, cond, t, coefs, noise)


def eager_models(bundle: Bundle, ckpt: Path | None = None) -> tuple[nn.Module, nn.Module]:
    """(predictor, unet) from ``ckpt``, else from the torch weights the bundle carries (sha256-checked)."""
    if importlib.util.find_spec("torch") is None:
        raise BackendSkipped("torch is not installed")
    from esrdf.checkpoint import load_checkpoint

    if ckpt is None:  # the bundle's torch weights, whose sha256 load_bundle has checked
        if bundle.manifest.torch_weights is None:
            raise BackendSkipped(
                "the bundle carries no torch weights (exported with --no-torch-weights); pass --ckpt"
            )
        ckpt = (bundle.root / bundle.manifest.torch_weights.file).parent
    loaded = load_checkpoint(ckpt)
    if loaded.unet is None:
        raise BackendSkipped(f"{ckpt} is a predictor-only checkpoint")
    return loaded.predictor, loaded.unet


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise BackendSkipped(reason)


def _graph_sampler(engine: Engine, bundle: Bundle, device: str) -> Any:
    from esrdf.engines.cuda_graph import CudaGraphSampler

    return CudaGraphSampler(engine, bundle.manifest.channels, bundle.manifest.scale, device, use_graphs=True)


def open_runner(
    name: str,
    bundle: Bundle,
    device: str,
    threads: int | None = None,
    models: Callable[[], tuple[nn.Module, nn.Module]] | None = None,
) -> Runner:
    """The runner for backend ``name``; ``BackendSkipped`` (with the reason) where it cannot run here.

    ``models`` returns the eager (predictor, unet), for backends that need torch modules.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    _require(device == "cuda" or name not in CUDA_ONLY, f"{name} needs a CUDA device (running on {device})")
    _require(not (name == "torch-bf16" and device != "cpu"), "bf16 autocast is the CPU path; use torch-fp16")
    needs_torch = not name.startswith(("onnxruntime", "openvino"))
    _require(not needs_torch or importlib.util.find_spec("torch") is not None, "torch is not installed")
    get_models = models or (lambda: eager_models(bundle))
    try:
        return _open(name, bundle, device, threads, get_models)
    except (EngineError, ImportError) as exc:
        raise BackendSkipped(str(exc).split("\n")[0]) from exc


def _openvino_runner(name: str, bundle: Bundle, device: str, threads: int | None) -> Runner:
    """f32, bf16 on both graphs (unchecked: for timing), or the parity-checked per-graph mix."""
    _require(importlib.util.find_spec("openvino") is not None, "openvino is not installed")
    _require(device == "cpu", "the OpenVINO engine runs on the CPU")
    if name == "openvino":
        return EngineRunner(
            name, open_engine(bundle, "openvino", device, "fp32", threads), bundle, device, "fp32"
        )
    native, evidence = bf16_support()
    _require(native, f"no native bf16 on this CPU ({evidence})")
    if name == "openvino-auto":
        engine = open_engine(bundle, "openvino", device, "bf16", threads)
        mix = "/".join(engine.precisions[r] for r in GRAPH_ROLES)
        return EngineRunner(name, engine, bundle, device, f"{mix} (predictor/step)")
    from esrdf.engines.openvino_engine import OpenVinoEngine

    paths = (bundle.graph_path(PREDICTOR, "fp32"), bundle.graph_path(STEP, "fp32"))
    engine = OpenVinoEngine(*paths, dict.fromkeys(GRAPH_ROLES, "bf16"), threads)
    return EngineRunner(name, engine, bundle, device, "bf16")


def _open(
    name: str,
    bundle: Bundle,
    device: str,
    threads: int | None,
    models: Callable[[], tuple[nn.Module, nn.Module]],
) -> Runner:
    if name == "eager":
        predictor, unet = models()
        return EagerRunner(predictor, unet, bundle.manifest.schedule.array(), device)
    if name.startswith("onnxruntime"):
        precision = "fp16" if name.endswith("fp16") else "fp32"
        _require(
            precision in bundle.precisions(),
            f"the bundle has no {precision} graphs (re-export with esrdf-export --precision both)",
        )
        engine = open_engine(bundle, "onnxruntime", device, precision, threads)
        return EngineRunner(name, engine, bundle, device, precision)
    if name.startswith("openvino"):
        return _openvino_runner(name, bundle, device, threads)
    if name == "torch":
        return EngineRunner(name, open_engine(bundle, "torch", device, "fp32"), bundle, device, "fp32")
    if name == "torch-bf16":
        native, evidence = bf16_support()
        _require(native, f"no native bf16 on this CPU ({evidence})")
        return EngineRunner(name, CpuBf16Engine(*models()), bundle, device, "bf16")
    if name in ("torch-fp16", "torch-cuda-graph"):
        from esrdf.engines.torch_engine import TorchEngine

        engine = TorchEngine(*models(), device=device, precision="fp16")
        sampler = _graph_sampler(engine, bundle, device) if name == "torch-cuda-graph" else None
        return EngineRunner(name, engine, bundle, device, "fp16", sampler)
    try:  # tensorrt-graph
        engine = open_engine(bundle, "tensorrt", device, "fp16")
    except BundleError as exc:  # no plan for this GPU in the bundle: a missing backend, not a failure
        raise BackendSkipped(f"{str(exc).splitlines()[0]}") from exc
    return EngineRunner(name, engine, bundle, device, "fp16", _graph_sampler(engine, bundle, device))
