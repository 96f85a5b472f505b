"""Mixed-precision (fp16) variants of the exported graphs, decided in the ONNX (docs/DESIGN.md section 1).

Converted with onnxconverter-common's maintained ``convert_float_to_float16``; this module only decides
which nodes stay fp32:
- normalisations: the norm ops themselves (the exporter lowers GroupNorm to Reshape -> InstanceNormalization
  -> Reshape -> Mul -> Add) and every node emitted inside a torch norm module, so the whole decomposition
  keeps fp32 statistics and affine;
- softmax, reductions (CBAM's spatial means sum many pixels) and the converter's default list (Resize, so the
  predictor's bicubic skip path stays exact);
- the sampler update (paper Eq. 6-7 folded into the step graph): every node in the ``sampler_update`` scope
  of ``StepModule``, so x_t and noise enter it as the fp32 graph inputs and x_prev is never rounded;
- the sinusoidal time embedding: Sin/Cos and everything upstream of them, computed from ``t`` alone (a
  timestep index of ~200 times a frequency of 1 has fp16 resolution 0.125 rad).
Inputs and outputs stay float32 (``keep_io_types``), so the runtime feeds both precisions the same arrays.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx

from esrdf.export.cleanup import CLASS_HIERARCHY_KEY, NAME_SCOPES_KEY, node_metadata
from esrdf.models.step_module import UPDATE_SCOPE

FP32_OP_TYPES = frozenset(
    {
        "BatchNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "Softmax",
        "ReduceMean",
        "ReduceSum",
        "Pow",
        "Sqrt",
        "Sin",
        "Cos",
    }
)
# torch modules whose every emitted node stays fp32 (matched against the exporter's class hierarchy)
FP32_MODULE_CLASSES = ("GroupNorm", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "InstanceNorm2d")
TRIG_OPS = ("Sin", "Cos")


def _in_fp32_module(node: onnx.NodeProto) -> bool:
    classes = [c.rsplit(".", 1)[-1] for c in node_metadata(node, CLASS_HIERARCHY_KEY)]
    return any(c in FP32_MODULE_CLASSES for c in classes)


def _in_update_scope(node: onnx.NodeProto) -> bool:
    scopes = node_metadata(node, NAME_SCOPES_KEY)
    return UPDATE_SCOPE in scopes or node.name.startswith(f"/{UPDATE_SCOPE}/")


def _upstream_of_trig(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that feed Sin/Cos, transitively: the time-embedding arithmetic on ``t``."""
    producer = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    stack = [n for n in graph.node if n.op_type in TRIG_OPS]
    while stack:
        node = stack.pop()
        if node.name in found:
            continue
        found.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return found


def fp32_node_names(model: onnx.ModelProto) -> list[str]:
    """Nodes of a freshly exported (metadata-carrying) graph that must stay fp32, by name."""
    graph = model.graph
    keep = _upstream_of_trig(graph)
    keep |= {n.name for n in graph.node if _in_fp32_module(n) or _in_update_scope(n)}
    unnamed = [n.op_type for n in graph.node if not n.name]
    if unnamed:
        raise ValueError(f"fp16 conversion needs named nodes; unnamed: {unnamed[:5]}")
    return sorted(keep)


def convert_to_mixed_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 graph (straight from the exporter, metadata intact) -> mixed-precision graph, fp32 I/O."""
    from onnxconverter_common import float16

    node_block_list = fp32_node_names(model)
    op_block_list = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | FP32_OP_TYPES)
    # The converter warns once per clamped weight (|w| < 1e-7 or > 1e4); the parity gate judges the result.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=op_block_list,
            node_block_list=node_block_list,
            disable_shape_infer=False,
        )
    remove_cast_round_trips(converted)
    restore_fp32_outputs(converted)
    return converted


def restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """Make every fp16 graph output fp32 again, as ``keep_io_types`` promises.

    When the node producing an output is itself blocked (the step graph's last update Add), the converter
    casts its fp32 result down to fp16 and retypes the output, and its ``keep_io_types`` pass, which only
    looks for fp32 outputs, then leaves it so. Dropping that Cast hands out the update's fp32 result
    unrounded; any other fp16 output gets a Cast up.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        tensor_type = output.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producer[output.name]
        if node.op_type == "Cast" and node.input[0] in _float_tensor_names(graph):
            source = node.input[0]
            graph.node.remove(node)
            for other in graph.node:  # the fp32 tensor takes the output's name everywhere
                other.input[:] = [output.name if i == source else i for i in other.input]
                other.output[:] = [output.name if o == source else o for o in other.output]
        else:
            half = f"{output.name}_fp16"
            node.output[:] = [half if o == output.name else o for o in node.output]
            graph.node.append(
                onnx.helper.make_node(
                    "Cast", [half], [output.name], name=f"{output.name}_to_fp32", to=onnx.TensorProto.FLOAT
                )
            )
        tensor_type.elem_type = onnx.TensorProto.FLOAT


def _float_tensor_names(graph: onnx.GraphProto) -> set[str]:
    values = (*graph.input, *graph.value_info, *graph.output)
    names = {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return names | {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}


def _cast_to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)


def remove_cast_round_trips(model: onnx.ModelProto) -> int:
    """Rewire Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pairs to the original fp32 tensor; return how many.

    Such a pair joins two fp32 islands through a lossy fp16 round trip: the converter casts a blocked
    node's output down once and casts it up again for each blocked consumer. Its own clean-up pass
    (``remove_unnecessary_cast_node``) skips tensors with several consumers (it compares the ``to``
    attributes against 32/16 instead of the TensorProto codes), which rounded the step coefficients to
    fp16 here. Hand-written because neither maintained converter removes these pairs.
    """
    graph = model.graph
    float_names = _float_tensor_names(graph)
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    rewired: dict[str, str] = {}
    for node in graph.node:
        if (
            node.op_type != "Cast"
            or _cast_to(node) != onnx.TensorProto.FLOAT
            or node.output[0] in graph_outputs
        ):
            continue
        down = producer.get(node.input[0])
        if down is not None and down.op_type == "Cast" and _cast_to(down) == onnx.TensorProto.FLOAT16:
            if down.input[0] in float_names:
                rewired[node.output[0]] = down.input[0]
    for node in graph.node:
        node.input[:] = [rewired.get(i, i) for i in node.input]
    _drop_dead_nodes(graph)
    return len(rewired)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is consumed or a graph output (repeated to a fixed point)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor after shape inference (for inspecting fp32 islands)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types
