"""The GPU path: the whole sampler loop in one CUDA graph, the fp16 torch engine, device noise.

gpu-marked tests need CUDA and skip with a reason elsewhere (``benchmarks/gpu_check.sh`` runs them). The
unmarked tests check, on the CPU, the parts of ``esrdf.engines.cuda_graph`` that need no GPU: shape keys,
buffer generations, stream execution against the driver's loop (host and device noise, the x_T scale), and
the capture-failure fallback and retry (a CPU build of torch cannot capture, a real failure). The noise
port itself is tests/test_torch_noise.py.
All inputs are crops of real photos; models are the ``tiny`` preset with seeded random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import pytest
import torch

from esrdf.bench.random_model import random_models
from esrdf.config import preset
from esrdf.diffusion.samplers import ddim_sample, unet_eps_fn
from esrdf.diffusion.schedule import make_schedule
from esrdf.engines.cuda_graph import CudaGraphSampler, ShapeKey, StaticBuffers, capture_sampler_graph
from esrdf.engines.torch_engine import TorchEngine
from esrdf.engines.torch_noise import noise_fields as torch_noise_fields
from esrdf.engines.torch_noise import seed_tensor
from esrdf.export.parity import bar_failures, compare
from esrdf.runtime import driver
from esrdf.runtime.bundle import FORMAT_VERSION, ExportSettings, Manifest, ScheduleEntry
from esrdf.runtime.noise import SeededNoise, noise_field
from esrdf.runtime.sampling import StepPlan, plan_steps
from esrdf.runtime.tiling import Tile
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
    device = StaticBuffers(ShapeKey(2, 8, 12, 3, "ddim", 0.0, "device"), CHANNELS, SCALE, torch.device("cpu"))
    assert "noise" not in device.tensors and device.tensors["offsets"].shape == (2, 2)  # drawn, not copied
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
    # Device-drawn noise: the torch port of the same counter-based field, bit for bit.
    assert np.array_equal(sampler.sample_seeded(lr, SEED, offsets, plan), want)
    with pytest.raises(ValueError, match="noises must be"):
        sampler.sample(lr, noises[:-1], plan)


def test_x_t_is_scaled_by_the_plans_init_noise_std_in_both_noise_modes(modules, alphas_cumprod, photos):
    engine = TorchEngine(*modules, device="cpu")
    plan = dataclasses.replace(plan_steps(alphas_cumprod, "ddim", 3, 0.0), init_noise_std=0.796)
    lr = lr_tiles(photos["chelsea"], 2, 8, 8)
    offsets = hr_offsets(2, 8, 8)
    noises = noise_fields(plan, offsets, 8, 8)
    scaled = noises.copy()
    scaled[0] = noises[0] * np.float32(plan.init_noise_std)  # the matched prior's x_T, made on the host
    want = loop_by_engine_calls(engine, lr, scaled, plan)
    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu")
    assert np.array_equal(sampler.sample(lr, noises, plan), want)
    assert np.array_equal(sampler.sample_seeded(lr, SEED, offsets, plan), want)
    unscaled = loop_by_engine_calls(engine, lr, noises, plan)
    assert np.abs(want - unscaled).max() > 1e-2  # the scale really reaches x_T


def test_failed_capture_is_reported_and_retried_on_later_requests(modules, alphas_cumprod, photos, caplog):
    engine = TorchEngine(*modules, device="cpu")
    plan = plan_steps(alphas_cumprod, "ddim", 2)
    lr = lr_tiles(photos["astronaut"], 2, 8, 8)
    noises = noise_fields(plan, hr_offsets(2, 8, 8), 8, 8)
    want = loop_by_engine_calls(engine, lr, noises, plan)

    bufs = StaticBuffers(ShapeKey.of(lr.shape, plan), CHANNELS, SCALE, torch.device("cpu"))
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        capture_sampler_graph(engine, bufs)  # a CPU build of torch cannot capture: the error reaches us

    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu")
    sampler.use_graphs = True  # make it try, as on a GPU whose capture fails
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esrdf.engines.cuda_graph"):
        outputs = [sampler.sample(lr, noises, plan) for _ in range(8)]
    assert all(np.array_equal(out, want) for out in outputs)  # every request still answered, correctly
    # Attempts at requests 1, 3, 6 (back-off 1, 2, 4 requests between them): retried, not given up on.
    assert caplog.text.count("capture failed") == 3 == sampler.capture_failures
    status = sampler.status()
    assert status["captures"] == 0 and status["last_capture_error"] and len(status["stream_only_keys"]) == 1


def test_seeded_requests_draw_device_noise_and_injected_ones_copy_host_noise(modules, alphas_cumprod, photos):
    engine = TorchEngine(*modules, device="cpu")
    plan = plan_steps(alphas_cumprod, "ddim", 2, 1.0)
    lr = lr_tiles(photos["rocket"], 2, 8, 8)
    seeded = SeededNoise(SEED, SCALE, CHANNELS, 8 * SCALE, 8 * SCALE)
    sampler = CudaGraphSampler(engine, CHANNELS, SCALE, device="cpu")
    tiles = [Tile(0, 0), Tile(0, 8)]
    got = sampler.batch_sampler(plan, seeded, lambda: None)(lr, tiles)
    injected = sampler.batch_sampler(plan, lambda k, tile: seeded(k, tile), lambda: None)(lr, tiles)
    assert [k.noise for k in sampler._entries] == ["device", "host"]
    assert np.array_equal(got, injected)
    assert np.array_equal(seeded.offsets(tiles), hr_offsets(2, 8, 8))


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
    # One shape key (padded to 5), drawing the seeded noise on the device, equal to the host loop bit for bit.
    assert list(graphs._entries) == [ShapeKey(5, 16, 16, 3, "ddim", 0.3, "device")]


# --- GPU -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_engines(modules) -> dict[str, TorchEngine]:
    # TorchEngine moves (and for fp16 halves) the modules it is given; copies keep the fixture's modules
    # on the CPU in fp32 for the eager reference.
    return {
        "fp32": TorchEngine(*(copy.deepcopy(m) for m in modules), device="cuda", precision="fp32"),
        "fp16": TorchEngine(*(copy.deepcopy(m) for m in modules), device="cuda", precision="fp16"),
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
def test_fp16_engine_holds_fp16_weights_and_equals_an_fp32_weight_autocast_run(modules, cuda_engines, photos):
    engine = cuda_engines["fp16"]
    assert next(engine._step.unet.parameters()).dtype == torch.float16
    norms = [m for m in engine._step.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # norms stay fp32
    # The weights autocast would cast on every call, cast once: an fp32-weight module under the same
    # autocast gives the same output bit for bit.
    reference = copy.deepcopy(modules[0]).cuda().float()
    lr = torch.from_numpy(lr_tiles(photos["astronaut"], 2, 16, 16)).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        want = reference(lr).float()
    assert torch.equal(engine.predictor(lr).float(), want)
    assert next(modules[1].parameters()).dtype == torch.float32  # the fixture's modules are untouched


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
    offsets = torch.tensor([[0, 512], [0, 96]], device="cuda")  # (2, B): y0s, x0s
    got = torch_noise_fields(seed_tensor(SEED, "cuda"), 4, offsets, 64, 64).cpu().numpy()
    for k in range(4):
        for b, (y, x) in enumerate(offsets.T.tolist()):
            want = noise_field(SEED, k, y, x, 64, 64)
            # Integer hash exact; CUDA's float64 log/cos may differ from numpy's by an ulp, which can flip
            # a float32 rounding only in a rare tie (esrdf.runtime.noise).
            assert np.mean(got[k, b] != want) <= 1e-6
            np.testing.assert_allclose(got[k, b], want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_upscaler_on_cuda_takes_uint8_and_matches_the_cpu_upscaler(tmp_path, photos):
    """The public API on CUDA: uint8 in, uint8 out, device noise in the whole-loop graph; the graph equals
    stream execution bit for bit and the CPU's Upscaler (numpy host noise) to within one uint8 level."""
    from esrdf.bench.checkpoint_bundle import checkpoint_bundle
    from esrdf.bench.random_model import random_checkpoint
    from esrdf.bench.upscaler_requests import bundle_dir
    from esrdf.config import SamplingOptions
    from esrdf.runtime.upscaler import Upscaler

    directory = bundle_dir(checkpoint_bundle(random_checkpoint(tmp_path / "ckpt", CFG)))
    image = np.ascontiguousarray(photos["chelsea"][60:80, 100:130])  # 20x30: tiles of 8, overlap 2
    options = SamplingOptions(steps=4, eta=1.0, seed=11)
    kwargs = dict(backend="torch", precision="fp32", tile=8, overlap=2, batch=3)
    graphed = Upscaler(directory, device="cuda", **kwargs)(image, options)
    streamed = Upscaler(directory, device="cuda", cuda_graph=False, **kwargs)(image, options)
    on_cpu = Upscaler(directory, device="cpu", **kwargs)(image, options)
    assert graphed.dtype == np.uint8 and graphed.shape == (80, 120, 3)
    assert np.array_equal(graphed, streamed)
    assert np.abs(graphed.astype(int) - on_cpu.astype(int)).max() <= 1
