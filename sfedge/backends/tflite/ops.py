"""What is inside a .tflite file, and what XNNPACK will run of it.

:func:`op_report` reads the flatbuffer with the schema ai-edge-litert ships
(``ai_edge_litert.schema_py_generated``: op counts per type, TRANSPOSEs and
whether one sits at the graph input or output, Flex and other custom ops) and
then asks the LiteRT interpreter which ops the XNNPACK delegate takes.

How delegation is found: the interpreter is created with XNNPACK applied and
*delegate node fusion disabled*, so XNNPACK claims every op it supports as its
own one-node partition (a DELEGATE node whose outputs are exactly that op's
outputs).  An original op is delegated when a DELEGATE node has its outputs;
every other op runs on TFLite's built-in kernels.  This asks the runtime that
will run the file instead of a hand-kept XNNPACK op table, which goes stale
with every release and cannot see per-op constraints (dtypes, ranks, static
weights).  The answer is for this machine's XNNPACK build; ARM builds support
the same ops (fp16 arithmetic aside).

Flex ops (``Flex*`` custom ops, TensorFlow kernels) are errors: neither
tflite-runtime nor a stock LiteRT build runs them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfedge.backends.registry import missing_runtime
from sfedge.backends.tflite.quiet import native_stderr_silenced
from sfedge.errors import ExportError

__all__ = ["OpReport", "OpInfo", "op_report", "read_ops"]

# Ops that only move or re-type data: not worth a warning when XNNPACK leaves them to TFLite.
_BOOKKEEPING = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE"}


@dataclass
class OpInfo:
    """One operator of the main subgraph, in execution order."""

    index: int
    op: str  # builtin name (CONV_2D) or the custom code (FlexConv3D)
    outputs: list[str]  # output tensor names (litert-torch puts the torch module path here)
    custom: bool = False
    delegated: bool | None = None  # XNNPACK took it (None: not known)
    input_ids: list[int] = field(default_factory=list, repr=False)  # tensor indices in the subgraph
    output_ids: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OpReport:
    """Op inventory of one .tflite file and which ops XNNPACK delegates."""

    path: str
    ops: dict[str, int]  # op type -> count (all subgraphs)
    total: int
    subgraphs: int
    transposes: int
    transpose_at_input: bool
    transpose_at_output: bool
    flex_ops: list[str] = field(default_factory=list)  # Flex* custom codes (TensorFlow kernels)
    custom_ops: list[str] = field(default_factory=list)  # other custom codes
    delegated: dict[str, int] | None = None  # op type -> count taken by XNNPACK (None: not determined)
    not_delegated: dict[str, int] | None = None  # op type -> count left to TFLite kernels
    fallback_ops: list[dict[str, Any]] = field(default_factory=list)  # index, op, first output name
    io_dtypes: dict[str, str] = field(default_factory=dict)  # "input"/"output" -> dtype
    delegation_method: str = ""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    per_op: list[OpInfo] = field(default_factory=list, repr=False)

    @property
    def fully_delegated(self) -> bool | None:
        if self.not_delegated is None:
            return None
        return not self.not_delegated

    def as_dict(self, per_op: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["fully_delegated"] = self.fully_delegated
        if per_op:
            d["per_op"] = [o.as_dict() for o in self.per_op]
        else:
            d.pop("per_op")
        return d

    def summary(self) -> dict[str, Any]:
        """The few numbers an artifact's metadata carries (the full report is a companion JSON)."""
        return {
            "ops": self.total, "op_types": dict(self.ops), "transposes": self.transposes,
            "transpose_at_io": self.transpose_at_input or self.transpose_at_output,
            "xnnpack_delegated": sum((self.delegated or {}).values()) if self.delegated is not None else None,
            "xnnpack_fallback": dict(self.not_delegated) if self.not_delegated is not None else None,
            "flex_ops": list(self.flex_ops), "errors": list(self.errors), "warnings": list(self.warnings),
        }

    def raise_for_errors(self) -> None:
        """ExportError naming the first problem when the file cannot run on stock LiteRT / tflite-runtime."""
        if self.errors:
            raise ExportError(
                f"{Path(self.path).name}: {self.errors[0]}",
                "replace the op in the torch model with one TFLite has built in (see the op report)",
            )


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as e:
        raise missing_runtime("tflite", "reading .tflite files needs ai-edge-litert's flatbuffer schema") from e
    return schema


def _builtin_names(schema: Any) -> dict[int, str]:
    ops = schema.BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_") and isinstance(v, int)}


def _str(b: bytes | None) -> str:
    return b.decode("utf-8", "replace") if b else ""


