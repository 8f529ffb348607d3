"""The tiny ONNX model `sfedge doctor` builds into a TensorRT engine on a device, and its reference outputs.

    python tests/doctor_model.py        # (re)writes sfedge/selftest/doctor.onnx and doctor.npz

A small U-Net-shaped graph (1x3x64x64 in, 1x1x64x64 logits out) with the layers sfedge's models put in front of
TensorRT: 3x3 and 1x1 convolutions, an SFConv-style factorized pair (1x3 then 3x1), ReLU, max pooling, a
stride-2 ConvTranspose, a skip Concat.  Opset 13: inside every parser sfedge targets (TensorRT 8.5: 7-17,
10.x/11.x: 9-24).  Weights are He-initialised from a fixed seed (no checkpoint to ship; the point is TensorRT's
arithmetic against ONNX Runtime's, and these weights give outputs spread over several units, not a constant).
The reference input is a real fundus crop (skimage.data.retina(), scaled to [0, 1]); the reference output is
ONNX Runtime's (CPU, fp32), which the doctor uses when the device has no ONNX Runtime of its own.

tests/test_doctor.py checks that the shipped files are what this script writes.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sfedge" / "selftest"
SEED = 20240613
OPSET = 13


def build_model() -> onnx.ModelProto:
    """The doctor's ONNX graph, deterministic (same bytes on every run)."""
    rng = np.random.default_rng(SEED)
    inits: list[TensorProto] = []

    def weight(name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
                                             name))
        return name

    def bias(name: str, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name))
        return name

    def conv(name: str, x: str, cin: int, cout: int, k: tuple[int, int], relu: bool = True) -> tuple[str, list]:
        pads = [k[0] // 2, k[1] // 2, k[0] // 2, k[1] // 2]
        nodes = [helper.make_node("Conv", [x, weight(f"{name}.w", (cout, cin, *k)), bias(f"{name}.b", cout)],
                                  [f"{name}.out"], name=name, kernel_shape=list(k), pads=pads)]
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.act"))
            return f"{name}.relu", nodes
        return f"{name}.out", nodes

    nodes: list[onnx.NodeProto] = []
    x, n = conv("inc", "input", 3, 8, (3, 3)); nodes += n  # noqa: E702
    a, n = conv("sf.row", x, 8, 4, (1, 3), relu=False); nodes += n  # noqa: E702  (SFConv: rank-4 1x3 ...)
    skip, n = conv("sf.col", a, 4, 8, (3, 1)); nodes += n  # noqa: E702  (... then 3x1 back to 8 channels)
    nodes.append(helper.make_node("MaxPool", [skip], ["down"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    d, n = conv("mid", "down", 8, 16, (3, 3)); nodes += n  # noqa: E702
    nodes.append(helper.make_node("ConvTranspose", [d, weight("up.w", (16, 8, 2, 2)), bias("up.b", 8)], ["up"],
                                  name="up", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Concat", ["up", skip], ["cat"], name="cat", axis=1))
    y, n = conv("dec", "cat", 16, 8, (3, 3)); nodes += n  # noqa: E702
    _, n = conv("head", y, 8, 1, (1, 1), relu=False); nodes += n  # noqa: E702
    nodes.append(helper.make_node("Identity", ["head.out"], ["logits"], name="output"))

    graph = helper.make_graph(
        nodes, "sfedge-doctor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 64, 64])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sfedge-doctor",
                              producer_version="1")
    model.ir_version = 8  # ONNX 1.10+: readable by TensorRT 8.5's parser
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_input() -> np.ndarray:
    """A 64x64 crop of the fundus photograph (vessels and background), NCHW float32 in [0, 1]."""
    from skimage import data

    retina = data.retina()  # 1411 x 1411 x 3, uint8
    crop = retina[640:704, 400:464, :3].astype(np.float32) / 255.0
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None])


def reference_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output on ``x`` (CPU, fp32, one thread: the same numbers on every machine that runs it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": x})[0], np.float32)


def npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """The reference file's contents (input and output; uncompressed .npz, readable with numpy alone)."""
    buf = io.BytesIO()
    np.savez(buf, input=x, logits=y)
    return buf.getvalue()


def write(folder: Path = OUT) -> tuple[Path, Path]:
    """Write doctor.onnx and doctor.npz into ``folder``."""
    model = build_model()
    x = reference_input()
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, npz_path = folder / "doctor.onnx", folder / "doctor.npz"
    onnx_path.write_bytes(model.SerializeToString())
    npz_path.write_bytes(npz_bytes(x, reference_output(model, x)))
    return onnx_path, npz_path


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
