"""sfedge plan's build side: proxies, plans recorded in checkpoints and manifests, per-layer profiles aligned."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sfedge.planning import Plan

SMALL_TARGET = """name = "plan-test-cpu"
description = "ONNX Runtime on this CPU at 64x64 (small and fast, for tests)"
backend = ["onnxruntime"]
precisions = ["fp32"]
default_precision = "fp32"
layout = "NCHW"
threads = 1
input_size = [64, 64]
"""
FAST = ["--runs", "20", "--min-seconds", "0.2", "--warmup-seconds", "0.1", "--processes", "1"]


@pytest.fixture()
def one_torch_thread():
    """Torch on one thread for these small models: on a loaded 2-core machine its second OpenMP thread waits for a core
    at every op (a 4x64x64 U-Net forward took 0.9 s on two threads, 0.04 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dense(tmp_path, widths=(8, 16)):
    from sfedge.checkpoint import save_checkpoint
    from sfedge.models import create_model
    from sfedge.preprocess import FUNDUS_PREPROCESSING

    torch.manual_seed(0)
    model = create_model("unet", widths=list(widths))
    path = tmp_path / "dense.safetensors"
    save_checkpoint(model, path, preprocessing=FUNDUS_PREPROCESSING)
    return model, path


def _synthetic_table(model, shape):
    """A table whose times follow the MAC count (plus a floor), for planning without measuring."""
    from sfedge.latency_models import conv_layers, rank_grid
    from sfedge.profile.latency_table import LatencyTable, RankTime, TableLayer

    layers = []
    for name, s in conv_layers(model, shape):
        dense = 0.05 + s.macs() / 2e8
        ranks = {r: RankTime(0.05 + s.macs(r) / 2e8, 0, 0, 0) for r in rank_grid(s)}
        for t in ranks.values():
            t.ratio = t.low = t.high = t.ms / dense
        layers.append(TableLayer(name, s, dense, ranks))
    whole = 0.3 + sum(e.dense_ms for e in layers)
    return LatencyTable("unet", "key", "plan-test-cpu", "onnxruntime", "fp32", 1, {"onnxruntime": "x"}, layers,
                        whole, 0.3)


def test_proxies_are_zero_at_full_rank_and_fall_with_rank(tmp_path, one_torch_thread):
    from sfedge.calibration import load_calibration
    from sfedge.latency_models import conv_layers
    from sfedge.plan import layer_distortion

    model, _ = _dense(tmp_path)
    layers = {name: sorted({1, 2, 4, s.max_rank}) for name, s in conv_layers(model, (1, 3, 64, 64))}
    energy = layer_distortion(model, layers, proxy="energy")
    images = load_calibration("fundus-demo", (64, 64)).calibration
    sens = layer_distortion(model, layers, proxy="sensitivity", images=images)
    for name, ranks in layers.items():
        e = [energy[name][r] for r in ranks]
        assert e == sorted(e, reverse=True) and e[-1] == pytest.approx(0, abs=1e-9), "energy dropped falls to 0"
        assert sens[name][ranks[-1]] == pytest.approx(0, abs=1e-6), "the full-rank factorization is exact"
        assert all(v >= 0 for v in sens[name].values())
    assert sum(sens[n][1] for n in layers) > 0, "truncating to rank 1 changes the output"


@pytest.mark.slow
def test_a_plan_round_trips_through_checkpoint_and_manifest(tmp_path, one_torch_thread):
    from sfedge.build import build_bundle
    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.nn import factorized_ranks
    from sfedge.plan import distilled_checkpoint, layer_distortion, make_plans

    model, dense_path = _dense(tmp_path)
    table = _synthetic_table(model, (1, 3, 64, 64))
    distortion = layer_distortion(model, {e.name: sorted(e.ranks) for e in table.layers}, proxy="energy")
    budget = (table.rest_ms + sum(min(t.ms for t in e.ranks.values()) for e in table.layers) + table.whole_dense_ms) / 2
    [plan] = make_plans(table, distortion, budgets_ms=[budget], proxy="energy")
    assert plan.ranks() and plan.predicted_ms <= budget + 1e-9
    calib = load_calibration("fundus-demo", (64, 64))
    ck = distilled_checkpoint(dense_path, plan.ranks(), tmp_path / "ck", name="plan", steps=3, calibration=calib,
                              metrics={"plan": plan.as_dict()})
    loaded = load_checkpoint(ck)
    assert Plan.from_dict(loaded.metrics["plan"]).as_dict() == plan.as_dict()
    assert factorized_ranks(loaded.model) == plan.ranks(), "the checkpoint rebuilds the planned structure alone"
    assert loaded.metrics["finetune"]["steps"] == 3 and "distillation" in loaded.metrics["finetune"]["mode"]
    again = distilled_checkpoint(dense_path, plan.ranks(), tmp_path / "ck", name="plan", steps=3, calibration=calib,
                                 metrics={"plan": plan.as_dict()})
    assert again == ck, "cached by dense weights, ranks, steps and calibration"

    target = tmp_path / "plan-test-cpu.toml"
    target.write_text(SMALL_TARGET)
    built = build_bundle(ck, str(target), "fp32", out_dir=tmp_path / "bundles")
    m = built.bundle.manifest["model"]
    assert m["conv"] == "sfconv" and m["plan"] == plan.as_dict()
    assert Plan.from_dict(m["plan"]).ranks() == plan.ranks()


@pytest.mark.slow
def test_distillation_needs_no_labels_and_moves_toward_the_teacher(demo_checkpoints, one_torch_thread):
    """Distilling a truncated copy of the trained demo U-Net on calibration crops brings it closer on held-out crops."""
    import copy

    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.nn import factorize
    from sfedge.parity import compare_outputs
    from sfedge.train import TrainConfig, distill_loss, train

    teacher = load_checkpoint(demo_checkpoints["unet"]).model.eval()
    calib = load_calibration("fundus-demo", (128, 128))
    student = copy.deepcopy(teacher)
    factorize(student, s=0.125)
    x = torch.from_numpy(calib.holdout[:8])

    def judge() -> tuple[float, float]:
        with torch.no_grad():
            out, ref = student.eval()(x), teacher(x)
        return float(distill_loss("binary", out, ref)), compare_outputs(ref.numpy(), out.numpy()).dice_agreement

    loss_before, dice_before = judge()
    result = train(student, TrainConfig(steps=20, batch=6, crop=64, lr=1e-3), teacher=teacher,
                   images=calib.calibration, evaluate=False)
    loss_after, dice_after = judge()
    assert result.dice is None and len(result.losses) == 20, "no labels, no label Dice"
    assert loss_after < loss_before, "closer to the dense model on images it never saw"
    assert dice_after > dice_before


@pytest.mark.slow
def test_layers_align_an_sfconv_model_with_its_vanilla_pair(demo_checkpoints, tmp_path, sfedge_cli):
    """`sfedge profile --layers`: ONNX Runtime's node times, attributed to module paths, SFConv rows beside dense ones."""
    from sfedge.backends.onnxruntime.make import ort_scorer
    from sfedge.checkpoint import load_checkpoint
    from sfedge.export import export_onnx
    from sfedge.nn import factorized_ranks, macs_by_module
    from sfedge.source import ModelSource

    files = {}
    sources = {}
    for name in ("unet-sfconv", "unet"):
        sources[name] = ModelSource.from_checkpoint(load_checkpoint(demo_checkpoints[name]), (64, 64))
        files[name] = tmp_path / f"{name}.onnx"
        export_onnx(sources[name], files[name], score=ort_scorer(1))
    code, out, err = sfedge_cli("profile", str(files["unet-sfconv"]), "--pair", str(files["unet"]), "--layers",
                                "--threads", "1", *FAST, "-o", str(tmp_path / "report"), "--json", timeout=600)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    [comparison] = report["layers"]
    rows = {r["layer"]: r for r in comparison["rows"]}
    sf_model = sources["unet-sfconv"].model
    ranks = factorized_ranks(sf_model)
    assert set(ranks) <= set(rows), "every SFConv layer has a row"
    for layer in ranks:
        r = rows[layer]
        assert r["kind"] == "sfconv" and r["candidate_ms"] > 0 and r["baseline_ms"] > 0, layer
        assert any("Conv" in op for op in r["baseline_ops"]), "aligned with the dense conv of the same module path"
    # MACs of an aligned row are the conv's own: the SFConv pair's and the dense conv's, as torch counts them.
    sf_macs, dense_macs = macs_by_module(sf_model, (1, 3, 64, 64)), macs_by_module(sources["unet"].model, (1, 3, 64, 64))
    for layer in ranks:
        assert rows[layer]["candidate_macs"] == sf_macs[layer]
        assert rows[layer]["baseline_macs"] == dense_macs[layer]
    cand, base = comparison["candidate"], comparison["baseline"]
    for side in (cand, base):
        assert 0 < side["layer_sum_ms"] <= side["run_ms"] * 1.05, "node times add up to at most the run"
    folder = tmp_path / "report"
    assert (folder / "layers.png").is_file() and "## Per layer" in (folder / "report.md").read_text()
    with open(folder / "layers.csv") as f:
        assert {r["layer"] for r in csv.DictReader(f)} >= set(ranks)


def test_cached_layer_ms_prices_a_model_as_it_is(tmp_path, monkeypatch, one_torch_thread):
    """The API other work (cost-aware mixed precision) calls: layer ms from a cached table, never a measurement."""
    import copy

    from sfedge.checkpoint import load_checkpoint, save_checkpoint
    from sfedge.latency_models import model_key
    from sfedge.nn import factorize
    from sfedge.plan import cached_layer_ms, table_cache_path
    from sfedge.preprocess import FUNDUS_PREPROCESSING
    from sfedge.targets import load_target

    monkeypatch.setenv("SFEDGE_CACHE", str(tmp_path / "cache"))
    model, dense_path = _dense(tmp_path)
    target = tmp_path / "plan-test-cpu.toml"
    target.write_text(SMALL_TARGET)
    assert cached_layer_ms(dense_path, str(target)) is None, "no table yet: nothing is measured"

    table = _synthetic_table(model, (1, 3, 64, 64))
    key = model_key(load_checkpoint(dense_path), (1, 3, 64, 64))
    table.save(table_cache_path(key, load_target(target).name, "onnxruntime", "fp32", 1))
    dense_ms = cached_layer_ms(dense_path, str(target))
    assert dense_ms == {e.name: e.dense_ms for e in table.layers}

    planned = copy.deepcopy(model)
    first = table.layers[1]
    rank = sorted(first.ranks)[0]
    factorize(planned, ranks={first.name: rank})
    path = tmp_path / "planned.safetensors"
    save_checkpoint(planned, path, preprocessing=FUNDUS_PREPROCESSING, record_factorization=True)
    priced = cached_layer_ms(path, str(target))
    assert priced[first.name] == pytest.approx(first.ranks[rank].ms), "an SFConv layer is priced at its rank"
    assert {k: v for k, v in priced.items() if k != first.name} == {k: v for k, v in dense_ms.items() if k != first.name}
