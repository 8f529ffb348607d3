"""`sfedge inspect`: what a model, checkpoint, ONNX file, .tflite file or bundle is."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

from sfedge.backends.tflite.ops import op_report
from sfedge.bundle import check_files, is_bundle, load_bundle
from sfedge.commands.model_options import MODEL_HELP, add_model_options, model_options
from sfedge.console import console, fmt_bytes, print_json, table
from sfedge.errors import ConfigError

EPILOG = """examples:
  sfedge inspect --models                        the model registry
  sfedge inspect unet-sfconv --input-size 256 256
  sfedge inspect monai.networks.nets:UNet --config unet.json     any model spec: params, MACs, layers
  sfedge inspect .cache/demo/unet-sfconv-*.safetensors   params, MACs, ranks, flatness per layer
  sfedge inspect model.onnx                      opset, ops, I/O, sfedge metadata
  sfedge inspect model.tflite                    ops, TRANSPOSEs, XNNPACK delegation, Flex ops
  sfedge inspect bundles/unet__host-cpu__int8    the manifest in brief"""


def register(sub: argparse._SubParsersAction, verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("thing", nargs="?", help=MODEL_HELP + "; or an .onnx, .tflite or bundle folder")
    p.add_argument("--models", action="store_true", help="list the model registry")
    p.add_argument("--input-size", nargs=2, type=int, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.models or not args.thing:
        return _models(args)
    p = Path(args.thing)
    if is_bundle(p):
        info = _bundle(p)
    elif p.suffix == ".onnx":
        info = _onnx(p)
    elif p.suffix == ".tflite":
        info = _tflite(p)
    else:
        info = _model(args.thing, tuple(args.input_size), model_options(args))
    if args.json:
        print_json(info)
    else:
        _print(info)
    return 0


def _models(args: argparse.Namespace) -> int:
    from sfedge.models import list_models, model_entry

    rows = [[n, model_entry(n).description, json.dumps(model_entry(n).defaults)] for n in list_models()]
    if args.json:
        print_json([{"name": r[0], "description": r[1], "defaults": json.loads(r[2])} for r in rows])
    else:
        console.print(table("models", ["name", "description", "default config"], rows))
    return 0


def _model(thing: str, hw: tuple[int, int], options: dict[str, Any]) -> dict[str, Any]:
    from sfedge.nn import SFConv2d, count_macs, count_params, flatness_report
    from sfedge.source import ModelSource, resolve_model

    ck = resolve_model(thing, **options)
    source = ModelSource.from_checkpoint(ck, hw)
    model, shape = source.model, source.input_shape
    layers = [{"layer": n, "shape": f"{m.out_channels}x{m.in_channels}x{m.kernel_size[0]}x{m.kernel_size[1]}",
               "rank": m.rank} for n, m in model.named_modules() if isinstance(m, SFConv2d)]
    flat = {r.name: r for r in flatness_report(model)}
    for row in layers:
        f = flat[row["layer"]]
        row["kl_to_uniform"], row["effective_rank"] = round(f.kl, 4), round(f.effective_rank, 2)
    return {"kind": "model", "name": ck.name, "checkpoint": str(ck.path) if ck.path else None,
            "source": ck.source or {"kind": "registry", "spec": ck.name}, "task": source.task,
            "config": ck.config, "weights_sha256": ck.weights_sha256, "params": count_params(model),
            "macs": count_macs(model, shape), "input_shape": list(shape), "metrics": ck.metrics,
            "notes": source.notes, "sfconv_layers": layers}


def _onnx(path: Path) -> dict[str, Any]:
    try:
        import onnx
    except ImportError as err:
        raise ConfigError("inspecting .onnx files needs the onnx package", "pip install 'sfedge[build]'") from err
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable ONNX model ({e})".splitlines()[0], "re-export it") from e

    def io(vs: Any) -> list[dict[str, Any]]:
        out = []
        for v in vs:
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]})
        return out

    ops = collections.Counter(n.op_type for n in m.graph.node)
    return {"kind": "onnx", "path": str(path), "size": path.stat().st_size, "ir_version": m.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import}, "nodes": len(m.graph.node),
            "ops": dict(ops.most_common()), "inputs": io(m.graph.input), "outputs": io(m.graph.output),
            "metadata": {p.key: p.value for p in m.metadata_props}}


def _tflite(path: Path) -> dict[str, Any]:
    rep = op_report(path)
    return {"kind": "tflite", "path": str(path), "size": path.stat().st_size, **rep.as_dict()}


def _bundle(path: Path) -> dict[str, Any]:
    b = load_bundle(path)
    fc = check_files(b)
    m = b.manifest
    return {"kind": "bundle", "path": str(path), "model": m["model"]["name"], "target": m["target"]["name"],
            "precision": m["precision"], "created": m["created"], "sfedge_version": m["sfedge_version"],
            "weights_sha256": m["model"]["weights_sha256"], "params": m["model"]["params"], "macs": m["model"]["macs"],
            "calibration": m["calibration"], "toolchain": m["toolchain"],
            "artifacts": [{**{k: a.get(k) for k in ("backend", "kind", "path", "precision", "size", "parity",
                                                    "shifted_parity", "float_layers")},
                           "int8_input": _int8_input(a, m["model"].get("preprocessing")
                                                     or m["calibration"].get("preprocessing"))}
                          for a in m["artifacts"]],
            "files_ok": fc.passed, "files_changed": fc.changed, "files_missing": fc.missing}


def _int8_input(artifact: dict[str, Any], pre: dict[str, Any] | None) -> str | None:
    """How camera bytes become this artifact's int8 input (None for a float input)."""
    from sfedge.preprocess import Preprocessing, int8_pixel_map_text

    ins = artifact.get("inputs") or []
    if not ins or not ins[0].get("scale"):
        return None
    i = ins[0]
    if not pre:
        return f"int8 input: real = {i['scale']:.6g} * (q - {i['zero_point']})"
    return int8_pixel_map_text(Preprocessing.from_dict(pre), float(i["scale"]), int(i["zero_point"]))


