"""The parity bars, in one table (docs/DESIGN.md section 4 explains each).

Export measures its graphs against these and records the figures in the manifest; the tests assert them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParityBar:
    max_abs_rel: float | None = None  # max |a - b| / max(|b|) (output scale)
    max_abs: float | None = None  # on [0, 1] images
    median_abs: float | None = None
    min_psnr_db: float | None = None
    bit_exact: bool = False


# eager fp32 vs onnxruntime fp32, per graph
FP32_GRAPH = ParityBar(max_abs_rel=1e-4)
# fp16 graph vs fp32 eager, per graph, real images (also no NaN/Inf)
FP16_GRAPH = ParityBar(median_abs=1e-3, min_psnr_db=50.0)
# end-to-end runtime vs eager sampler, same injected noise, fp32, on [0, 1] images
END_TO_END_FP32 = ParityBar(max_abs=1e-3)
# end-to-end fp16 vs fp32
END_TO_END_FP16 = ParityBar(min_psnr_db=40.0)
# OpenVINO bf16 graph vs OpenVINO f32, per graph on real photo tiles (the step judged on x_prev), no NaN/Inf;
# measured on first use on each machine (esrdf.engines.openvino_parity); a graph that misses runs f32
BF16_GRAPH = ParityBar(median_abs=1e-3)
# end-to-end bf16 (the graphs that passed) vs all-f32, same seeded noise, PSNR on [0, 1] images
END_TO_END_BF16 = ParityBar(min_psnr_db=40.0)
# CUDA-graph replay vs stream execution
GRAPH_REPLAY = ParityBar(bit_exact=True)

TABLE: dict[str, ParityBar] = {
    "fp32_graph": FP32_GRAPH,
    "fp16_graph": FP16_GRAPH,
    "end_to_end_fp32": END_TO_END_FP32,
    "end_to_end_fp16": END_TO_END_FP16,
    "bf16_graph": BF16_GRAPH,
    "end_to_end_bf16": END_TO_END_BF16,
    "graph_replay": GRAPH_REPLAY,
}
