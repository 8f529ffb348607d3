"""Read an ONNX file's nodes and weight sizes without the ``onnx`` package (device side, standard library only).

A device with the runtime-only install has ONNX Runtime but not ``onnx``;
the profiler still needs two facts from the file: which node produced which
tensor (to name the layers ONNX Runtime's profiler reports after fusing and
re-laying-out them) and how many bytes the weights take.  Both sit in a few
fields of the ONNX protobuf (ModelProto.graph -> GraphProto.node /
.initializer), which this module reads from the wire format directly,
skipping everything else (weights are skipped by length, never decoded).
Importing ``onnx`` for this took seconds per profiling process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OnnxNode", "OnnxGraph", "read_graph"]

# TensorProto.DataType -> bytes per element (onnx.proto3)
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1,
             19: 1, 20: 1}


@dataclass
class OnnxNode:
    """One node: its name, op type and the tensors it reads and writes."""

    name: str
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class OnnxGraph:
    """The main graph's nodes (in file order), who produces each tensor, and the initializers' sizes."""

    nodes: list[OnnxNode]
    initializers: dict[str, tuple[tuple[int, ...], int]]  # name -> (dims, data type)

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes if n.name}
        self.producer = {o: n for n in self.nodes for o in n.outputs}

    @property
    def weights_bytes(self) -> int:
        return sum(math.prod(dims) * _ITEMSIZE.get(dt, 4) for dims, dt in self.initializers.values())


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of one message in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, wire, value, i
        elif wire == 2:
            length, i = _varint(buf, i)
            yield number, wire, i, i + length
            i += length
        elif wire == 1:
            yield number, wire, i, i + 8
            i += 8
        elif wire == 5:
            yield number, wire, i, i + 4
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _text(buf: memoryview, s: int, e: int) -> str:
    return bytes(buf[s:e]).decode("utf-8", errors="replace")


def _node(buf: memoryview, s: int, e: int) -> OnnxNode:
    node = OnnxNode("", "")
    for number, wire, a, b in _fields(buf, s, e):
        if wire != 2:
            continue
        if number == 1:
            node.inputs.append(_text(buf, a, b))
        elif number == 2:
            node.outputs.append(_text(buf, a, b))
        elif number == 3:
            node.name = _text(buf, a, b)
        elif number == 4:
            node.op_type = _text(buf, a, b)
    return node


def _tensor(buf: memoryview, s: int, e: int) -> tuple[str, tuple[int, ...], int]:
    name, dims, dtype = "", [], 1
    for number, wire, a, b in _fields(buf, s, e):
        if number == 1 and wire == 0:
            dims.append(a)
        elif number == 1 and wire == 2:  # packed dims
            j = a
            while j < b:
                v, j = _varint(buf, j)
                dims.append(v)
        elif number == 2 and wire == 0:
            dtype = a
        elif number == 8 and wire == 2:
            name = _text(buf, a, b)
    return name, tuple(dims), dtype


def read_graph(path: str | os.PathLike[str]) -> OnnxGraph:
    """The nodes and initializer sizes of the main graph of the ONNX file at ``path`` (ValueError if it is not one)."""
    data = memoryview(Path(path).read_bytes())
    graph = next(((a, b) for number, wire, a, b in _fields(data, 0, len(data)) if number == 7 and wire == 2), None)
    if graph is None:
        raise ValueError(f"{path} has no ONNX graph")
    nodes, inits = [], {}
    for number, wire, a, b in _fields(data, *graph):
        if number == 1 and wire == 2:
            nodes.append(_node(data, a, b))
        elif number == 5 and wire == 2:
            name, dims, dtype = _tensor(data, a, b)
            inits[name] = (dims, dtype)
    return OnnxGraph(nodes, inits)
