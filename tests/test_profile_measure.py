"""Measurement: worker processes, warm-up and run minimums, paired alternation, memory, runners per backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from profiling_workloads import RUNNER_SPEC, busy_loop, matmul_chain, wrap_bundle

from sfedge.errors import SfedgeError
from sfedge.profile.schedule import measure, measure_pair
from sfedge.profile.subjects import pair_up, subjects_from
from sfedge.profile.types import MeasureConfig, Subject

FAST = MeasureConfig(warmup_runs=2, warmup_seconds=0.1, runs=20, min_seconds=0.3)


def _busy(tmp: Path, name: str, iterations: int, repeats: int = 1) -> Subject:
    return Subject(busy_loop(tmp / f"{name}.json", iterations, repeats), "busyloop", name, "fp32", runner=RUNNER_SPEC)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """A small real U-Net as the three artifacts sfedge runs: checkpoint (torch), .onnx and .tflite."""
    import torch

    from sfedge.backends.tflite.convert import convert_float
    from sfedge.checkpoint import save_checkpoint
    from sfedge.models import create_model

    folder = tmp_path_factory.mktemp("tiny-unet")
    torch.manual_seed(0)
    model = create_model("unet", widths=[8, 16]).eval()
    save_checkpoint(model, folder / "unet.safetensors")
    x = torch.zeros(1, 3, 64, 64)
    torch.onnx.export(model, (x,), str(folder / "unet.onnx"), dynamo=False, input_names=["input"],
                      output_names=["output"])
    convert_float(model, (1, 3, 64, 64), "NHWC", folder / "unet.tflite")
    with torch.no_grad():
        reference = model(torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)))
    return {"folder": folder, "reference": reference.numpy()}


@pytest.mark.parametrize("backend,file", [("pytorch", "unet.safetensors"), ("onnxruntime", "unet.onnx"),
                                          ("tflite", "unet.tflite")])
def test_runner_per_backend_on_real_artifacts(tiny_unet, backend, file):
    """Each runtime runs in its own worker; load, first inference and the steady state are reported apart."""
    subject = Subject(tiny_unet["folder"] / file, backend, "unet", "fp32", threads=1,
                      options={"input_shape": [1, 3, 64, 64]} if backend == "pytorch" else {})
    m = measure(subject, FAST)
    s = m.summary
    assert s.n >= FAST.runs and sum(m.samples_ms) / 1e3 >= FAST.min_seconds
    assert len(m.warmup_ms) >= FAST.warmup_runs and sum(m.warmup_ms) / 1e3 >= FAST.warmup_seconds
    assert m.load_ms > 0 and m.first_ms > 0 and s.min > 0
    assert s.min <= s.median <= s.p90 <= s.p99 <= s.max
    assert m.artifact_bytes == (tiny_unet["folder"] / file).stat().st_size
    mem = m.memory
    assert 0 < mem["rss_before_load"] <= mem["peak_rss_lifetime"]
    assert mem["peak_rss_steady"] >= mem["rss_after_first"] * 0.95
    assert m.versions, "the runner names its runtime's version"
    assert m.inputs and m.inputs[0]["shape"][0] == 1


def test_single_run_honours_minimum_runs_and_seconds(tmp_path):
    onnx = matmul_chain(tmp_path / "m.onnx", 2, 128)
    cfg = MeasureConfig(warmup_runs=3, warmup_seconds=0.2, runs=30, min_seconds=0.5)
    m = measure(Subject(onnx, "onnxruntime", "m", "fp32", threads=1), cfg)
    assert len(m.samples_ms) >= 30 and sum(m.samples_ms) >= 500
    assert len(m.warmup_ms) >= 3 and sum(m.warmup_ms) >= 200
    assert m.feed == "random"
    assert all(b >= a for a, b in zip(m.starts_s, m.starts_s[1:])), "samples are in time order"


def _assert_alternates(a, b) -> None:
    """Rounds follow each other in time; inside one, A and B blocks alternate (A1 B1 A2 B2 ...), A first in even
    rounds and B first in odd ones (the rotation reverses), and every process of both sides takes part."""
    blocks = {}
    for m, side in ((a, "A"), (b, "B")):
        for t, r, k in zip(m.starts_s, m.rounds, m.process):
            lo, hi = blocks.get((r, side, k), (t, t))
            blocks[(r, side, k)] = (min(lo, t), max(hi, t))
    rounds = sorted({r for r, _, _ in blocks})
    assert len(rounds) >= 20
    previous_end = -1.0
    for r in rounds:
        mine = sorted((span, side, k) for (rr, side, k), span in blocks.items() if rr == r)
        sides = [side for _, side, _ in mine]
        assert sides == (["A", "B"] if r % 2 == 0 else ["B", "A"]) * (len(sides) // 2), f"round {r}: {sides}"
        assert {k for _, _, k in mine} == set(range(len(sides) // 2)), "every process runs in every round"
        spans = [span for span, _, _ in mine]
        assert previous_end < spans[0][0] and all(x[1] < y[0] for x, y in zip(spans, spans[1:])), "blocks overlap"
        previous_end = spans[-1][1]


def test_identical_artifacts_in_separate_processes_compare_as_one(tiny_unet):
    """The same .tflite as A and as B (three processes each): the paired ratio's CI must contain exactly 1."""
    art = tiny_unet["folder"] / "unet.tflite"
    a = Subject(art, "tflite", "unet", "fp32", label="A", threads=1)
    b = Subject(art, "tflite", "unet", "fp32", label="A again", threads=1)
    ma, mb, pairing = measure_pair(a, b, MeasureConfig(runs=50, min_seconds=0.5, confidence=0.99, resamples=4000))
    _assert_alternates(ma, mb)
    assert set(ma.process) == set(mb.process) == {0, 1, 2} and len(ma.per_process) == 3
    assert pairing.ratio.paired and pairing.rounds >= 20
    assert pairing.ratio.contains(1.0), pairing.ratio
    # Informative: the interval must still tell "the same" from a 2x change either way. Its width is the
    # machine's noise, not the method's: 0.05-0.12 on a quiet machine here, 0.65 on a busy CI runner (3 Dec).
    assert 0.5 < pairing.ratio.low and pairing.ratio.high < 2.0, pairing.ratio


