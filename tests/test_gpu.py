"""The GPU path: the whole sampler loop in one CUDA graph, the fp16 torch CUDA engine, device noise.

gpu-marked tests need CUDA and skip with a reason elsewhere (``benchmarks/gpu_check.sh`` runs them). The
unmarked tests check, on the CPU, the parts of ``esrdf.engines.cuda_graph`` that need no GPU: the torch
port of the counter-based noise, shape keys, buffer generations, stream execution against the driver's
loop, and the capture-failure fallback (a CPU build of torch cannot capture, a real failure).
All inputs are crops of real photos; models are the ``tiny`` preset with seeded random weights.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from esrdf.bench.random_model import random_models
from esrdf.config import preset
from esrdf.diffusion.samplers import ddim_sample, unet_eps_fn
from esrdf.diffusion.schedule import make_schedule
from esrdf.engines.cuda_graph import (
    CudaGraphSampler,
    ShapeKey,
    StaticBuffers,
    capture_sampler_graph,
    seed_tensor,
    torch_noise_field,
)
from esrdf.engines.torch_cuda_engine import TorchCudaEngine
from esrdf.engines.torch_engine import TorchEngine
from esrdf.export.parity import bar_failures, compare
from esrdf.runtime import driver
from esrdf.runtime.bundle import FORMAT_VERSION, ExportSettings, Manifest, ScheduleEntry
from esrdf.runtime.noise import noise_bits, noise_field
from esrdf.runtime.sampling import StepPlan, plan_steps
from esrdf.runtime.tolerances import END_TO_END_FP16, END_TO_END_FP32, FP16_GRAPH

CFG = preset("tiny")
SCALE, CHANNELS = CFG.scale, CFG.predictor.in_channels
SEED = 20260193


@pytest.fixture(scope="module")
def modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    return random_models(CFG)


@pytest.fixture(scope="module")
def alphas_cumprod() -> np.ndarray:
    return np.asarray(make_schedule(CFG.schedule).alphas_cumprod, dtype=np.float64)


def lr_tiles(photo: np.ndarray, batch: int, height: int, width: int) -> np.ndarray:
    """(B, C, h, w) float32 tiles in [-1, 1], cut from a real photo at spread-out places."""
    ys = np.linspace(0, photo.shape[0] - height, batch).astype(int)
    xs = np.linspace(0, photo.shape[1] - width, batch).astype(int)[::-1]
    crops = [photo[y : y + height, x : x + width] for y, x in zip(ys, xs, strict=True)]
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def hr_offsets(batch: int, height: int, width: int) -> np.ndarray:
    """(B, 2) HR (y0, x0) of each tile in a notional canvas: side by side, as the driver's tiles are."""
    return np.array([[0, b * width * SCALE] for b in range(batch)], dtype=np.int64)


def noise_fields(plan: StepPlan, offsets: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N+1, B, C, H, W) counter-based noise, x_T first: what the driver feeds a batch."""
    h, w = height * SCALE, width * SCALE
    return np.stack(
        [
            np.stack([noise_field(SEED, k, y0, x0, h, w, CHANNELS) for y0, x0 in offsets])
            for k in range(plan.num_steps + 1)
        ]
    )


def loop_by_engine_calls(
    engine: TorchEngine, lr: np.ndarray, noises: np.ndarray, plan: StepPlan
) -> np.ndarray:
    """The driver's own loop (``driver.engine_batches``): one engine call per step, coarse + x on the host."""
    coarse = engine.predictor(engine.upload(lr))
    x = engine.upload(noises[0])
    batch = lr.shape[0]
    for k in range(plan.num_steps):
        t = engine.upload(np.full(batch, plan.t[k], dtype=np.float32))
        coefs = engine.upload(np.repeat(plan.coefs[k : k + 1], batch, axis=0))
        x = engine.step(x, coarse, t, coefs, engine.upload(noises[k + 1]))
    return engine.download(coarse) + engine.download(x)


# --- CPU: the noise port ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, SEED, 2**64 - 1])
def test_torch_noise_port_reproduces_numpy_hash_bit_for_bit(seed):
    offsets = np.array([[0, 0], [200, 3], [4096, 70001]], dtype=np.int64)
    y0, x0 = torch.from_numpy(offsets[:, 0]), torch.from_numpy(offsets[:, 1])
    for step in (0, 1, 37):
        got = torch_noise_field(seed_tensor(seed), step, y0, x0, 48, 40, CHANNELS).numpy()
        for b, (y, x) in enumerate(offsets):
            want = noise_field(seed, step, int(y), int(x), 48, 40, CHANNELS)
            # The hash is integer arithmetic (exact); float64 log/cos may differ from numpy's libm by an
            # ulp, which changes the float32 result only in rare rounding ties.
            assert np.mean(got[b] != want) <= 1e-3
            assert np.max(np.abs(got[b] - want)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(want))
    assert noise_bits(seed, 1, 0, 0, 2, 2, CHANNELS).dtype == np.uint64


