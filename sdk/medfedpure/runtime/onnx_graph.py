"""A minimal, bounded reader of the ONNX protobuf: what verification must know about a graph.

The runtime core does not depend on the ``onnx`` package, yet bundle verification has to answer two
questions about each ONNX artefact before any session is made from it:

- which tensors keep their data *outside* the graph (``TensorProto.data_location = EXTERNAL`` with
  ``external_data`` entries ``location`` / ``offset`` / ``length``): ONNX Runtime would otherwise
  read such a file from a directory of its choosing, unhashed; and
- the graph's declared outputs (name, element type, dims), so that a classifier whose output width
  differs from the manifest's class count is refused on load.

This module decodes just enough of the protobuf wire format for that: the fields of ``ModelProto``,
``GraphProto``, ``NodeProto``, ``AttributeProto``, ``TensorProto``, ``SparseTensorProto``,
``FunctionProto`` and ``TrainingInfoProto`` that can hold a tensor or a subgraph, and the output
``ValueInfoProto``\\ s. Everything else is skipped by its wire length. Nesting is bounded
(:data:`MAX_NESTING`), so a hostile graph cannot exhaust the stack; malformed bytes raise
:class:`OnnxParseError`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_NESTING", "ExternalRef", "GraphOutput", "GraphSummary", "OnnxParseError", "summarize"]

MAX_NESTING = 64

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# message kind → {field number: child message kind}, for the fields that can hold tensors or graphs
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "function": {7: "node"},
    "training": {1: "graph", 2: "graph"},
}


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX model (truncated, bad wire type, or nested too deeply)."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor whose data lives outside the graph.

    Attributes:
        tensor: the tensor's name.
        location: the ``location`` entry (a path relative to the model's folder), or None if absent.
        offset / length: the ``offset`` / ``length`` entries in bytes, or None if absent or not integers.
    """

    tensor: str
    location: str | None
    offset: int | None
    length: int | None


@dataclass(frozen=True)
class GraphOutput:
    """A declared graph output: name, ONNX element type (0: unknown) and dims (int, symbolic str or None)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None


@dataclass(frozen=True)
class GraphSummary:
    """What :func:`summarize` read: every external-data reference and the main graph's outputs."""

    external: tuple[ExternalRef, ...]
    outputs: tuple[GraphOutput, ...]


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise OnnxParseError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise OnnxParseError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) where value is an int or a memoryview (length-delimited)."""
    i = 0
    n = len(buf)
    while i < n:
        tag, i = _varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise OnnxParseError("field number 0")
        if wt == _VARINT:
            v, i = _varint(buf, i)
            yield num, wt, v
        elif wt == _LEN:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise OnnxParseError("length-delimited field runs past the end of its message")
            yield num, wt, buf[i:i + ln]
            i += ln
        elif wt == _I64:
            if i + 8 > n:
                raise OnnxParseError("truncated fixed64 field")
            i += 8
        elif wt == _I32:
            if i + 4 > n:
                raise OnnxParseError("truncated fixed32 field")
            i += 4
        else:
            raise OnnxParseError(f"unsupported wire type {wt} (groups are not used by ONNX)")


def _text(v: memoryview) -> str:
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        raise OnnxParseError(f"a string field is not UTF-8: {e}") from e


def _tensor(buf: memoryview, out: list[ExternalRef]) -> None:
    name = ""
    external = False
    entries: dict[str, str] = {}
    for num, wt, v in _fields(buf):
        if num == 8 and wt == _LEN:
            name = _text(v)  # type: ignore[arg-type]
        elif num == 14 and wt == _VARINT:
            external = v == 1
        elif num == 13 and wt == _LEN:
            key = value = ""
            for n2, w2, v2 in _fields(v):  # type: ignore[arg-type]
                if w2 == _LEN and n2 == 1:
                    key = _text(v2)  # type: ignore[arg-type]
                elif w2 == _LEN and n2 == 2:
                    value = _text(v2)  # type: ignore[arg-type]
            entries[key] = value
    if external or entries:
        def as_int(key: str) -> int | None:
            s = entries.get(key)
            return int(s) if s is not None and s.isdigit() else None

        out.append(ExternalRef(tensor=name, location=entries.get("location"), offset=as_int("offset"),
                               length=as_int("length")))


def _walk(buf: memoryview, kind: str, depth: int, out: list[ExternalRef]) -> None:
    if depth > MAX_NESTING:
        raise OnnxParseError(f"graphs nested more than {MAX_NESTING} deep")
    if kind == "tensor":
        _tensor(buf, out)
        return
    children = _CHILDREN[kind]
    for num, wt, v in _fields(buf):
        child = children.get(num)
        if child is not None and wt == _LEN:
            _walk(v, child, depth + 1, out)  # type: ignore[arg-type]


def _dims(shape: memoryview) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for num, wt, v in _fields(shape):
        if num != 1 or wt != _LEN:
            continue
        d: int | str | None = None
        for n2, w2, v2 in _fields(v):  # type: ignore[arg-type]
            if n2 == 1 and w2 == _VARINT:
                d = int(v2)  # type: ignore[arg-type]
            elif n2 == 2 and w2 == _LEN:
                d = _text(v2)  # type: ignore[arg-type]
        dims.append(d)
    return tuple(dims)


def _output(buf: memoryview) -> GraphOutput:
    name, elem, dims = "", 0, None
    for num, wt, v in _fields(buf):
        if num == 1 and wt == _LEN:
            name = _text(v)  # type: ignore[arg-type]
        elif num == 2 and wt == _LEN:  # TypeProto
            for n2, w2, v2 in _fields(v):  # type: ignore[arg-type]
                if n2 == 1 and w2 == _LEN:  # TypeProto.Tensor
                    for n3, w3, v3 in _fields(v2):  # type: ignore[arg-type]
                        if n3 == 1 and w3 == _VARINT:
                            elem = int(v3)  # type: ignore[arg-type]
                        elif n3 == 2 and w3 == _LEN:
                            dims = _dims(v3)  # type: ignore[arg-type]
    return GraphOutput(name=name, elem_type=elem, dims=dims)


def summarize(data: bytes) -> GraphSummary:
    """Read an ONNX model's external-data references (in every graph, subgraph and function) and the
    main graph's declared outputs.

    Raises:
        OnnxParseError: malformed protobuf, a model without a graph, or nesting deeper than
            :data:`MAX_NESTING`.
    """
    buf = memoryview(data)
    external: list[ExternalRef] = []
    outputs: list[GraphOutput] = []
    graphs = 0
    for num, wt, v in _fields(buf):
        if wt != _LEN:
            continue
        if num == 7:
            graphs += 1
            for n2, w2, v2 in _fields(v):  # type: ignore[arg-type]
                if n2 == 12 and w2 == _LEN:
                    outputs.append(_output(v2))  # type: ignore[arg-type]
        child = _CHILDREN["model"].get(num)
        if child is not None:
            _walk(v, child, 1, external)  # type: ignore[arg-type]
    if graphs != 1:
        raise OnnxParseError(f"expected one main graph, found {graphs}")
    return GraphSummary(external=tuple(external), outputs=tuple(outputs))
