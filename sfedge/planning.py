"""Choose, per layer, dense or SFConv and its rank from measured layer latencies (numpy only).

The planner's input is one list of options per layer: dense, or SFConv at
each rank the latency table measured, each with its time on the target
(milliseconds, from :class:`sfedge.profile.latency_table.LatencyTable`), its
MACs and an accuracy *proxy*: the distortion the choice adds to the model's
output (0 for dense; for a rank, the measured output error when only that
layer is truncated, or the spectral energy it drops).  Distortions of
different layers are taken to add up, the usual first-order assumption of
per-layer compression (and of mixed-precision search).

**The algorithm: an exact multiple-choice knapsack by dynamic programming.**
Minimise the summed distortion subject to ``rest + sum(ms) <= budget``, one
option per layer.  Times are discretised to ``budget / resolution`` and
rounded *up*, so a plan the program returns never exceeds the budget in the
table's own numbers.  Why not the alternatives:

* a Lagrangian relaxation (pick ``argmin d + lambda * ms`` per layer, search
  lambda) only reaches plans on the convex hull of the trade-off; with six to
  eight ranks per layer and measured times that are far from convex (the
  latency floor, vector-width steps) it leaves budget unused between hull
  points;
* NetAdapt-style greedy steps (Yang et al., ECCV 2018: shrink the layer that
  loses least per millisecond saved, re-measure, repeat) need a measurement
  and a short fine-tune per step: right when only whole models can be timed,
  wasteful when every layer's options are already in a table.

The program is tiny (layers x options x resolution: 30 x 8 x 2000 cells) and
returns the optimum of the proxy exactly, so any gap between plans is the
proxy's or the table's, never the search's.

**Rank snapping** (:func:`snap`) runs first: an option is kept only if it is
measurably faster (by ``tolerance``) than every option that keeps more
accuracy.  Below a layer's latency floor all ranks cost the same, so the
highest of them survives ("rank is free"); a rank that misses the kernel's
vector width (12 where 16 is as fast) is dropped; an SFConv rank slower than
the dense conv is dropped in favour of dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sfedge.errors import ConfigError

__all__ = [
    "Option", "LayerChoices", "PlannedLayer", "Plan", "snap", "solve", "fastest_ms", "SNAP_TOLERANCE",
    "DEFAULT_RESOLUTION", "PLAN_SCHEMA",
]

SNAP_TOLERANCE = 0.03  # a lower rank must be at least 3% faster than every more accurate option to be worth it
DEFAULT_RESOLUTION = 2000  # time steps of the budget in the knapsack program
PLAN_SCHEMA = "sfedge-plan/1"


@dataclass(frozen=True)
class Option:
    """One way to run a layer: dense (``rank`` None) or SFConv at ``rank``; its time, MACs and distortion."""

    rank: int | None
    ms: float
    distortion: float
    macs: int = 0

    @property
    def choice(self) -> str:
        return "dense" if self.rank is None else "sfconv"


@dataclass
class LayerChoices:
    """A layer and the options the table measured for it."""

    name: str
    options: list[Option]

    def dense(self) -> Option | None:
        return next((o for o in self.options if o.rank is None), None)


@dataclass
class PlannedLayer:
    """One row of a plan: what the layer runs as and what the table predicts it costs."""

    name: str
    choice: str  # "dense" or "sfconv"
    rank: int | None
    predicted_ms: float
    macs: int
    distortion: float
    dense_ms: float | None = None
    dense_macs: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """Per-layer choices, what the table predicts for the whole model, and what the plan was asked to meet."""

    layers: list[PlannedLayer]
    rest_ms: float  # the parts of the model no plan changes (pooling, upsampling, concatenation, the head)
    budget_ms: float | None = None
    goal: str = ""  # what was asked: "budget-ms 6.0", "speedup 2", "min-dice 0.9"
    proxy: str = ""  # "sensitivity" or "energy"
    table: dict[str, Any] = field(default_factory=dict)  # which table: target, backend, precision, runtime, key

    @property
    def predicted_ms(self) -> float:
        return self.rest_ms + sum(r.predicted_ms for r in self.layers)

    @property
    def dense_predicted_ms(self) -> float | None:
        if any(r.dense_ms is None for r in self.layers):
            return None
        return self.rest_ms + sum(float(r.dense_ms) for r in self.layers)  # type: ignore[arg-type]

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def distortion(self) -> float:
        return sum(r.distortion for r in self.layers)

    def ranks(self) -> dict[str, int]:
        """{layer: rank} of the SFConv layers: what ``sfedge.nn.factorize(model, ranks=...)`` takes."""
        return {r.name: int(r.rank) for r in self.layers if r.rank is not None}

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA, "goal": self.goal, "proxy": self.proxy, "budget_ms": self.budget_ms,
            "rest_ms": self.rest_ms, "predicted_ms": self.predicted_ms, "dense_predicted_ms": self.dense_predicted_ms,
            "layer_macs": self.macs, "distortion": self.distortion, "table": dict(self.table),
            "layers": [r.as_dict() for r in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """The plan a checkpoint's metrics or a manifest recorded (ConfigError when it is not one)."""
        if d.get("schema") != PLAN_SCHEMA:
            raise ConfigError(f"not an sfedge plan (schema {d.get('schema')!r})", "make one with `sfedge plan`")
        names = PlannedLayer.__dataclass_fields__
        layers = [PlannedLayer(**{k: v for k, v in r.items() if k in names}) for r in d["layers"]]
        return cls(layers, float(d["rest_ms"]), d.get("budget_ms"), d.get("goal", ""), d.get("proxy", ""),
                   dict(d.get("table") or {}))

    def rows(self) -> list[list[Any]]:
        """The readable table: layer, choice, rank, predicted ms (and dense ms), MACs (and dense MACs)."""
        out = []
        for r in self.layers:
            out.append([r.name, r.choice, "-" if r.rank is None else r.rank, f"{r.predicted_ms:.3f}",
                        "-" if r.dense_ms is None else f"{r.dense_ms:.3f}", f"{r.macs / 1e6:.1f}",
                        "-" if r.dense_macs is None else f"{r.dense_macs / 1e6:.1f}", f"{r.distortion:.3g}"])
        return out

    HEADER = ("layer", "choice", "rank", "predicted ms", "dense ms", "MMAC", "dense MMAC", "distortion")

    def markdown(self) -> list[str]:
        """The plan as Markdown lines (the table plus the totals)."""
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows()]
        dense = self.dense_predicted_ms
        lines += ["", f"Predicted: {self.predicted_ms:.3f} ms = {self.rest_ms:.3f} ms for the unchanged parts + "
                      f"{self.predicted_ms - self.rest_ms:.3f} ms for the planned layers"
                      + (f" (dense: {dense:.3f} ms, predicted speed-up {dense / self.predicted_ms:.2f}x)"
                         if dense else "")
                      + (f"; budget {self.budget_ms:.3f} ms" if self.budget_ms is not None else "") + "."]
        return lines


