"""Planned ranks vs uniform s on host-cpu: latency tables, per-layer plans, paired latency, held-out Dice, parity.

For the demo U-Net (16-32-64-128) and the wider 32-64-128-256 U-Net, on TFLite
fp32, TFLite int8 and ONNX Runtime fp32 (2 threads):

* the latency table (each conv layer alone, dense and at a grid of ranks,
  checked against whole uniform models), cached per target and runtime;
* uniform s in {1, 0.5, 0.25, 0.125} and three plans, every one fine-tuned
  the same number of distillation steps from the dense model on the
  calibration images;
* all of them built (parity-gated), checked against vanilla, scored on the
  held-out pseudo-labels, and measured in one rotating run with the vanilla
  bundle (paired ratios);
* the aims, side by side: at the latency of uniform s=0.25 (within 5%) a plan
  reaches the held-out Dice of uniform s=0.5; at the Dice of uniform s=0.25 a
  plan is at least 1.25x faster; the table predicts every whole model within
  15%.  A missed aim comes with the per-layer numbers that explain it.

The three budgets (the table's predictions): uniform s=0.5's time, uniform
s=0.25's time, and s=0.25's time / 1.25.  Everything is cached ($SFEDGE_CACHE:
tables, proxies, fine-tuned checkpoints; bundles under the bench folder), so a
second run only measures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

THREADS = 2
FINETUNE_STEPS = 150  # distillation steps for every uniform and planned model (same for all: the comparison is fair)
UNIFORM_S = (1.0, 0.5, 0.25, 0.125)
MODELS = {"demo 16-32-64-128": [16, 32, 64, 128], "32-64-128-256": [32, 64, 128, 256]}
WIDE_TRAIN_STEPS = 400  # the wider dense model is trained once (cached) on the fundus demo
CONFIGS = (("tflite", "fp32"), ("tflite", "int8"), ("onnxruntime", "fp32"))
# host-cpu's facts, one backend each, so a bundle builds only the artifact measured (host-cpu itself builds both;
# its ONNX Runtime int8 Q/DQ file exists for TensorRT, not for speed here).  Same name: tables are host-cpu's.
TARGET = """name = "host-cpu"
description = "host-cpu, {backend} only (bench)"
backend = ["{backend}"]
precisions = ["fp32", "int8"]
default_precision = "fp32"
layout = "{layout}"
threads = 2
input_size = [256, 256]
[tolerances.fp32]
relative_max_abs = 1e-4
cosine = 0.99999
[tolerances.int8]
dice_agreement = 0.98
"""


def _dense_checkpoints(work: Path) -> dict[str, Path]:
    from dataclasses import replace

    from sfedge.demo import DEMO_TRAIN, demo_cache_dir, demo_checkpoints
    from sfedge.train import train_or_load

    out = {"demo 16-32-64-128": demo_checkpoints()["unet"]}
    ck, _ = train_or_load("unet", {"widths": MODELS["32-64-128-256"]}, demo_cache_dir(),
                          replace(DEMO_TRAIN, steps=WIDE_TRAIN_STEPS))
    out["32-64-128-256"] = ck.path
    return out


def _uniform_ranks(table: Any, s: float) -> dict[str, int]:
    from sfedge.nn import rank_for

    return {e.name: rank_for(s, e.shape.in_channels, e.shape.out_channels) for e in table.layers}


def _one(label: str, dense_path: Path, backend: str, precision: str, work: Path) -> dict[str, Any]:
    """Table, plans, fine-tunes, builds and one rotating measurement for one model and one runtime/precision."""
    from sfedge.calibration import load_calibration
    from sfedge.checkpoint import load_checkpoint
    from sfedge.plan import cached_distortion, distilled_checkpoint, latency_table, layer_choices
    from sfedge.planning import LayerChoices, fastest_ms, snap, solve
    from sfedge.profile.latency_table import TABLE_MEASURE
    from sfedge.profile.types import MeasureConfig
    from sfedge.sweep import SweepPoint, evaluate_points
    from sfedge.targets import load_target
    from sfedge.train import TrainConfig

    tfile = work / "targets" / backend / "host-cpu.toml"  # a target file is named after its target
    tfile.parent.mkdir(parents=True, exist_ok=True)
    tfile.write_text(TARGET.format(backend=backend, layout="NHWC" if backend == "tflite" else "NCHW"))
    target = load_target(tfile)
    dense = load_checkpoint(dense_path)
    calib = load_calibration("fundus-demo", (256, 256))
    say = _say(f"{label} {backend} {precision}")
    table = latency_table(dense, target, backend=backend, precision=precision, config=TABLE_MEASURE,
                          calibration=calib, progress=say)
    distortion = cached_distortion(dense, {e.name: sorted(e.ranks) for e in table.layers}, "sensitivity", calib)
    choices = layer_choices(table, distortion)
    floor = fastest_ms([LayerChoices(c.name, snap(c.options)) for c in choices], table.rest_ms)
    pred = {s: table.predict(_uniform_ranks(table, s)) for s in UNIFORM_S}
    budgets = {"plan@s0.5": pred[0.5], "plan@s0.25": pred[0.25], "plan@s0.25/1.25": pred[0.25] / 1.25}
    notes = []
    info = {"target": table.target, "backend": backend, "precision": precision, "stated_error": table.stated_error}
    plans = {}
    for name, b in budgets.items():
        if b < floor * 1.001:
            notes.append(f"{name}: budget {b:.3f} ms is below the fastest plan the table allows ({floor:.3f} ms); "
                         "planned at that floor instead")
            b = floor * 1.001
        plans[name] = solve(choices, table.rest_ms, b, goal=f"{name} ({b:.3f} ms)", proxy="sensitivity", table=info)
    train = TrainConfig(steps=FINETUNE_STEPS, batch=8, crop=128, lr=1e-3, flatness_weight=1e-3)
    ck_dir = work / "checkpoints"
    points = []
    for s in UNIFORM_S:
        say(f"fine-tuning s={s:g}", None)
        ck = distilled_checkpoint(dense_path, _uniform_ranks(table, s), ck_dir, name=f"s{s:g}", steps=FINETUNE_STEPS,
                                  calibration=calib, train_config=train, metrics={"s": s}, labels=True)
        points.append(SweepPoint(f"s={s:g}", s, str(ck), "uniform", predicted_ms=pred[s]))
    for name, p in plans.items():
        say(f"fine-tuning {name}", None)
        ck = distilled_checkpoint(dense_path, p.ranks(), ck_dir, name=name.replace("/", "-"), steps=FINETUNE_STEPS,
                                  calibration=calib, train_config=train, metrics={"plan": p.as_dict()}, labels=True)
        points.append(SweepPoint(name, None, str(ck), "planned", predicted_ms=p.predicted_ms))
    config = MeasureConfig(runs=50, min_seconds=1.0, processes=2, threads=THREADS)
    result = evaluate_points(dense_path, points, target, precision, backend, bundles_dir=work / "bundles",
                             config=config, labels=True, progress=say)
    for p in result.points:
        if p.kind == "vanilla":
            p.predicted_ms = table.whole_dense_ms
    result.model = f"{label}"
    folder = work / "reports" / f"{label.split()[-1]}-{backend}-{precision}"
    result.write(folder)
    return {"label": label, "backend": backend, "precision": precision, "table": table.as_dict(),
            "plans": {k: v.as_dict() for k, v in plans.items()}, "points": [p.as_dict() for p in result.points],
            "notes": notes + result.notes, "report": str(folder), "floor_ms": floor,
            "aims": _aims(result.points, table, plans), "finetune": train.key()}


def _say(prefix: str):
    import sys

    def say(message: str, fraction: float | None = None) -> None:
        print(f"bench plan: {prefix}: {message}", file=sys.stderr, flush=True) if fraction in (None, 0.0, 1.0) else None

    return say


def _aims(points: list[Any], table: Any, plans: dict[str, Any]) -> dict[str, Any]:
    """The three aims from the measured points (paired ratios to vanilla), with what each was compared with."""
    by = {p.name: p for p in points}
    s05, s025 = by.get("s=0.5"), by.get("s=0.25")
    planned = [p for p in points if p.kind == "planned" and p.ratio is not None and p.holdout_dice is not None]
    aims: dict[str, Any] = {}
    if s025 and s025.ratio and s05 and s05.holdout_dice is not None:
        near = [p for p in planned if abs(p.ratio / s025.ratio - 1) <= 0.05]
        best = max(near, key=lambda p: p.holdout_dice, default=None)
        closest = min(planned, key=lambda p: abs(p.ratio / s025.ratio - 1), default=None)
        aims["dice_at_s025_latency"] = {
            "met": bool(best and best.holdout_dice >= s05.holdout_dice),
            "plan": (best or closest).name if (best or closest) else None,
            "plan_ratio": (best or closest).ratio if (best or closest) else None,
            "plan_dice": (best or closest).holdout_dice if (best or closest) else None,
            "s025_ratio": s025.ratio, "s05_dice": s05.holdout_dice, "s025_dice": s025.holdout_dice,
            "within_5pct": best is not None,
        }
    if s025 and s025.ratio and s025.holdout_dice is not None:
        good = [p for p in planned if p.holdout_dice >= s025.holdout_dice]
        fastest = min(good, key=lambda p: p.ratio, default=None)
        aims["speedup_at_s025_dice"] = {
            "met": bool(fastest and s025.ratio / fastest.ratio >= 1.25),
            "plan": fastest.name if fastest else None, "speedup": s025.ratio / fastest.ratio if fastest else None,
            "plan_dice": fastest.holdout_dice if fastest else None, "s025_dice": s025.holdout_dice,
        }
    rows = []
    for p in points:
        if p.predicted_ms is None or p.ratio is None and p.kind != "vanilla":
            continue
        measured = table.whole_dense_ms * (p.ratio if p.ratio is not None else 1.0)
        rows.append({"name": p.name, "predicted_ms": p.predicted_ms, "measured_ms": measured,
                     "error": p.predicted_ms / measured - 1})
    factorized = [r for r in rows if r["name"] != "vanilla"]
    aims["table_within_15pct"] = {"met": all(abs(r["error"]) <= 0.15 for r in factorized) and bool(factorized),
                                  "worst": max((abs(r["error"]) for r in factorized), default=None), "rows": rows}
    return aims


def _layer_explanation(r: dict[str, Any]) -> list[str]:
    """Per-layer predicted times of the plan compared at s=0.25's latency and of uniform s=0.25 (the table's numbers)."""
    from sfedge.planning import Plan

    aim = r["aims"].get("dice_at_s025_latency") or {}
    name = aim.get("plan")
    if not name or name not in r["plans"]:
        return []
    plan = Plan.from_dict(r["plans"][name])
    table = r["table"]
    out = [f"Per layer ({name} vs uniform s=0.25, the table's ms): | layer | plan rank | plan ms | s=0.25 rank | s=0.25 ms |",
           "|---|---|---|---|---|"]
    from sfedge.nn import rank_for

    for e, row in zip(table["layers"], plan.layers):
        s = e["shape"]
        r25 = rank_for(0.25, s["in_channels"], s["out_channels"])
        t25 = e["ranks"].get(str(r25), {}).get("ms")
        out.append(f"| {e['name']} | {row.rank if row.rank is not None else 'dense'} | {row.predicted_ms:.3f} | {r25} | "
                   f"{t25:.3f} |" if t25 is not None else f"| {e['name']} | {row.rank} | {row.predicted_ms:.3f} | {r25} | - |")
    return out


def run(out: Path) -> str:
    import torch

    # Training and the proxies run on one torch thread: on this shared 2-core VM a second OpenMP thread waits for a
    # core at every op (20x slower measured); the latency measurements run in their own worker processes anyway.
    torch.set_num_threads(1)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = out / "plan-work"
    work.mkdir(parents=True, exist_ok=True)
    dense = _dense_checkpoints(work)
    torch.set_num_threads(1)  # the demo's loader set its own training threads
    # e.g. "demo:tflite:fp32" (or a comma-separated list, or "demo" for a model's cells) to run only those cells
    only = [c for c in os.environ.get("SFEDGE_BENCH_PLAN_ONLY", "").split(",") if c]
    results = []
    for label, path in dense.items():
        for backend, precision in CONFIGS:
            cell = f"{label.split()[0]}:{backend}:{precision}"
            if only and not any(cell == c or cell.startswith(c + ":") for c in only):
                continue
            try:
                results.append(_one(label, path, backend, precision, work))
            except Exception as e:  # one cell failing must not lose the others' numbers
                import traceback

                traceback.print_exc()
                results.append({"label": label, "backend": backend, "precision": precision,
                                "error": f"{type(e).__name__}: {e}"})
            (out / "plan.json").write_text(json.dumps({"finetune_steps": FINETUNE_STEPS, "results": results},
                                                      indent=2, default=str))
    return _markdown(results)


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _markdown(results: list[dict[str, Any]]) -> str:
    md = ["## Planned ranks vs uniform s (host-cpu, 2 threads)", "",
          f"Every factorized model: truncated SVD of the dense model, then {FINETUNE_STEPS} distillation steps from it on "
          "the fundus-demo calibration crops (batch 8, 128x128, flattening regularizer 1e-3; no labels). Plans: the "
          "least summed measured per-layer output error (sensitivity proxy) under three budgets from the latency table: "
          "uniform s=0.5's predicted time, s=0.25's, and s=0.25's / 1.25. All points of one cell measured in one "
          "rotating run (2 worker processes each); ratio = paired median / vanilla median; held-out Dice vs the Frangi "
          "pseudo-labels; agreement = mask Dice of the artifact vs the vanilla torch model.", ""]
    for r in results:
        head = f"### {r['label']}, {r['backend']} {r['precision']}"
        if "error" in r:
            md += [head, "", f"failed: {r['error']}", ""]
            continue
        t = r["table"]
        md += [head, "", f"Latency table: {len(t['layers'])} layers, whole dense {t['whole_dense_ms']:.3f} ms, stated "
                         f"error {_f(t.get('stated_error'), '.0%')}; fastest reachable plan {r['floor_ms']:.3f} ms.", "",
               "| point | kind | GMAC | predicted ms | measured ms (table scale) | ratio vs vanilla [CI] | held-out Dice | "
               "agreement | front |", "|---|---|---|---|---|---|---|---|---|"]
        rows = {x["name"]: x for x in r["aims"]["table_within_15pct"]["rows"]}
        for p in r["points"]:
            ratio = (f"{p['ratio']:.3f} [{p['ratio_low']:.3f}, {p['ratio_high']:.3f}]" if p.get("ratio") is not None
                     else ("1 (baseline)" if p["kind"] == "vanilla" else (p.get("error") or "-")))
            md.append(f"| {p['name']} | {p['kind']} | {_f(p['macs'] and p['macs'] / 1e9, '.3f')} | "
                      f"{_f(p.get('predicted_ms'), '.3f')} | {_f(rows.get(p['name'], {}).get('measured_ms'), '.3f')} | "
                      f"{ratio} | {_f(p.get('holdout_dice'), '.4f')} | {_f(p.get('dice_agreement'), '.4f')} | - |")
        a = r["aims"]
        a1, a2, a3 = a.get("dice_at_s025_latency", {}), a.get("speedup_at_s025_dice", {}), a["table_within_15pct"]
        md += ["", "| aim | met | numbers |", "|---|---|---|",
               f"| Dice at s=0.25's latency (within 5%) >= s=0.5's Dice | {'yes' if a1.get('met') else 'no'} | "
               f"{a1.get('plan')}: ratio {_f(a1.get('plan_ratio'), '.3f')} vs s=0.25 {_f(a1.get('s025_ratio'), '.3f')}"
               f"{'' if a1.get('within_5pct') else ' (no plan within 5%)'}, Dice {_f(a1.get('plan_dice'), '.4f')} vs "
               f"s=0.5 {_f(a1.get('s05_dice'), '.4f')} |",
               f"| >= 1.25x faster at s=0.25's Dice | {'yes' if a2.get('met') else 'no'} | {a2.get('plan')}: "
               f"{_f(a2.get('speedup'), '.2f')}x, Dice {_f(a2.get('plan_dice'), '.4f')} vs s=0.25 "
               f"{_f(a2.get('s025_dice'), '.4f')} |",
               f"| table predicts whole models within 15% | {'yes' if a3.get('met') else 'no'} | worst "
               f"{_f(a3.get('worst'), '.1%')} |", ""]
        if not (a1.get("met") and a2.get("met") and a3.get("met")):
            md += _layer_explanation(r) + [""]
        md += [f"- {n}" for n in r.get("notes", [])] + [f"Report: `{r['report']}`", ""]
    return "\n".join(md)
