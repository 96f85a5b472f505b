"""ESRDF whole-image model for Triton's Python backend: the runtime's sampler loop over BLS calls.

Written into a Triton model repository by ``esrdf-export --triton-repo`` (``esrdf.export.triton_repo``),
next to ``manifest.json`` (the bundle's: scale, size rules and the noise schedule, alphas_cumprod). Per
request (paper Section 3 with the residual formulation of Section 4):

    tiles of the LR image  ->  c = esrdf_predictor(lr)  ->  x = z_0
    x = esrdf_step(x, c, t_k, coefs_k, z_{k+1})   for the N steps of the plan (Eq. 6-7, affine form)
    blend c + x over the tiles  ->  HR image

This is ``esrdf.runtime.driver.upscale_array`` itself, driven through ``BlsEngine``, whose ``predictor`` and
``step`` are ``pb_utils.InferenceRequest``s to the TensorRT (or onnxruntime) models; the step
coefficients come from the manifest's schedule via ``esrdf.runtime.sampling.plan_for``, and the noise
is the runtime's seeded counter-based field, so a request's output matches ``esrdf-run`` with the same
seed, steps and tiling. The Python environment Triton runs this in needs ``pip install esrdf`` (numpy and
pillow; no torch).

Inputs: ``image`` UINT8 [H, W, 3]; optional ``seed`` UINT64 [1], ``steps`` INT32 [1], ``sampler`` BYTES [1]
("ddim" | "ddpm"), ``eta`` FP32 [1], ``prior`` BYTES [1] ("matched" | "paper"); what a request leaves
out comes from the manifest's sampling defaults. Output: ``image`` UINT8 [scale*H, scale*W, 3]. A bad
request gets an error response of its own; the other requests of the batch are unaffected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esrdf.runtime.bundle import MANIFEST_NAME, Manifest
from esrdf.runtime.driver import engine_batches, fixed_batches, upscale_array
from esrdf.runtime.engine import BatchSampler, NoiseFn, Tick
from esrdf.runtime.images import DEFAULT_MAX_PIXELS, from_model_range, to_model_range
from esrdf.runtime.sampling import StepPlan, plan_for
from esrdf.runtime.serving.triton_models import decode_image_request

INPUT_NAMES = ("image", "seed", "steps", "sampler", "eta", "prior")


@dataclass(frozen=True)
class BlsSettings:
    """The ``parameters`` of the model's config.pbtxt (written by ``esrdf.export.triton_repo``)."""

    tile: int
    overlap: int
    batch: int
    pad_batch: bool  # static-shape plans take exactly ``batch`` rows per call
    batched: bool  # the engine models have max_batch_size > 0 (then ``t`` is sent as [B, 1])
    predictor_model: str = "esrdf_predictor"
    step_model: str = "esrdf_step"
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> BlsSettings:
        def flag(name: str) -> bool:
            return params[name].lower() == "true"

        return cls(
            tile=int(params["tile"]), overlap=int(params["overlap"]), batch=int(params["batch"]),
            pad_batch=flag("pad_batch"), batched=flag("batched"),
            predictor_model=params.get("predictor_model", "esrdf_predictor"),
            step_model=params.get("step_model", "esrdf_step"),
            max_pixels=int(params.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )  # fmt: skip


def upscale_request(
    engine: Any, manifest: Manifest, settings: BlsSettings, request: Mapping[str, Any]
) -> np.ndarray:
    """One request's inputs (name -> array) -> the HR image, H x W x 3 uint8, with any ``Engine``."""
    req = decode_image_request(request)
    height, width = req.rgb.shape[:2]
    if height * width > settings.max_pixels:
        raise ValueError(
            f"image has {height * width:,} pixels, over this model's limit of {settings.max_pixels:,}"
        )
    o = req.options.resolve(manifest.schedule.timesteps, manifest.sampling_defaults())
    plan = plan_for(manifest.schedule.array(), o)

    def padded_batches(plan: StepPlan, noise: NoiseFn, tick: Tick) -> BatchSampler:
        return fixed_batches(engine_batches(engine, plan, noise, tick), settings.batch)

    hr = upscale_array(
        engine, manifest, to_model_range(req.rgb), plan, seed=o.seed, tile=settings.tile,
        overlap=settings.overlap, batch=settings.batch,
        sampler=padded_batches if settings.pad_batch else None,
    )  # fmt: skip
    return from_model_range(hr)


class BlsEngine:
    """``esrdf.runtime.engine.Engine`` over BLS calls to the predictor and step models (host arrays)."""

    name = "triton-bls"

    def __init__(self, pb_utils: Any, settings: BlsSettings) -> None:
        self.pb = pb_utils
        self.settings = settings

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.float32)

    def download(self, array: Any) -> np.ndarray:
        return np.asarray(array, dtype=np.float32)

    def _call(self, model: str, inputs: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=model,
            inputs=[pb.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            requested_output_names=[output],
            # The driver blends on the host: ask for CPU outputs (TensorRT would leave them on the GPU).
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return pb.get_output_tensor_by_name(response, output).as_numpy()

    def predictor(self, lr: np.ndarray) -> np.ndarray:
        return self._call(self.settings.predictor_model, {"lr": lr}, "coarse")

    def step(
        self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coefs: np.ndarray, noise: np.ndarray
    ) -> np.ndarray:
        if self.settings.batched:
            t = t.reshape(-1, 1)  # config: dims [1], reshape to the graph's per-row scalar
        inputs = {"x_t": x_t, "cond": cond, "t": t, "coefs": coefs, "noise": noise}
        return self._call(self.settings.step_model, inputs, "x_prev")


class TritonPythonModel:
    """The Python backend's entry points: ``initialize`` per instance, ``execute`` per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only importable inside Triton's Python backend

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.settings = BlsSettings.from_parameters(params)
        manifest_path = Path(args["model_repository"]) / args["model_version"] / MANIFEST_NAME
        self.manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"))
        self.engine = BlsEngine(pb_utils, self.settings)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses = []
        for request in requests:
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                rgb = upscale_request(self.engine, self.manifest, self.settings, inputs)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("image", rgb)]))
            except Exception as exc:  # noqa: BLE001 - the error belongs to this request alone
                error = pb.TritonError(f"{type(exc).__name__}: {exc}")
                responses.append(pb.InferenceResponse(output_tensors=[], error=error))
        return responses
