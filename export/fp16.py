"""FP32 → FP16 conversion of an ONNX graph with FP32 islands (mixed precision).

Why our own pass rather than ``onnxconverter_common.float16``: we need exactly three guarantees
and a test for each — (1) graph inputs and outputs stay FP32, so callers never change; (2)
normalisation, softmax and reductions run in FP32 (their sums over many elements lose precision
and overflow in FP16, and TensorRT ≥ 11 is strongly typed, so the graph's types are what it runs);
(3) every FP16 region is entered and left through explicit ``Cast`` nodes. The pass is small
enough to read in one sitting:

1. Every node whose ``op_type`` is in ``FP32_OPS`` (or that cannot carry FP16: Cast, shape ops
   with float attributes) stays FP32; every other node with float inputs becomes FP16.
2. Float initializers and ``Constant`` values read only by FP16 nodes are stored in FP16; those
   read by FP32 nodes stay FP32 (one read by both is kept twice).
3. Wherever a value crosses between the regions (including graph inputs into an FP16 node and an
   FP16 node's value that is a graph output) a ``Cast`` is inserted.

Inputs that an operator requires to be FP32 whatever its data type (``Resize`` scales/roi) are
never converted. Value-info is dropped and re-inferred by ``onnx.shape_inference``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS: frozenset[str] = frozenset({
    # normalisation
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization", "RMSNormalization",
    # softmax family
    "Softmax", "LogSoftmax", "Softmax_13",
    # reductions
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMin", "CumSum",
    # precision-sensitive elementwise maths on statistics
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Erf",
    # ops whose attributes or semantics carry a fixed float type
    "Cast", "CastLike", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Range", "EyeLike",
})

# op_type → indices of inputs that keep their own type (never cast to FP16).
_KEEP_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}

_F32 = TensorProto.FLOAT
_F16 = TensorProto.FLOAT16


def _float_values(model: onnx.ModelProto) -> set[str]:
    """Names of all FP32-typed values (inputs, initializers, node outputs) after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    g = inferred.graph
    names: set[str] = set()
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == _F32:
            names.add(vi.name)
    for init in g.initializer:
        if init.data_type == _F32:
            names.add(init.name)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == _F32:
                    names.add(node.output[0])
    return names


def convert_to_fp16(
    model: onnx.ModelProto,
    *,
    fp32_ops: frozenset[str] = FP32_OPS,
    fp16_from: frozenset[str] | None = None,
) -> onnx.ModelProto:
    """Return an FP16 copy of ``model`` with FP32 graph inputs/outputs and FP32 ``fp32_ops``.

    Args:
        model: a single-graph FP32 model (no local functions, no subgraphs — what the torch
            dynamo exporter writes for our CNN / ViT / UNet).
        fp32_ops: op types that stay FP32.
        fp16_from: graph inputs whose downstream activations may run in FP16 (default: all).
            Nodes that do not depend on any of them stay FP32 — for the denoiser that keeps the
            time embedding and the noise-level preconditioner (functions of ``t`` alone, where
            ``1 − ᾱ_t`` near t = 0 has no precision to spare in FP16) in FP32 at no cost.

    Raises:
        ValueError: the model has local functions or control-flow subgraphs (not supported).
    """
    if len(model.functions):
        raise ValueError("model has local functions: inline them first (onnx.inliner.inline_local_functions)")
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name!r} ({node.op_type}) has a subgraph: not supported by convert_to_fp16")

    floats = _float_values(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    inits = {i.name: i for i in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    sources = {i.name for i in g.input} if fp16_from is None else set(fp16_from)
    unknown = sources - {i.name for i in g.input}
    if unknown:
        raise ValueError(f"fp16_from names {sorted(unknown)}, which are not graph inputs")
    downstream = set(sources)
    for node in g.node:  # nodes are topologically sorted in a valid ONNX graph
        if any(i in downstream for i in node.input):
            downstream.update(node.output)

    def is_half_node(node: onnx.NodeProto) -> bool:
        if node.op_type in fp32_ops or node.op_type == "Constant":
            return False
        if not any(o in downstream for o in node.output):
            return False
        return any(i in floats for i in node.input if i) or any(o in floats for o in node.output)

    # Index, not id(): protobuf hands out fresh wrapper objects, so id() of a node is not stable.
    nodes = list(g.node)
    half_nodes = {k for k, n in enumerate(nodes) if is_half_node(n)}
    # Who reads each value, and in which precision.
    readers: dict[str, set[str]] = {}
    for idx, node in enumerate(nodes):
        keep = _KEEP_INPUTS.get(node.op_type, frozenset())
        for k, name in enumerate(node.input):
            if name and name in floats:
                prec = "fp16" if idx in half_nodes and k not in keep else "fp32"
                readers.setdefault(name, set()).add(prec)

    # Precision each float value is *produced* in.
    produced: dict[str, str] = {n: "fp32" for n in floats}
    for idx, node in enumerate(nodes):
        if idx in half_nodes:
            for o in node.output:
                if o in floats:
                    produced[o] = "fp16"
    # Initializers / constants read only in FP16 are stored in FP16.
    for name, precs in readers.items():
        if precs == {"fp16"} and name not in graph_inputs:
            if name in inits:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                inits[name].CopyFrom(numpy_helper.from_array(arr, name))
                produced[name] = "fp16"
            elif name in const_nodes:
                for a in const_nodes[name].attribute:
                    if a.name == "value":
                        arr = numpy_helper.to_array(a.t).astype(np.float16)
                        a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
                produced[name] = "fp16"

    new_nodes: list[onnx.NodeProto] = []
    cast_cache: dict[tuple[str, str], str] = {}

    def cast(name: str, to: str) -> str:
        key = (name, to)
        if key not in cast_cache:
            new = f"{name}__to_{to}"
            new_nodes.append(helper.make_node("Cast", [name], [new], to=_F16 if to == "fp16" else _F32,
                                              name=f"fp16pass_cast_{len(cast_cache)}"))
            cast_cache[key] = new
        return cast_cache[key]

    renamed_outputs: dict[str, str] = {}
    for idx, node in enumerate(nodes):
        keep = _KEEP_INPUTS.get(node.op_type, frozenset())
        want_half = idx in half_nodes
        for k, name in enumerate(node.input):
            if not name or name not in floats:
                continue
            want = "fp16" if want_half and k not in keep else "fp32"
            if produced[name] != want:
                node.input[k] = cast(name, want)
        if want_half:
            for k, o in enumerate(node.output):
                if o in graph_outputs and o in floats:
                    inner = f"{o}__fp16"
                    node.output[k] = inner
                    renamed_outputs[o] = inner
        new_nodes.append(node)
    for o, inner in renamed_outputs.items():
        new_nodes.append(helper.make_node("Cast", [inner], [o], to=_F32, name=f"fp16pass_out_{o}"))

    copies = [onnx.NodeProto() for _ in new_nodes]
    for c, n in zip(copies, new_nodes, strict=True):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)
    del g.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    onnx.checker.check_model(out)
    return out


def fp16_summary(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of FP16 / FP32 initializers and inserted casts (for the export report)."""
    inits = model.graph.initializer
    return {
        "fp16_initializers": sum(i.data_type == _F16 for i in inits),
        "fp32_initializers": sum(i.data_type == _F32 for i in inits),
        "casts": sum(n.op_type == "Cast" for n in model.graph.node),
    }
