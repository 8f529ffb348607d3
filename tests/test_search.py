"""The one precision search and the one parity gate, on scripted inputs (milliseconds, no runtime).

The fake adapter below stands in for a backend's *quantizer*, not for the
search under test: it scripts how much error each layer adds, so every policy
of :func:`sfedge.quantize.search.search` can be checked exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sfedge.errors import ParityError
from sfedge.parity import Parity, Tolerance, gate
from sfedge.quantize.search import SearchLayer, layer_role, search

TOL = Tolerance(dice_agreement=0.98)


def _parity(dice: float, mean_abs: float, samples: int) -> Parity:
    return Parity(max_abs=10 * mean_abs, mean_abs=mean_abs, cosine=1 - mean_abs, dice_agreement=dice,
                  reference_range=10.0, samples=samples)


class ScriptedQuantizer:
    """Each layer in int8 costs ``loss[layer]`` points of mask Dice; probes see ``probe_error[layer]``."""

    def __init__(self, loss: dict[str, float], probe_error: dict[str, float] | None = None,
                 cost: dict[str, float] | None = None) -> None:
        self.loss = loss
        self.probe_error = probe_error or {n: v / 10 for n, v in loss.items()}
        self.costs = cost or dict.fromkeys(loss, 1.0)
        self.builds: list[list[str]] = []
        self.probes: list[str] = []

    def layers(self) -> Sequence[SearchLayer]:
        return [SearchLayer(n, "Conv") for n in self.loss]

    def build(self, float_layers: Sequence[str]) -> Parity:
        self.builds.append(list(float_layers))
        dice = 1.0 - sum(v for n, v in self.loss.items() if n not in float_layers)
        return _parity(dice, 1.0 - dice, samples=16)  # the held-out split

    def probe(self, layer: str) -> Parity:
        self.probes.append(layer)
        return _parity(1.0 - self.loss[layer], self.probe_error[layer], samples=8)  # the probe split

    def cost(self, layer: str) -> float:
        return self.costs[layer]


def test_all_int8_that_passes_ranks_nothing() -> None:
    q = ScriptedQuantizer({"a": 0.005, "b": 0.005, "c": 0.005})
    result = search(q, TOL)
    assert result.met and result.float_layers == [] and q.probes == [] and result.sensitivity == []
    assert q.builds == [[]] and result.parity.dice_agreement == pytest.approx(0.985)


def test_on_a_miss_the_most_sensitive_layers_go_float_first_until_the_gate_holds() -> None:
    q = ScriptedQuantizer({"a": 0.002, "b": 0.02, "c": 0.001, "d": 0.01})
    result = search(q, TOL)
    assert sorted(q.probes) == ["a", "b", "c", "d"]  # every layer probed once
    assert [s.layer for s in result.sensitivity] == ["b", "d", "a", "c"]
    assert result.float_layers == ["b"] and result.met  # 1 - 0.013 = 0.987 after b alone
    assert q.builds == [[], ["b"]]
    assert result.steps[-1] == {"float_layers": 1, "added": "b", "dice_agreement": pytest.approx(0.987),
                                "cosine": pytest.approx(0.987), "max_abs": pytest.approx(0.13),
                                "mean_abs": pytest.approx(0.013), "order": "gain per cost"}


def test_ranking_uses_the_probe_split_not_the_gate() -> None:
    """Probes say c is worst even though the gate would blame b: the search follows the probes (policy 2)."""
    q = ScriptedQuantizer({"a": 0.0, "b": 0.03, "c": 0.001}, probe_error={"a": 0.0, "b": 0.001, "c": 0.5})
    result = search(q, TOL)
    assert [s.layer for s in result.sensitivity][0] == "c"
    assert all(s.samples == 8 for s in result.sensitivity)
    assert result.float_layers[0] == "c" and result.parity.samples == 16


def test_the_float_budget_caps_the_search_and_reports_a_miss() -> None:
    q = ScriptedQuantizer(dict.fromkeys("abcd", 0.02))  # every layer needed float: more than half the model
    result = search(q, TOL, max_float_fraction=0.5)
    assert result.budget == 2 and len(result.float_layers) == 2 and not result.met
    assert len(q.builds) == 3  # all-int8, then one build per float layer, never past the budget
    assert search(ScriptedQuantizer(dict.fromkeys("abcd", 0.02)), TOL, max_float_fraction=0.0).float_layers == []


def test_float_cost_is_recorded() -> None:
    q = ScriptedQuantizer({"a": 0.03, "b": 0.001}, cost={"a": 300.0, "b": 100.0})
    result = search(q, TOL)
    assert result.float_layers == ["a"] and result.float_cost == 300.0 and result.total_cost == 400.0
    assert result.as_dict()["float_cost_fraction"] == pytest.approx(0.75)
    assert "1 of 2 layers" in result.note() and "75%" in result.note()


def test_of_two_layers_that_fix_the_gate_alike_the_cheap_one_goes_float() -> None:
    """Policy 4: a full-resolution layer (expensive) and a deep one (cheap) add the same error; either alone
    in float meets the gate, and the search keeps the cheap one float."""
    q = ScriptedQuantizer({"full_res": 0.015, "deep": 0.015, "other": 0.001},
                          cost={"full_res": 400.0, "deep": 25.0, "other": 100.0})
    result = search(q, TOL)
    assert result.met and result.float_layers == ["deep"] and result.float_cost == 25.0
    assert [s.layer for s in result.sensitivity][:2] == ["deep", "full_res"]
    # error alone (equal costs) would not prefer either; a latency table given as ``costs`` overrides MACs
    flipped = search(ScriptedQuantizer(q.loss, cost=q.costs), TOL, costs={"full_res": 1.0, "deep": 9.0})
    assert flipped.float_layers == ["full_res"] and flipped.float_cost == 1.0


def test_a_layer_that_fixes_the_gate_alone_is_not_passed_over_for_cheap_useless_ones() -> None:
    """Gain per cost still needs gain: a cheap layer adding no error ranks below an expensive one that does."""
    q = ScriptedQuantizer({"big": 0.03, "tiny": 0.0}, cost={"big": 1000.0, "tiny": 1.0})
    result = search(q, TOL)
    assert result.float_layers == ["big"] and result.met


def test_when_cheap_layers_cannot_fix_the_gate_the_search_falls_back_to_error_alone() -> None:
    """Policy 5: the gate needs the one expensive layer; gain per cost spends the budget on cheap ones first,
    misses, and the second pass (error alone) meets it with that layer, reusing every probe."""
    loss = {"full_res": 0.025, "d1": 0.002, "d2": 0.002, "d3": 0.002}
    q = ScriptedQuantizer(loss, cost={"full_res": 1000.0, "d1": 1.0, "d2": 1.0, "d3": 1.0})
    result = search(q, TOL, max_float_fraction=0.5)
    assert result.met and result.float_layers == ["full_res"] and result.order == "gain"
    assert [s.layer for s in result.sensitivity][:2] == ["d1", "d2"]  # the first pass's order
    assert q.builds == [[], ["d1"], ["d1", "d2"], ["full_res"]] and len(q.probes) == 4
    again = search(ScriptedQuantizer(loss, cost=q.costs), TOL, ranked=result.sensitivity)
    assert again.float_layers == ["full_res"]


def test_earlier_probes_are_reused() -> None:
    first = search(ScriptedQuantizer({"a": 0.03, "b": 0.001}), TOL)
    q = ScriptedQuantizer({"a": 0.03, "b": 0.001})
    result = search(q, TOL, ranked=first.sensitivity)
    assert q.probes == [] and result.float_layers == ["a"] and result.met


def test_a_candidate_must_also_meet_the_shifted_split() -> None:
    """Held-out passes all-int8, the shifted split does not: the search goes on until both hold."""
    q = ScriptedQuantizer({"a": 0.005, "b": 0.002})
    shifted_loss = {"a": 0.03, "b": 0.005}

    def shifted() -> Parity:
        float_now = q.builds[-1]
        dice = 1.0 - sum(v for n, v in shifted_loss.items() if n not in float_now)
        return _parity(dice, 1.0 - dice, samples=16)

    tol = Tolerance(dice_agreement=0.98, shifted_dice_agreement=0.97)
    result = search(q, tol, shifted=shifted)
    assert result.all_int8_parity.dice_agreement == pytest.approx(0.993)  # held-out alone would stop here
    assert result.met and result.float_layers == ["a"]
    assert result.steps[0]["shifted_dice_agreement"] == pytest.approx(0.965)
    assert result.steps[-1]["shifted_dice_agreement"] == pytest.approx(0.995)


def test_layer_role_reads_onnx_and_torch_names() -> None:
    assert layer_role("/inc/inc.0/conv_a/Conv", "Conv") == layer_role("inc.0.conv_a", "Conv") == "sfconv 1xk (to rank r)"
    assert layer_role("down1.conv_b", "Conv") == "sfconv kx1 (rank-r input)"
    assert layer_role("/up1/up/ConvTranspose", "ConvTranspose") == "up (transposed conv)"
    assert layer_role("head", "Conv") == "head (1x1)"


def test_gate_passes_through_and_deletes_what_it_was_given_on_a_miss(tmp_path) -> None:
    good = _parity(0.99, 0.01, 4)
    assert gate(good, TOL, "x") is good
    art, companion, folder = tmp_path / "m.onnx", tmp_path / "m.ranges.json", tmp_path / "device"
    for f in (art, companion):
        f.write_text("x")
    folder.mkdir()
    (folder / "inner").write_text("x")
    with pytest.raises(ParityError, match=r"the int8 thing disagrees .* mask Dice agreement 0\.9000 < 0\.98") as e:
        gate(_parity(0.9, 0.1, 4), TOL, "the int8 thing", cleanup=[art, companion, folder])
    assert "\n" not in str(e.value)
    assert not art.exists() and not companion.exists() and not folder.exists()


def test_parity_round_trips_through_a_manifest_record() -> None:
    p = _parity(0.97, 0.02, 16)
    assert Parity.from_dict(p.as_dict()) == p
    assert Parity.from_dict({}) is None
    with pytest.raises(ValueError, match="lacks"):
        Parity.from_dict({"max_abs": 1.0})