def test_seed_tensor_refuses_seeds_outside_uint64():
    with pytest.raises(ValueError, match="seed"):
        seed_tensor(2**64)
    with pytest.raises(ValueError, match="seed"):
        seed_tensor(-1)


# --- CPU: shape keys, buffers, stream execution, fallback ------------------------------------------------


def test_shape_key_tells_apart_everything_a_graph_bakes_in(alphas_cumprod):
    plan = plan_steps(alphas_cumprod, "ddim", 4, 0.0)
    base = ShapeKey.of((2, 3, 16, 16), plan)
    assert base == ShapeKey(2, 16, 16, 4, "ddim", 0.0, "host")
    others = [
        ShapeKey.of((1, 3, 16, 16), plan),
        ShapeKey.of((2, 3, 16, 24), plan),
        ShapeKey.of((2, 3, 16, 16), plan_steps(alphas_cumprod, "ddim", 5, 0.0)),
        ShapeKey.of((2, 3, 16, 16), plan_steps(alphas_cumprod, "ddim", 4, 1.0)),
        ShapeKey.of((2, 3, 16, 16), plan_steps(alphas_cumprod, "ddpm")),
        ShapeKey.of((2, 3, 16, 16), plan, "device"),
    ]
    assert len({base, *others}) == 1 + len(others)


def test_reallocating_static_buffers_bumps_their_generation():
    bufs = StaticBuffers(ShapeKey(2, 8, 12, 3, "ddim", 0.0), CHANNELS, SCALE, torch.device("cpu"))
    assert bufs.tensors["noise"].shape == (4, 2, CHANNELS, 32, 48)
    assert bufs.tensors["coefs"].shape == (3, 2, 3)
    first, before = bufs.generation, bufs.tensors["lr"]
    bufs.reallocate()
    assert bufs.generation == first + 1
    assert bufs.tensors["lr"] is not before


def test_cache_keeps_at_most_max_graphs_keys(modules, alphas_cumprod, photos):
    engine = TorchEngine(*modules, device="cpu")
    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu", max_graphs=1)
    for steps in (2, 3):
        plan = plan_steps(alphas_cumprod, "ddim", steps)
        lr = lr_tiles(photos["astronaut"], 1, 8, 8)
        sampler.sample(lr, noise_fields(plan, hr_offsets(1, 8, 8), 8, 8), plan)
    assert list(sampler._entries) == [ShapeKey(1, 8, 8, 3, "ddim", 0.0)]
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu", max_graphs=0)


@pytest.mark.parametrize(
    ("batch", "height", "width", "steps", "eta"), [(2, 16, 16, 3, 0.0), (3, 12, 20, 2, 1.0)]
)
def test_stream_execution_equals_the_drivers_engine_calls(
    modules, alphas_cumprod, photos, batch, height, width, steps, eta
):
    engine = TorchEngine(*modules, device="cpu")
    plan = plan_steps(alphas_cumprod, "ddim", steps, eta)
    lr = lr_tiles(photos["astronaut"], batch, height, width)
    offsets = hr_offsets(batch, height, width)
    noises = noise_fields(plan, offsets, height, width)
    want = loop_by_engine_calls(engine, lr, noises, plan)
    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu")
    assert np.array_equal(sampler.sample(lr, noises, plan), want)
    # Device-drawn noise: the torch port of the same counter-based field.
    np.testing.assert_allclose(sampler.sample_seeded(lr, SEED, offsets, plan), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="noises must be"):
        sampler.sample(lr, noises[:-1], plan)


def test_failed_capture_ends_it_and_falls_back_with_one_warning(modules, alphas_cumprod, photos, caplog):
    engine = TorchEngine(*modules, device="cpu")
    plan = plan_steps(alphas_cumprod, "ddim", 2)
    lr = lr_tiles(photos["astronaut"], 2, 8, 8)
    noises = noise_fields(plan, hr_offsets(2, 8, 8), 8, 8)
    want = loop_by_engine_calls(engine, lr, noises, plan)

    bufs = StaticBuffers(ShapeKey.of(lr.shape, plan), CHANNELS, SCALE, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="esrdf.engines.cuda_graph"):
        assert capture_sampler_graph(engine, bufs) is None  # a CPU build of torch cannot capture
    assert "capture failed" in caplog.text

    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu")
    sampler.use_graphs = True  # make it try, as on a GPU whose capture fails
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esrdf.engines.cuda_graph"):
        first = sampler.sample(lr, noises, plan)
        second = sampler.sample(lr, noises, plan)
    assert np.array_equal(first, want) and np.array_equal(second, want)
    assert sampler.captures == 0
    assert caplog.text.count("capture failed") == 1  # the key stays on stream execution, no retry per call


