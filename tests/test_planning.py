"""The planner on synthetic latency tables: budgets met, optimal choices, free ranks, snapping; tables predict sums."""

from __future__ import annotations

import itertools

import pytest

from sfedge.errors import ConfigError
from sfedge.planning import LayerChoices, Option, Plan, fastest_ms, snap, solve
from sfedge.profile.latency_table import ConvShape, LatencyTable, RankTime, TableLayer


def _layer(name: str, dense_ms: float, ranks: dict[int, float], distortion: dict[int, float]) -> LayerChoices:
    options = [Option(None, dense_ms, 0.0, 1000)] + [Option(r, ms, distortion[r], 10 * r) for r, ms in ranks.items()]
    return LayerChoices(name, options)


def _synthetic() -> list[LayerChoices]:
    """Four layers; distortion falls with rank, time rises with it (a rank-4 floor in layer c, as measured)."""
    return [
        _layer("a", 1.0, {2: 0.30, 4: 0.45, 8: 0.70}, {2: 0.20, 4: 0.08, 8: 0.02}),
        _layer("b", 2.0, {4: 0.50, 8: 0.80, 16: 1.40}, {4: 0.30, 8: 0.10, 16: 0.03}),
        _layer("c", 0.8, {4: 0.50, 8: 0.55, 16: 0.60}, {4: 0.25, 8: 0.12, 16: 0.05}),
        _layer("d", 3.0, {8: 0.90, 16: 1.50, 32: 2.60}, {8: 0.40, 16: 0.15, 32: 0.04}),
    ]


def _brute(layers: list[LayerChoices], rest: float, budget: float) -> float:
    """Least summed distortion of any one-option-per-layer plan within ``budget`` (by enumeration)."""
    best = float("inf")
    for combo in itertools.product(*(layer.options for layer in layers)):
        if rest + sum(o.ms for o in combo) <= budget:
            best = min(best, sum(o.distortion for o in combo))
    return best


@pytest.mark.parametrize("budget", [3.0, 3.6, 4.5, 5.5, 6.8])
def test_plans_meet_the_budget_with_the_least_distortion(budget):
    layers, rest = _synthetic(), 0.5
    plan = solve(layers, rest, budget, tolerance=None)
    assert plan.predicted_ms <= budget + 1e-9, "a plan never exceeds its budget in the table's numbers"
    assert plan.predicted_ms == pytest.approx(rest + sum(r.predicted_ms for r in plan.layers))
    # Optimal up to the time discretisation (times are rounded up to budget/resolution steps, one per layer).
    step = (budget - rest) / 2000 * len(layers)
    assert _brute(layers, rest, budget) <= plan.distortion + 1e-12
    assert plan.distortion <= _brute(layers, rest, budget - step) + 1e-12


def test_more_budget_never_costs_accuracy():
    layers = _synthetic()
    distortions = [solve(layers, 0.5, b).distortion for b in (3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)]
    assert distortions == sorted(distortions, reverse=True)
    assert solve(layers, 0.5, 100.0).distortion == 0.0, "with room for everything, every layer stays dense"


def test_an_unreachable_budget_names_the_fastest_plan():
    layers = _synthetic()
    floor = fastest_ms([LayerChoices(x.name, snap(x.options)) for x in layers], 0.5)
    with pytest.raises(ConfigError, match=f"fastest the table allows is {floor:.3f} ms"):
        solve(layers, 0.5, floor - 0.1)


def test_a_budget_within_rounding_of_the_floor_gets_the_floor_plan():
    # 14 layers whose fastest times are not whole units of budget/resolution: rounding each up overshoots a
    # budget a hair above the floor, which the fastest plan itself still meets (the bench hit this at s=0.25/1.25).
    layers = [_layer(f"l{i}", 1.0, {4: 0.3337, 8: 0.61}, {4: 0.2, 8: 0.05}) for i in range(14)]
    floor = fastest_ms(layers, 0.5)
    plan = solve(layers, 0.5, floor * 1.0001, tolerance=None)
    assert [r.rank for r in plan.layers] == [4] * 14 and plan.predicted_ms == pytest.approx(floor)