def test_paired_ratio_of_a_workload_twice_as_costly(tmp_path):
    """B does A's exact work twice (the same matrix products): the CI must meet 1/2.

    "Exactly twice" holds to within 1% (timed in one process, B takes 0.2-0.5%
    more than two A's: the longer run meets proportionally more interrupts and
    pays a second loop set-up), so the CI must overlap [0.495, 0.505]. On a quiet
    machine the 99% interval is 2-4% wide; on shared runners it reached 6% and 12%
    (3 Dec, fresh clones), so "informative" here means what it means for the
    identical pair: the interval tells 1/2 from 1 (it excludes 1) and from 1/4.
    """
    a = _busy(tmp_path, "once", 100, repeats=1)
    b = _busy(tmp_path, "twice", 100, repeats=2)
    ma, mb, pairing = measure_pair(a, b, MeasureConfig(runs=50, min_seconds=0.5, confidence=0.99, resamples=4000))
    _assert_alternates(ma, mb)
    ci = pairing.ratio
    assert ci.ratio == pytest.approx(np.median(ma.samples_ms) / np.median(mb.samples_ms))
    assert ci.low <= 0.505 and ci.high >= 0.495, ci
    assert 0.25 < ci.low and ci.high < 1.0, "the interval must tell half the time from the same time"


def test_memory_figures_rise_with_a_model_that_allocates_more(tmp_path):
    small = matmul_chain(tmp_path / "small.onnx", 1, 256)  # 256 KiB of weights
    large = matmul_chain(tmp_path / "large.onnx", 16, 1024, rows=16)  # 64 MiB of weights, little arithmetic
    cfg = MeasureConfig(warmup_runs=1, warmup_seconds=0.05, runs=5, min_seconds=0.05)
    ms = measure(Subject(small, "onnxruntime", "small", "fp32", threads=1), cfg)
    ml = measure(Subject(large, "onnxruntime", "large", "fp32", threads=1), cfg)
    weights = 16 * 1024 * 1024 * 4
    grow = lambda m: m.memory["rss_after_load"] - m.memory["rss_before_load"]  # noqa: E731
    assert grow(ml) - grow(ms) > 0.5 * weights
    assert ml.memory["peak_rss_steady"] - ms.memory["peak_rss_steady"] > 0.5 * weights
    assert ml.memory["peak_rss_lifetime"] > ms.memory["peak_rss_lifetime"]
    assert ml.artifact_bytes > weights > ms.artifact_bytes


def test_a_broken_artifact_fails_with_one_line_naming_it(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(SfedgeError) as e:
        measure(Subject(bad, "onnxruntime", "broken", "fp32"), FAST)
    assert "broken" in str(e.value) and "\n" not in str(e.value)


def test_bundles_give_one_subject_per_artifact_and_pair_by_backend(tmp_path):
    onnx_a = matmul_chain(tmp_path / "a.onnx", 1, 64)
    onnx_b = matmul_chain(tmp_path / "b.onnx", 2, 64)
    sf = wrap_bundle(tmp_path / "sf", [{"file": onnx_a, "backend": "onnxruntime"}], model="chain-sfconv",
                     conv="sfconv", s=0.25)
    van = wrap_bundle(tmp_path / "van", [{"file": onnx_b, "backend": "onnxruntime"}], model="chain")
    [c] = subjects_from(sf)
    [v] = subjects_from(van)
    assert c.label == "chain-sfconv(s=0.25) onnxruntime fp32" and c.threads == 1
    assert c.size_bytes == onnx_a.stat().st_size
    assert pair_up([c], [v]) == [(c, v)]
    other = wrap_bundle(tmp_path / "int8", [{"file": onnx_b, "backend": "onnxruntime"}], model="chain", precision="int8")
    with pytest.raises(SfedgeError, match="no --pair artifact matches"):
        pair_up([c], subjects_from(other))
    with pytest.raises(SfedgeError, match="no tflite artifact"):
        subjects_from(sf, "tflite")


TORCH_BLOCKER = "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def test_profile_path_runs_without_torch(tmp_path, tiny_unet):
    """`sfedge profile` with torch unimportable, in the parent and in the workers (the runtime-only install)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(TORCH_BLOCKER)
    sf = wrap_bundle(tmp_path / "sf", [{"file": tiny_unet["folder"] / "unet.onnx", "backend": "onnxruntime"},
                                       {"file": tiny_unet["folder"] / "unet.tflite", "backend": "tflite"}],
                     model="unet-sfconv", conv="sfconv", s=0.25)
    van = wrap_bundle(tmp_path / "van", [{"file": tiny_unet["folder"] / "unet.onnx", "backend": "onnxruntime"},
                                         {"file": tiny_unet["folder"] / "unet.tflite", "backend": "tflite"}],
                      model="unet")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0, "the blocker must make torch unimportable"
    p = subprocess.run(
        [sys.executable, "-m", "sfedge.cli", "profile", str(sf), "--pair", str(van), "-o", str(tmp_path / "rep"),
         "--runs", "10", "--min-seconds", "0.1", "--warmup-seconds", "0.05", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert {r["backend"] for r in out["pairs"]} == {"onnxruntime", "tflite"}
    assert (tmp_path / "rep" / "report.json").is_file()