def _print(info: dict[str, Any]) -> None:
    kind = info["kind"]
    scalars = [[k, fmt_bytes(v) if k == "size" else (f"{v:,}" if isinstance(v, int) else str(v))]
               for k, v in info.items() if not isinstance(v, (list, dict)) and k != "kind"]
    console.print(table(f"{kind}", ["key", "value"], scalars))
    if kind == "model":
        if info["sfconv_layers"]:
            rows = [[r["layer"], r["shape"], r["rank"], r["kl_to_uniform"], r["effective_rank"]] for r in info["sfconv_layers"]]
            console.print(table("SFConv layers", ["layer", "shape", "rank", "KL(p||U)", "effective rank"], rows))
        console.print(f"config: {json.dumps(info['config'])}")
        console.print(f"source: {json.dumps(info['source'])}")
        for note in info.get("notes") or []:
            console.print(f"[dim]note:[/] {note}")
    elif kind == "onnx":
        console.print(table("ops", ["op", "count"], [[k, v] for k, v in info["ops"].items()]))
        console.print(table("I/O", ["name", "dtype", "shape"], [[v["name"], v["dtype"], str(v["shape"])]
                                                                 for v in info["inputs"] + info["outputs"]]))
        if info["metadata"]:
            console.print(table("metadata_props", ["key", "value"], [[k, v[:100]] for k, v in info["metadata"].items()]))
    elif kind == "tflite":
        rest = {k: v for k, v in info.items() if isinstance(v, (list, dict))}
        for k, v in rest.items():
            if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
                console.print(table(k, ["key", "value"], [[kk, vv] for kk, vv in v.items()]))
            else:
                console.print(f"{k}: {json.dumps(v)[:400]}")
    elif kind == "bundle":
        rows = [[a["backend"], a["kind"], a["path"], a["precision"], fmt_bytes(a["size"]),
                 ", ".join(f"{k} {v:.4g}" for k, v in (a["parity"] or {}).items()
                           if k in ("max_abs", "cosine", "dice_agreement") and v is not None),
                 len(a["float_layers"] or [])] for a in info["artifacts"]]
        console.print(table("artifacts", ["backend", "kind", "path", "precision", "size", "parity", "float layers"], rows))
        for a in info["artifacts"]:
            if a.get("shifted_parity"):
                console.print(f"{a['path']}: shifted held-out mask Dice {a['shifted_parity'].get('dice_agreement')}")
            if a.get("int8_input"):
                console.print(f"{a['path']}: {a['int8_input']}")
        console.print(f"toolchain: {', '.join(f'{k} {v}' for k, v in info['toolchain'].items())}")