def test_the_free_rank_in_a_flat_region_is_chosen():
    """Below the layer's latency floor r=4, 8 and 16 cost the same (r=4 1% less, within noise): r=16 keeps more."""
    flat = _layer("full-res", 1.0, {4: 0.495, 8: 0.498, 16: 0.50}, {4: 0.3, 8: 0.1, 16: 0.02})
    other = _layer("deep", 1.0, {8: 0.3, 16: 0.5}, {8: 0.2, 16: 0.05})
    budget = 0.5 + 0.3 + 0.001  # tight: only the fastest option of each layer fits
    plan = solve([flat, other], 0.0, budget)
    assert {r.name: r.rank for r in plan.layers}["full-res"] == 16
    # Without snapping the program buys the 1% (a measurement-noise difference) with a 15x larger distortion.
    unsnapped = solve([flat, other], 0.0, 0.495 + 0.3 + 0.001, tolerance=None)
    assert {r.name: r.rank for r in unsnapped.layers}["full-res"] == 4


def test_snapping_follows_the_table():
    """r=12 is slower than r=16 (off the kernel's vector width), r=32 slower than dense: neither is ever planned."""
    layer = _layer("x", 1.0, {4: 0.30, 8: 0.42, 12: 0.61, 16: 0.48, 32: 1.2}, {4: 0.4, 8: 0.2, 12: 0.1, 16: 0.05, 32: 0.01})
    kept = [o.rank for o in snap(layer.options)]
    assert kept == [4, 8, 16, None], "fastest first; 12 and 32 dropped"
    for budget in (0.5, 0.6, 0.7, 0.8, 0.95, 1.2):
        chosen = solve([layer], 0.0, budget).layers[0].rank
        assert chosen not in (12, 32)
    assert solve([layer], 0.0, 0.7).layers[0].rank == 16, "where 12 would fit, 16 fits too and keeps more"


def test_plan_round_trips_through_its_dict():
    plan = solve(_synthetic(), 0.5, 4.0, goal="budget 4 ms", proxy="sensitivity", table={"target": "t"})
    again = Plan.from_dict(plan.as_dict())
    assert again.as_dict() == plan.as_dict()
    assert again.ranks() == plan.ranks() and all(isinstance(v, int) for v in again.ranks().values())
    with pytest.raises(ConfigError, match="not an sfedge plan"):
        Plan.from_dict({"schema": "other"})


def _table() -> LatencyTable:
    shape = ConvShape(16, 16, (3, 3), (1, 1), (1, 1), (1, 1), (64, 64))
    layers = [TableLayer(name, shape, dense, {4: RankTime(dense * 0.5, 0.5, 0.48, 0.52),
                                              8: RankTime(dense * 0.7, 0.7, 0.68, 0.72)})
              for name, dense in (("a", 1.0), ("b", 2.0))]
    return LatencyTable("m", "k", "t", "onnxruntime", "fp32", 2, {"onnxruntime": "1"}, layers, 4.0, 1.0)


def test_a_table_predicts_the_sum_of_its_layers_and_the_rest():
    t = _table()
    assert t.predict({}) == pytest.approx(4.0), "the dense model is the calibration point"
    assert t.predict({"a": 4, "b": 8}) == pytest.approx(1.0 + 0.5 + 1.4)
    assert t.layer_ms({"b": 6})["b"] == pytest.approx(2.0 * 0.6), "between measured ranks: interpolated"
    assert t.layer_ms({"a": 8}) == {"a": pytest.approx(0.7), "b": pytest.approx(2.0)}
    with pytest.raises(ConfigError, match="not in the latency table"):
        t.layer_ms({"zz": 4})
    again = LatencyTable.from_dict(t.as_dict())
    assert again.predict({"a": 4}) == pytest.approx(t.predict({"a": 4}))


def test_conv_shape_macs_match_the_factorization_count():
    s = ConvShape(16, 32, (3, 3), (1, 1), (1, 1), (1, 1), (64, 64))
    assert s.output_hw == (64, 64)
    assert s.macs() == 64 * 64 * 32 * 16 * 9
    assert s.macs(8) == 64 * 64 * 8 * 16 * 3 + 64 * 64 * 32 * 8 * 3
    assert s.max_rank == 48
