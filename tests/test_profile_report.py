"""Reports: the folder's files are written and readable, plots are real PNGs, compare merges devices."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from profiling_workloads import matmul_chain

from sfedge.profile.compare import compare_reports
from sfedge.profile.report import REPORT_JSON, Report, load_report
from sfedge.profile.schedule import profile_subjects
from sfedge.profile.types import MeasureConfig, Subject

CFG = MeasureConfig(warmup_runs=1, warmup_seconds=0.05, runs=20, min_seconds=0.1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real paired run (2 vs 4 MatMuls) and one single run, on ONNX Runtime."""
    tmp = tmp_path_factory.mktemp("models")
    a = Subject(matmul_chain(tmp / "two.onnx", 2, 128), "onnxruntime", "two", "fp32", threads=1)
    b = Subject(matmul_chain(tmp / "four.onnx", 4, 128), "onnxruntime", "four", "fp32", threads=1)
    c = Subject(matmul_chain(tmp / "one.onnx", 1, 128), "onnxruntime", "one", "fp32", threads=1)
    return profile_subjects([c], [(a, b)], CFG)


def test_report_folder_holds_every_raw_sample(measured, tmp_path):
    measurements, pairings = measured
    report = Report.create(measurements, pairings, CFG, device="dev-a")
    files = {p.name for p in report.write(tmp_path / "rep")}
    assert {"report.json", "summary.csv", "pairs.csv", "samples.csv", "report.md", "latency.png", "speedup.png",
            "memory.png"} <= files
    back = load_report(tmp_path / "rep")
    assert back.device == "dev-a" and len(back.measurements) == 3
    for m, m2 in zip(measurements, back.measurements):
        assert m2.samples_ms == m.samples_ms and m2.rounds == m.rounds and m2.warmup_ms == m.warmup_ms
        assert m2.summary == m.summary
    assert back.pairings[0].ratio.as_dict() == pairings[0].ratio.as_dict()
    raw = json.loads((tmp_path / "rep" / REPORT_JSON).read_text())
    assert raw["schema"] == "sfedge-profile/1" and raw["host"]["cpu_count"] == os.cpu_count()
    assert raw["config"]["runs"] == CFG.runs

    with open(tmp_path / "rep" / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(m.samples_ms) for m in measurements)
    first = [float(r["ms"]) for r in rows if r["label"] == measurements[0].label]
    assert np.allclose(first, measurements[0].samples_ms, atol=1e-6)
    with open(tmp_path / "rep" / "summary.csv") as f:
        summary = {r["label"]: r for r in csv.DictReader(f)}
    assert float(summary["two onnxruntime fp32"]["median_ms"]) == pytest.approx(measurements[0].summary.median)
    with open(tmp_path / "rep" / "pairs.csv") as f:
        [pair] = list(csv.DictReader(f))
    assert float(pair["speedup_low"]) <= float(pair["speedup"]) <= float(pair["speedup_high"])

    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Paired comparisons" in md and "two onnxruntime fp32" in md and "](latency.png)" in md


def test_plots_are_readable_pngs(measured, tmp_path):
    import matplotlib.image as mpimg

    Report.create(*measured, CFG).write(tmp_path / "rep")
    for name in ("latency.png", "speedup.png", "memory.png"):
        img = mpimg.imread(tmp_path / "rep" / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01, f"{name} is blank"


def test_terminal_table_names_each_configuration(measured):
    from rich.console import Console

    console = Console(record=True, width=200)
    for t in Report.create(*measured, CFG).tables():
        console.print(t)
    text = console.export_text()
    assert "speedup" in text and "two onnxruntime fp32" in text and "one onnxruntime fp32" in text


def test_plots_are_skipped_with_a_note_without_matplotlib(measured, tmp_path):
    """On a device without matplotlib the report is complete except for the PNGs, and says why."""
    Report.create(*measured, CFG, device="pi").write(tmp_path / "src", plots=False)
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    code = ("from sfedge.profile.report import load_report; "
            f"load_report({str(tmp_path / 'src')!r}).write({str(tmp_path / 'out')!r})")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert not list((tmp_path / "out").glob("*.png"))
    assert "matplotlib is not installed" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_compare_merges_two_devices(measured, tmp_path, sfedge_cli):
    measurements, pairings = measured
    Report.create(measurements, pairings, CFG, device="dev-a").write(tmp_path / "a", plots=False)
    Report.create(measurements[2:], [], CFG, device="dev-b").write(tmp_path / "b", plots=False)
    comparison = compare_reports([tmp_path / "a", tmp_path / "b"])
    header, rows = comparison.grid()
    assert header == ["measured", "dev-a", "dev-b"]
    by_name = {r[0]: r[1:] for r in rows}
    speed = by_name["speedup two onnxruntime fp32 vs four onnxruntime fp32"]
    assert speed[0].endswith("]") and speed[1] == "-"  # the pair was measured on dev-a only
    one = by_name["median one onnxruntime fp32"]
    assert all(" ms" in cell for cell in one)

    code, out, err = sfedge_cli("compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "cmp"),
                                "--json")
    assert code == 0, err
    merged = json.loads(out)
    assert merged["devices"] == ["dev-a", "dev-b"] and len(merged["summary"]) == 4
    assert {p.name for p in (tmp_path / "cmp").iterdir()} >= {"compare.json", "compare.md", "compare.png",
                                                              "compare_pairs.csv", "compare_summary.csv"}


def test_compare_refuses_a_folder_that_is_not_a_report(tmp_path, sfedge_cli):
    code, out, err = sfedge_cli("compare", str(tmp_path))
    assert code != 0 and "is not a profile report" in err and len(err.strip().splitlines()) == 1