def snap(options: Sequence[Option], tolerance: float = SNAP_TOLERANCE) -> list[Option]:
    """The options worth choosing: each measurably faster than every option that distorts less.

    Walking from the least distortion (dense) to the most, an option is kept
    only when its time is below ``(1 - tolerance)`` times the fastest kept so
    far.  So in a flat region (all ranks at the layer's latency floor) only
    the highest rank stays, a rank slower than a higher one is dropped, and
    ranks slower than dense disappear.  Returned fastest first.
    """
    if not 0 <= tolerance < 1:
        raise ConfigError(f"snap tolerance {tolerance} is not in [0, 1)", "e.g. 0.03")
    order = sorted(options, key=lambda o: (o.distortion, -(o.rank or math.inf), o.ms))
    kept: list[Option] = []
    best = math.inf
    for o in order:
        if o.ms < best * (1 - tolerance) or not kept:
            kept.append(o)
            best = min(best, o.ms)
    return sorted(kept, key=lambda o: o.ms)


def fastest_ms(layers: Sequence[LayerChoices], rest_ms: float) -> float:
    """The fastest any plan can be in the table's numbers (every layer at its fastest option)."""
    return rest_ms + sum(min(o.ms for o in layer.options) for layer in layers)


def solve(
    layers: Sequence[LayerChoices],
    rest_ms: float,
    budget_ms: float,
    *,
    resolution: int = DEFAULT_RESOLUTION,
    tolerance: float | None = SNAP_TOLERANCE,
    goal: str = "",
    proxy: str = "",
    table: Mapping[str, Any] | None = None,
) -> Plan:
    """The plan of least summed distortion whose predicted time is at most ``budget_ms`` (see the module doc).

    ``tolerance``: rank snapping first (None: plan over every option as
    given).  Raises ConfigError naming the fastest reachable time when no
    plan fits the budget.
    """
    if not layers:
        raise ConfigError("the model has no layer to plan (no factorizable conv)", "check the model and the table")
    choices = [LayerChoices(layer.name, snap(layer.options, tolerance) if tolerance is not None else
                            sorted(layer.options, key=lambda o: o.ms)) for layer in layers]
    floor = fastest_ms(choices, rest_ms)
    available = budget_ms - rest_ms
    if floor > budget_ms or available <= 0:
        raise ConfigError(f"no plan meets {budget_ms:.3f} ms: the fastest the table allows is {floor:.3f} ms "
                          f"({rest_ms:.3f} ms of it in layers no plan changes)",
                          f"give a budget of at least {floor:.3f} ms (or a lower --speedup)")
    unit = available / resolution
    n = resolution + 1
    best = np.full(n, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(choices), n), dtype=np.int64)
    for i, layer in enumerate(choices):
        new = np.full(n, np.inf)
        arg = np.zeros(n, dtype=np.int64)
        for j, o in enumerate(layer.options):
            w = int(math.ceil(o.ms / unit - 1e-9))
            if w >= n:
                continue
            cand = np.full(n, np.inf)
            cand[w:] = best[: n - w] + o.distortion
            better = cand < new
            new[better], arg[better] = cand[better], j
        best, picks[i] = new, arg
    end = int(np.argmin(best))  # the least distortion over every budget use up to the budget
    if np.isfinite(best[end]):
        # Among budget uses with the same least distortion, prefer the fastest (argmin: the first = least used).
        picked, c = [0] * len(choices), end
        for i in reversed(range(len(choices))):
            picked[i] = int(picks[i, c])
            c -= int(math.ceil(choices[i].options[picked[i]].ms / unit - 1e-9))  # the total before this layer
    else:
        # The budget is within rounding of the floor (every layer's time rounded up to a whole unit no longer
        # fits): the floor plan itself meets it, and within that sliver no other plan is told apart from it.
        picked = [min(range(len(layer.options)), key=lambda j, lay=layer: lay.options[j].ms) for layer in choices]
    rows: list[PlannedLayer] = []
    for i in range(len(choices)):
        o = choices[i].options[picked[i]]
        dense = layers[i].dense()
        rows.append(PlannedLayer(layers[i].name, o.choice, o.rank, o.ms, o.macs, o.distortion,
                                 dense.ms if dense else None, dense.macs if dense else None))
    return Plan(rows, rest_ms, budget_ms, goal, proxy, dict(table or {}))