def test_graph_batch_sampler_is_a_drop_in_for_the_drivers_engine_calls(modules, alphas_cumprod, photos):
    engine = TorchEngine(*modules, device="cpu")
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_name=CFG.name,
        scale=SCALE,
        channels=CHANNELS,
        hr_multiple_of=CFG.unet.multiple_of,
        value_range=[-1.0, 1.0],
        schedule=ScheduleEntry(
            kind="linear", timesteps=len(alphas_cumprod), alphas_cumprod=alphas_cumprod.tolist()
        ),
        graphs=[],
        export=ExportSettings(checkpoint="none", tile=16, batch=2),
    )
    photo = photos["coffee"][100:130, 200:246]  # 30x46: 3x4 tiles of 16, a partial last batch of 5
    lr = photo.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    plan = plan_steps(alphas_cumprod, "ddim", 3, 0.3)
    kwargs = dict(seed=5, tile=16, overlap=4, batch=5)

    def padded_engine_calls(plan, noise, tick):  # the driver's own loop at the same fixed batch of 5
        return driver.fixed_batches(driver.engine_batches(engine, plan, noise, tick), 5)

    want = driver.upscale_array(engine, manifest, lr, plan, **kwargs, sampler=padded_engine_calls)
    graphs = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu")
    ticks: list[tuple[int, int]] = []
    got = driver.upscale_array(
        engine, manifest, lr, plan, **kwargs, sampler=graphs.batch_sampler_factory(5),
        progress=lambda done, total: ticks.append((done, total)),
    )  # fmt: skip
    assert got.shape == (CHANNELS, 120, 184)
    assert np.array_equal(got, want)
    # 12 tiles in batches of 5, 5, 2 (padded to 5): 3 replays, 4 ticks each, as the driver's loop counts.
    assert ticks == [(k, 12) for k in range(1, 13)]
    assert list(graphs._entries) == [ShapeKey(5, 16, 16, 3, "ddim", 0.3)]  # one shape key: padded to 5


# --- GPU -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_engines(modules) -> dict[str, TorchEngine]:
    # TorchEngine moves the modules it is given; copies keep the fixture's modules on the CPU for the
    # eager reference.
    return {
        "fp32": TorchEngine(*(copy.deepcopy(m) for m in modules), device="cuda", precision="fp32"),
        "fp16": TorchCudaEngine(*modules, device="cuda", precision="fp16"),
    }


