"""ONNX export of the three shipped networks, and verification of torch against ONNX Runtime.

Exporter: torch 2.13's dynamo exporter (``torch.onnx.export(..., dynamo=True)``), opset 20, one
dynamic batch dimension (``dynamic_shapes``), weights inside the file (``external_data=False``).
Graph interfaces (fixed names the runtime relies on):

==============  ==============================  ===================================
artefact        inputs                          outputs
==============  ==============================  ===================================
classifier      ``x`` [B,1,S,S] float32 [0,1]   ``probs`` [B,C] float32, rows sum 1
mae             ``x`` [B,1,S,S] float32 [0,1]   ``recon`` [B,K,S,S] float32
denoiser        ``x_t`` [B,1,S,S], ``t`` [B]    ``x0_hat`` [B,1,S,S] float32 ([−1,1] space)
==============  ==============================  ===================================

Shipped graphs carry no exporter metadata: :func:`strip_metadata` removes every
``metadata_props`` entry and doc string (the dynamo exporter records stack traces, FX nodes and
module paths there, which name the build machine's source files), leaving the computation and
the weights untouched.

Verification (Polygraphy-style): both runtimes see the same inputs; we report max / mean
absolute error and, for the classifier, top-1 agreement, with explicit tolerances.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from torch import nn

IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classifier": (("x",), ("probs",)),
    "mae": (("x",), ("recon",)),
    "denoiser": (("x_t", "t"), ("x0_hat",)),
    "detector": (("x",), ("patch_logits",)),
}
OPSET = 20
MAX_BATCH = 64


def export_module(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    max_batch: int = MAX_BATCH,
) -> onnx.ModelProto:
    """Export ``module`` (eval mode, CPU, FP32) with a dynamic batch dimension on every input.

    Args:
        module: the network; its forward takes ``example_inputs`` (all batch-first).
        example_inputs: tensors with batch ≥ 2 (batch 1 would let the exporter specialise).
        input_names / output_names: graph interface names.
        max_batch: upper bound of the dynamic batch dimension.

    Returns:
        The checked ONNX model (single file, opset 20).
    """
    if any(t.shape[0] < 2 for t in example_inputs):
        raise ValueError("export example inputs need batch >= 2 so that the batch dimension stays dynamic")
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dyn = tuple({0: batch} for _ in example_inputs)
    # The exporter logs one warning per missing torchvision op and a rename note; they are noise here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, example_inputs, dynamo=True, opset_version=OPSET, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=dyn, external_data=False, verbose=False,
        )
    model = strip_metadata(prog.model_proto)
    onnx.checker.check_model(model)
    return model


def _strip_graph(graph: onnx.GraphProto) -> None:
    del graph.metadata_props[:]
    graph.ClearField("doc_string")
    for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del v.metadata_props[:]
        v.ClearField("doc_string")
    for sp in graph.sparse_initializer:
        del sp.values.metadata_props[:]
        sp.values.ClearField("doc_string")
    for node in graph.node:
        _strip_node(node)


def _strip_node(node: onnx.NodeProto) -> None:
    del node.metadata_props[:]
    node.ClearField("doc_string")
    for attr in node.attribute:  # control-flow subgraphs (If / Loop / Scan bodies)
        attr.ClearField("doc_string")
        if attr.HasField("g"):
            _strip_graph(attr.g)
        for g in attr.graphs:
            _strip_graph(g)


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove exporter metadata from ``model`` in place and return it.

    Clears ``metadata_props`` and ``doc_string`` of the model, its graph (and nested control-flow
    graphs), every node, value info, input, output, initializer and local function. Nodes,
    tensors and their names are kept, so the graph computes exactly what it did and its
    initializers are byte-identical.
    """
    del model.metadata_props[:]
    model.ClearField("doc_string")
    _strip_graph(model.graph)
    for fn in model.functions:
        del fn.metadata_props[:]
        fn.ClearField("doc_string")
        for node in fn.node:
            _strip_node(node)
        for v in fn.value_info:
            del v.metadata_props[:]
            v.ClearField("doc_string")
    return model


