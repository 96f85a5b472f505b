"""Graph cleanup after export: scope-named nodes, spec-named axes, constant folding, checks, saving.

The dynamo exporter already runs the onnxscript optimizer; this pass adds what deployment needs:
- node names that say which module they came from (``/unet.mid_block.norm1/node_group_norm_3``), taken from
  the exporter's ``pkg.torch.onnx.name_scopes`` metadata, so a graph is readable in Netron and the fp32
  islands of an fp16 graph can be found by name;
- the I/O axes named exactly as ``esrdf.runtime.graph_spec`` declares them (the exporter writes derived
  names such as ``4*height_div4``);
- constant folding with polygraphy (graphsurgeon + onnxruntime), then ONNX shape inference;
- ``onnx.checker`` with ``full_check`` (strict shape inference) on the saved file;
- weights inside the ``.onnx`` file unless the model passes protobuf's 2 GB limit.
"""

from __future__ import annotations

import ast
import contextlib
import io
from pathlib import Path

import onnx

from esrdf.runtime.graph_spec import GraphSpec

PROTOBUF_LIMIT_BYTES = 2**31 - 1
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"
EXTERNAL_DATA_SUFFIX = ".data"


def node_metadata(node: onnx.NodeProto, key: str) -> list[str]:
    """A list-valued torch.onnx metadata entry of ``node`` (empty when absent)."""
    for prop in node.metadata_props:
        if prop.key == key:
            value = ast.literal_eval(prop.value)  # the exporter writes a Python list literal
            return [str(v) for v in value] if isinstance(value, list) else []
    return []


def scoped_node_name(node: onnx.NodeProto) -> str:
    """``/<module path>/<node name>``: the innermost module that emitted the node, then its unique name."""
    scopes = node_metadata(node, NAME_SCOPES_KEY)
    module_path = scopes[-2] if len(scopes) >= 2 else ""  # scopes[-1] is the aten op, earlier are modules
    if module_path.startswith("_"):  # the exporter's placeholder for nodes outside any module
        module_path = ""
    return f"/{module_path}/{node.name}" if module_path else f"/{node.name}"


def name_nodes_by_scope(model: onnx.ModelProto) -> None:
    """Rename every node to its scoped name, then drop the exporter's per-node metadata.

    The metadata (stack traces with local file paths, FX node dumps) would not survive constant folding
    anyway and would make the bundle depend on where it was exported.
    """
    for node in model.graph.node:
        if node.metadata_props:
            node.name = scoped_node_name(node)
            del node.metadata_props[:]


def name_io_axes(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give graph inputs and outputs the axis names of ``spec``; check their dtypes and fixed sizes."""
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        if value.name not in declared:
            raise ValueError(f"graph has {value.name!r}, which the {spec.role} spec does not declare")
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype.name != declared[value.name].dtype:
            raise ValueError(f"{value.name}: {dtype.name}, but the spec says {declared[value.name].dtype}")
        dims = tensor_type.shape.dim
        want = declared[value.name].dims
        if len(dims) != len(want):
            raise ValueError(f"{value.name}: rank {len(dims)} but the spec says {want}")
        for dim, axis in zip(dims, want, strict=True):
            if isinstance(axis, str):
                dim.dim_param = axis
            elif dim.HasField("dim_value") and dim.dim_value != axis:
                raise ValueError(f"{value.name}: axis size {dim.dim_value}, spec says {axis}")


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding to a fixed point with polygraphy, its log kept off the console."""
    from polygraphy.backend.onnx import fold_constants as polygraphy_fold

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        folded = polygraphy_fold(model, num_passes=None, do_shape_inference=True, error_ok=False)
    return folded


def cleanup_graph(model: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """Scope-named nodes, spec-named axes, folded constants and inferred intermediate shapes."""
    name_nodes_by_scope(model)
    name_io_axes(model, spec)
    model = fold_constants(model)
    del model.graph.value_info[:]  # re-inferred below from the spec-named axes
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def save_graph(model: onnx.ModelProto, path: Path) -> Path:
    """Save with the weights inside the file; external data (``<name>.data``) only past the 2 GB limit.

    Then run the full ONNX checker on the saved file (the path form handles external data).
    """
    path = Path(path)
    external = model.ByteSize() > PROTOBUF_LIMIT_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + EXTERNAL_DATA_SUFFIX,
    )
    onnx.checker.check_model(str(path), full_check=True)
    return path