GRAPH_CASES = [  # precision, batch, LR tile h x w, sampler, steps, eta, noise mode
    ("fp16", 1, 16, 16, "ddim", 4, 0.0, "host"),
    ("fp16", 4, 16, 16, "ddim", 10, 1.0, "device"),
    ("fp32", 3, 12, 20, "ddim", 5, 0.5, "host"),
    ("fp16", 2, 8, 8, "ddpm", None, 0.0, "host"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("precision", "batch", "height", "width", "sampler", "steps", "eta", "noise"), GRAPH_CASES
)
def test_graph_replay_is_bit_exact_with_stream_execution(
    cuda_engines, alphas_cumprod, photos, precision, batch, height, width, sampler, steps, eta, noise
):
    engine = cuda_engines[precision]
    plan = plan_steps(alphas_cumprod, sampler, steps, eta)
    lr = lr_tiles(photos["astronaut"], batch, height, width)
    offsets = hr_offsets(batch, height, width)
    graphed = CudaGraphSampler(engine, CHANNELS, SCALE, device="cuda")
    streamed = CudaGraphSampler(engine, CHANNELS, SCALE, device="cuda", use_graphs=False)
    if noise == "host":
        noises = noise_fields(plan, offsets, height, width)
        runs = [s.sample(lr, noises, plan) for s in (graphed, graphed, streamed)]
    else:
        runs = [s.sample_seeded(lr, SEED, offsets, plan) for s in (graphed, graphed, streamed)]
    assert graphed.captures == 1
    assert np.all(np.isfinite(runs[0]))
    assert np.array_equal(runs[0], runs[2]), "graph replay differs from stream execution"
    assert np.array_equal(runs[1], runs[2]), "a second replay differs"


@pytest.mark.gpu
def test_reallocated_buffers_are_recaptured_never_replayed_stale(cuda_engines, alphas_cumprod, photos):
    engine = cuda_engines["fp16"]
    plan = plan_steps(alphas_cumprod, "ddim", 3)
    lr = lr_tiles(photos["astronaut"], 2, 16, 16)
    noises = noise_fields(plan, hr_offsets(2, 16, 16), 16, 16)
    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cuda")
    want = sampler.sample(lr, noises, plan)
    sampler._entries[ShapeKey.of(lr.shape, plan)].bufs.reallocate()
    assert np.array_equal(sampler.sample(lr, noises, plan), want)
    assert sampler.captures == 2


@pytest.mark.gpu
def test_fp16_weights_engine_is_bit_identical_to_autocast_engine(modules, cuda_engines, photos):
    autocast = TorchEngine(*(copy.deepcopy(m) for m in modules), device="cuda", precision="fp16")
    lr = torch.from_numpy(lr_tiles(photos["astronaut"], 2, 16, 16)).cuda()
    assert torch.equal(cuda_engines["fp16"].predictor(lr), autocast.predictor(lr))
    assert next(cuda_engines["fp16"]._step.unet.parameters()).dtype == torch.float16
    assert next(modules[1].parameters()).dtype == torch.float32  # the caller's modules are untouched


@pytest.mark.gpu
def test_fp16_cuda_graphs_meet_the_fp16_bars_against_fp32_eager(cuda_engines, alphas_cumprod, photos):
    fp32, fp16 = cuda_engines["fp32"], cuda_engines["fp16"]
    plan = plan_steps(alphas_cumprod, "ddim", 10, 0.0)
    for name in ("astronaut", "chelsea", "rocket"):
        lr = torch.from_numpy(lr_tiles(photos[name], 2, 16, 24)).cuda()
        coarse = fp32.predictor(lr)
        fails = bar_failures(
            compare(fp16.download(fp16.predictor(lr)), fp32.download(coarse)),
            FP16_GRAPH,
            f"predictor on {name}",
        )
        x_t = torch.from_numpy(noise_fields(plan, hr_offsets(2, 16, 24), 16, 24)[1]).cuda()
        for k in (0, plan.num_steps // 2, plan.num_steps - 1):  # high, middle and final noise levels
            t = torch.full((2,), float(plan.t[k]), device="cuda")
            coefs = torch.from_numpy(np.repeat(plan.coefs[k : k + 1], 2, axis=0)).cuda()
            args = (x_t, coarse, t, coefs, x_t.flip(-1))
            figures = compare(fp16.download(fp16.step(*args)), fp32.download(fp32.step(*args)))
            fails += bar_failures(figures, FP16_GRAPH, f"step {k} on {name}")
        assert not fails, fails


@pytest.mark.gpu
def test_end_to_end_graph_parity_with_the_eager_sampler_under_injected_noise(
    modules, cuda_engines, alphas_cumprod, photos
):
    predictor, unet = (copy.deepcopy(m).cpu() for m in modules)  # engines own (and move) what they get
    plan = plan_steps(alphas_cumprod, "ddim", 8, 0.5)
    lr = lr_tiles(photos["astronaut"], 3, 16, 16)
    noises = noise_fields(plan, hr_offsets(3, 16, 16), 16, 16)
    with torch.no_grad():  # the eager reference: esrdf.diffusion's textbook DDIM, fp32 on the CPU
        cond = predictor(torch.from_numpy(lr))
        residual = ddim_sample(
            unet_eps_fn(unet),
            make_schedule(CFG.schedule),
            torch.from_numpy(noises[0]),
            cond,
            steps=8,
            eta=0.5,
            noises=[torch.from_numpy(z) for z in noises[1:]],
        )
    eager = (cond + residual).numpy()
    outputs = {
        p: CudaGraphSampler(cuda_engines[p], CHANNELS, SCALE).sample(lr, noises, plan)
        for p in ("fp32", "fp16")
    }
    to_unit = lambda a: (np.clip(a, -1, 1) + 1) / 2  # noqa: E731
    fails = bar_failures(compare(to_unit(outputs["fp32"]), to_unit(eager)), END_TO_END_FP32, "fp32 graph")
    fails += bar_failures(
        compare(to_unit(outputs["fp16"]), to_unit(outputs["fp32"])), END_TO_END_FP16, "fp16 graph vs fp32"
    )
    assert not fails, fails


@pytest.mark.gpu
def test_device_noise_on_cuda_matches_the_numpy_field():
    offsets = torch.tensor([[0, 0], [512, 96]], device="cuda")
    got = torch_noise_field(seed_tensor(SEED, "cuda"), 3, offsets[:, 0], offsets[:, 1], 64, 64).cpu().numpy()
    for b, (y, x) in enumerate(offsets.tolist()):
        want = noise_field(SEED, 3, y, x, 64, 64)
        assert np.mean(got[b] != want) <= 1e-3
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)