def metadata_entries(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Every ``(key, value)`` metadata entry and non-empty doc string left anywhere in ``model``."""
    found: list[tuple[str, str]] = []

    def props(obj: object, where: str) -> None:
        found.extend((f"{where}:{p.key}", p.value) for p in getattr(obj, "metadata_props", []))
        if getattr(obj, "doc_string", ""):
            found.append((f"{where}:doc_string", obj.doc_string))  # type: ignore[attr-defined]

    def graph(g: onnx.GraphProto) -> None:
        props(g, "graph")
        for v in (*g.input, *g.output, *g.value_info, *g.initializer):
            props(v, f"value {v.name}")
        for n in (*g.node,):
            props(n, f"node {n.name}")
            for a in n.attribute:
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    props(model, "model")
    graph(model.graph)
    for fn in model.functions:
        props(fn, f"function {fn.name}")
        for n in fn.node:
            props(n, f"node {n.name}")
    return found


class _ClassifierGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def export_classifier(model: nn.Module, image_size: int) -> onnx.ModelProto:
    """``x [B,1,S,S] -> probs [B,C]`` (the MoE's mixture probabilities)."""
    x = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return export_module(_ClassifierGraph(model), (x,), *IO_NAMES["classifier"])


def export_mae_scorer(scorer: nn.Module, image_size: int) -> onnx.ModelProto:
    """``x [B,1,S,S] -> recon [B,K,S,S]`` (the MAE under its K fixed scoring mask sets)."""
    x = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return export_module(scorer, (x,), *IO_NAMES["mae"])


def export_detector(det: nn.Module, image_size: int) -> onnx.ModelProto:
    """``x [B,1,S,S] -> patch_logits [B,Np]`` (the attack detector's per-patch logits; the gate reduces them)."""
    x = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return export_module(det, (x,), *IO_NAMES["detector"])


def export_denoiser(student: nn.Module, image_size: int) -> onnx.ModelProto:
    """``(x_t [B,1,S,S], t [B] float32) -> x0_hat [B,1,S,S]`` (the distilled student)."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 1, image_size, image_size, generator=g)
    t = torch.tensor([30.0, 120.0])
    return export_module(student, (x_t, t), *IO_NAMES["denoiser"])


@dataclass(frozen=True)
class Agreement:
    """Torch vs ONNX Runtime on the same inputs.

    ``max_abs`` / ``mean_abs``: absolute error over every output element; ``top1`` (classifier
    only, else None): fraction of samples whose argmax agrees; ``n``: number of samples.
    """

    max_abs: float
    mean_abs: float
    top1: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def compare_outputs(ref: np.ndarray, got: np.ndarray, *, classify: bool = False) -> Agreement:
    """Error statistics of ``got`` against ``ref`` (same shape, batch-first)."""
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape} vs {got.shape}")
    err = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    top1 = float((ref.argmax(1) == got.argmax(1)).mean()) if classify else None
    return Agreement(float(err.max()), float(err.mean()), top1, int(ref.shape[0]))


def ort_session(model: onnx.ModelProto | bytes, *, threads: int = 1):
    """A CPU ONNX Runtime session from an in-memory model."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def verify_against_torch(
    torch_fn: Callable[..., torch.Tensor],
    model: onnx.ModelProto | bytes,
    inputs: dict[str, np.ndarray],
    *,
    classify: bool = False,
    batch: int = 16,
) -> Agreement:
    """Run ``torch_fn`` and the ONNX model on ``inputs`` (batched) and compare the outputs.

    Args:
        torch_fn: the reference, called with the inputs as tensors in the graph's input order.
        model: the ONNX model (FP32 or FP16 — FP16 graphs keep FP32 interfaces).
        inputs: graph input name → array (batch-first, all with the same batch size).
        classify: also report top-1 agreement (outputs [B, C]).
    """
    sess = ort_session(model)
    names = [i.name for i in sess.get_inputs()]
    if set(names) != set(inputs):
        raise ValueError(f"graph inputs are {names}; got {sorted(inputs)}")
    n = next(iter(inputs.values())).shape[0]
    refs, gots = [], []
    with torch.no_grad():
        for lo in range(0, n, batch):
            chunk = {k: v[lo:lo + batch] for k, v in inputs.items()}
            refs.append(torch_fn(*(torch.from_numpy(chunk[k]) for k in names)).numpy())
            gots.append(sess.run(None, chunk)[0])
    return compare_outputs(np.concatenate(refs), np.concatenate(gots), classify=classify)