def read_ops(path: str | os.PathLike[str]) -> tuple[list[list[OpInfo]], dict[str, Any]]:
    """Every subgraph's operators (type, custom flag, output names) and the main subgraph's I/O facts.

    Reads the flatbuffer lazily (no weights are copied); works on files no
    interpreter can load (Flex ops).
    """
    schema = _schema()
    buf = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(buf, 0)
        names = _builtin_names(schema)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
            custom = names.get(code) == "CUSTOM"
            codes.append((_str(oc.CustomCode()) if custom else names.get(code, f"BUILTIN_{code}"), custom))
        graphs: list[list[OpInfo]] = []
        io: dict[str, Any] = {}
        type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        for s in range(model.SubgraphsLength()):
            sg = model.Subgraphs(s)
            ops = []
            for j in range(sg.OperatorsLength()):
                op = sg.Operators(j)
                name, custom = codes[op.OpcodeIndex()]
                outs = [_str(sg.Tensors(int(t)).Name()) for t in op.OutputsAsNumpy() if t >= 0] if op.OutputsLength() else []
                ins = [int(t) for t in op.InputsAsNumpy()] if op.InputsLength() else []
                out_ids = [int(t) for t in op.OutputsAsNumpy()] if op.OutputsLength() else []
                ops.append(OpInfo(j, name, outs, custom, input_ids=ins, output_ids=out_ids))
            graphs.append(ops)
            if s == 0:
                inputs = [int(t) for t in sg.InputsAsNumpy()] if sg.InputsLength() else []
                outputs = [int(t) for t in sg.OutputsAsNumpy()] if sg.OutputsLength() else []
                io = {
                    "inputs": inputs, "outputs": outputs,
                    "input_names": [_str(sg.Tensors(t).Name()) for t in inputs],
                    "output_names": [_str(sg.Tensors(t).Name()) for t in outputs],
                    "input_dtype": type_names.get(sg.Tensors(inputs[0]).Type(), "?").lower() if inputs else "",
                    "output_dtype": type_names.get(sg.Tensors(outputs[0]).Type(), "?").lower() if outputs else "",
                }
    except ExportError:
        raise
    except Exception as e:  # a truncated or foreign file fails deep inside flatbuffers
        raise ExportError(f"{path} is not a readable .tflite flatbuffer ({e})", "re-create the file") from e
    return graphs, io


def _xnnpack_delegation(path: Path, n_ops: int) -> tuple[list[bool] | None, str]:
    """Per main-subgraph op: did XNNPACK take it?  (None and the reason when the interpreter cannot say.)"""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None, "ai-edge-litert is not installed"
    try:
        with native_stderr_silenced():
            interp = Interpreter(model_path=str(path), num_threads=1, experimental_disable_delegate_node_fusion=True)
        interp.allocate_tensors()
        nodes = interp._get_ops_details()  # nodes 0..n-1 are the file's ops; DELEGATE nodes follow
    except Exception as e:  # unresolved ops fail at load or allocation
        return None, f"the LiteRT interpreter cannot load it: {str(e).strip().splitlines()[0] if str(e).strip() else e}"
    delegated_outputs = {tuple(int(t) for t in n["outputs"]) for n in nodes[n_ops:] if n["op_name"] == "DELEGATE"}
    flags = [tuple(int(t) for t in nodes[i]["outputs"]) in delegated_outputs for i in range(min(n_ops, len(nodes)))]
    return flags, "LiteRT interpreter with XNNPACK, delegate node fusion disabled: an op is delegated when a DELEGATE node has exactly its outputs"


def op_report(path: str | os.PathLike[str], *, delegation: bool = True) -> OpReport:
    """Op counts, TRANSPOSEs (and whether one is at the I/O), Flex/custom ops and XNNPACK delegation of ``path``.

    Flex ops become ``errors`` (call :meth:`OpReport.raise_for_errors` to fail
    a build); compute ops that XNNPACK leaves to TFLite's kernels become
    ``warnings`` (they run, but slower, often single-threaded).
    """
    path = Path(path)
    graphs, io = read_ops(path)
    counts: Counter[str] = Counter(o.op for ops in graphs for o in ops)
    main = graphs[0] if graphs else []
    transposes = [o for ops in graphs for o in ops if o.op == "TRANSPOSE"]
    at_in = any(set(o.input_ids) & set(io.get("inputs", [])) for o in main if o.op == "TRANSPOSE")
    at_out = any(set(o.output_ids) & set(io.get("outputs", [])) for o in main if o.op == "TRANSPOSE")
    flex = sorted({o.op for ops in graphs for o in ops if o.custom and o.op.startswith("Flex")})
    custom = sorted({o.op for ops in graphs for o in ops if o.custom and not o.op.startswith("Flex")})
    report = OpReport(
        path=str(path), ops=dict(sorted(counts.items())), total=sum(counts.values()), subgraphs=len(graphs),
        transposes=len(transposes), transpose_at_input=at_in, transpose_at_output=at_out,
        flex_ops=flex, custom_ops=custom,
        io_dtypes={"input": io.get("input_dtype", ""), "output": io.get("output_dtype", "")},
        per_op=main,
    )
    for f in flex:
        report.errors.append(
            f"Flex op {f} (a TensorFlow kernel) does not run on tflite-runtime or a stock LiteRT build"
        )
    for c in custom:
        report.warnings.append(f"custom op {c} needs its kernel registered in the runtime on the device")
    if delegation and not flex:
        flags, how = _xnnpack_delegation(path, len(main))
        report.delegation_method = how
        if flags is not None:
            for o, f in zip(main, flags):
                o.delegated = f
            report.delegated = dict(Counter(o.op for o in main if o.delegated))
            report.not_delegated = dict(Counter(o.op for o in main if o.delegated is False))
            report.fallback_ops = [
                {"index": o.index, "op": o.op, "output": o.outputs[0] if o.outputs else ""}
                for o in main if o.delegated is False
            ]
            slow = sorted({o.op for o in main if o.delegated is False and o.op not in _BOOKKEEPING})
            if slow:
                report.warnings.append(
                    f"XNNPACK does not take {', '.join(slow)}: those ops run on TFLite's reference/optimized kernels"
                )
        elif "cannot load" in how:
            report.errors.append(how)
        else:
            report.warnings.append(how)
    elif flex:
        report.delegation_method = "not determined: the file has Flex ops, which the LiteRT interpreter cannot load"
    return report
