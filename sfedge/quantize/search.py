"""One mixed-precision search for every backend: the fewest layers kept in float that meet the int8 gate.

A backend describes its quantized model through a small adapter
(:class:`SearchAdapter`: its layers, how to build a candidate with some
layers float, how to probe one layer alone, what a layer costs) and
:func:`search` runs the same loop for all of them.  Numpy only: the loop is
tested in milliseconds with a scripted adapter.

The policies, decided once here:

1. **Rank only on a miss.**  If every layer in int8 already meets the
   tolerance, no layer is probed (the probes cost one quantized model and
   one pass over the probe samples per layer: a minute on the demo models).
2. **Rank on the probe split, gate on the held-out split.**  Layers are
   ranked by their error on a few *calibration* samples (the adapter's
   ``probe``); only the final gate looks at the held-out samples.  Choosing
   the float layers on the samples that then judge the result would make the
   gate optimistic (a selection bias the held-out split exists to avoid).
3. **A float budget.**  At most ``max_float_fraction`` of the quantizable
   layers (default half) may stay float.  A model that needs more is not an
   int8 model; the result says the tolerance was missed and the caller's gate
   fails with the numbers.

4. **Rank by parity gained per unit cost.**  A layer's *gain* is the error
   it adds alone in int8 (its probe's mean |error|: what keeping it float
   buys back); its *cost* is what running it in float costs: measured
   milliseconds where a latency table exists (``costs``, e.g. from the
   profiler's per-layer tables), else the adapter's ``cost`` (MACs).  Layers
   go float in decreasing gain / cost, the greedy order of a knapsack: of two
   layers that fix the gate alike, the cheap one goes float (issue 13; until
   then the order was error alone, which kept the full-resolution layers,
   the costliest, in float).  Layers whose cost is unknown (0) are priced at
   the mean known cost.  The cost of what stayed float is summed, so a
   manifest says what the float layers cost.
5. **Error alone as the fallback.**  Greedy gain per cost can spend the
   whole budget on cheap layers when the gate needs one expensive layer
   (the full-resolution convs of the trained demo U-Nets in TFLite: 0.9798
   after 9 cheap layers).  When that pass misses, the search runs again in
   decreasing gain alone (the order before issue 13) and keeps that result;
   ``order`` says which pass chose the float layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from sfedge.parity import Parity, Tolerance
from sfedge.progress import Progress, tell

__all__ = [
    "SearchLayer", "SearchAdapter", "LayerSensitivity", "SearchResult", "search", "layer_role",
    "DEFAULT_MAX_FLOAT_FRACTION",
]

DEFAULT_MAX_FLOAT_FRACTION = 0.5


@dataclass(frozen=True)
class SearchLayer:
    """One quantizable layer, as the backend names it."""

    name: str
    op_type: str  # ONNX vocabulary for every backend: Conv, ConvTranspose, Gemm, MatMul
    role: str = ""  # what it is in the model (see layer_role)


class SearchAdapter(Protocol):
    """What :func:`search` needs from a backend's quantizer."""

    def layers(self) -> Sequence[SearchLayer]:
        """The quantizable layers, in graph order."""
        ...

    def build(self, float_layers: Sequence[str]) -> Parity:
        """Write the candidate with ``float_layers`` kept float (the rest int8); its held-out parity."""
        ...

    def probe(self, layer: str) -> Parity:
        """Parity on the probe samples of a model with only ``layer`` in int8 (the rest float)."""
        ...

    def cost(self, layer: str) -> float:
        """What running ``layer`` costs (MACs, or measured ms): the price of keeping it float."""
        ...


@dataclass
class LayerSensitivity:
    """Output error of the model when only ``layer`` runs in int8 (the rest float)."""

    layer: str
    op_type: str
    role: str
    max_abs: float
    mean_abs: float
    cosine: float
    dice_agreement: float | None  # None where the probe samples' masks cannot be judged
    samples: int
    cost: float = 0.0
    priced: float = 0.0  # the cost the ranking divides by (unknown costs priced at the mean known cost)

    @property
    def gain_per_cost(self) -> float:
        """The ranking key (policy 4): error bought back per unit of float cost."""
        return self.score / self.priced if self.priced > 0 else self.score

    @property
    def score(self) -> float:
        """The layer's gain (higher = more sensitive): mean |error| of the output logits with it alone in int8.

        Mean error rather than mask Dice: with one layer quantized most masks
        barely change, and the continuous error still orders layers by the
        noise they add, which is what accumulates when all are quantized.
        """
        return self.mean_abs

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["score"] = self.score
        d["gain_per_cost"] = self.gain_per_cost
        return d


@dataclass
class SearchResult:
    """What the search did: each step's parity, the ranking, the layers left float and their cost."""

    tolerance: dict[str, float]
    met: bool
    float_layers: list[str]
    layers: int
    budget: int
    all_int8_parity: Parity
    parity: Parity
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    float_cost: float = 0.0
    total_cost: float = 0.0
    seconds: float = 0.0
    order: str = "gain per cost"  # the order the float layers were chosen in (policy 5)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tolerance": dict(self.tolerance), "met": self.met, "float_layers": list(self.float_layers),
            "layers": self.layers, "budget": self.budget, "all_int8_parity": self.all_int8_parity.as_dict(),
            "parity": self.parity.as_dict(), "steps": list(self.steps),
            "sensitivity": [s.as_dict() for s in self.sensitivity],
            "float_cost": self.float_cost, "total_cost": self.total_cost,
            "float_cost_fraction": self.float_cost / self.total_cost if self.total_cost else 0.0,
            "seconds": self.seconds, "order": self.order,
        }

    def note(self) -> str | None:
        """One line for the artifact's notes when layers stayed float, else None."""
        if not self.float_layers:
            return None
        share = f", {self.float_cost / self.total_cost:.0%} of the model's cost" if self.total_cost else ""
        return (f"{len(self.float_layers)} of {self.layers} layers kept in float to meet the int8 tolerance"
                f"{share}: {', '.join(self.float_layers)}")


def search(
    adapter: SearchAdapter,
    tolerance: Tolerance,
    *,
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION,
    costs: Mapping[str, float] | None = None,
    shifted: Callable[[], Parity] | None = None,
    ranked: Sequence[LayerSensitivity] = (),
    progress: Progress | None = None,
) -> SearchResult:
    """Quantize everything; on a miss, move layers to float by gain per cost until ``tolerance`` holds.

    ``costs`` ({layer name: cost}, e.g. measured ms from a latency table)
    overrides the adapter's ``cost`` for the layers it names.  ``shifted``
    scores the candidate just built on the shifted held-out split (augmented
    inputs): a candidate meets the gate only when that parity also meets
    ``tolerance.for_shifted()``.  The last
    candidate the adapter built is the result (met or not): the caller gates
    it and deletes it on a miss.  ``ranked``: probes already made (an earlier
    search of the same layers) are reused instead of probed again.  See the
    module docstring for the policies.
    """
    start = time.perf_counter()
    tell(progress, "quantizing every layer to int8", 0.05)
    shifted_tol = tolerance.for_shifted()

    def misses(p: Parity) -> list[str]:
        out = tolerance.failures(p)
        if not out and shifted is not None:
            steps_shifted[len(steps)] = s = shifted()
            out = [f"shifted split: {f}" for f in shifted_tol.failures(s)]
        return out

    steps_shifted: dict[int, Parity] = {}
    parity = all_int8 = adapter.build([])
    steps = [_step(0, None, parity)]
    missed = misses(parity)
    layers = list(adapter.layers())
    costs = {layer.name: float(costs[layer.name]) if costs and layer.name in costs else float(adapter.cost(layer.name))
             for layer in layers}
    budget = int(max_float_fraction * len(layers))
    ranking: list[LayerSensitivity] = []
    chosen: list[str] = []
    order = "gain per cost"
    if missed and budget:
        ranking = _rank(adapter, layers, costs, progress, {r.layer: r for r in ranked})
        orders = [("gain per cost", ranking)]
        by_gain = sorted(ranking, key=lambda s: s.score, reverse=True)
        if [s.layer for s in by_gain[:budget]] != [s.layer for s in ranking[:budget]]:
            orders.append(("gain", by_gain))  # policy 5: only when the cheap layers could not fix the gate
        for order, ranked in orders:
            chosen = []
            for sens in ranked[:budget]:
                chosen.append(sens.layer)
                tell(progress, f"keeping {len(chosen)} layer(s) in float ({sens.layer}, by {order})",
                     0.7 + 0.3 * len(chosen) / max(1, budget))
                parity = adapter.build(chosen)
                steps.append({**_step(len(chosen), sens.layer, parity), "order": order})
                missed = misses(parity)
                if not missed:
                    break
            if not missed:
                break
    met = not missed
    for i, p in steps_shifted.items():
        steps[i - 1]["shifted_dice_agreement"] = p.dice_agreement
    tell(progress, f"mixed precision: {len(chosen)} layer(s) in float, tolerance {'met' if met else 'missed'}", 1.0)
    return SearchResult(
        tolerance=tolerance.as_dict(), met=met, float_layers=chosen, layers=len(layers), budget=budget,
        all_int8_parity=all_int8, parity=parity, steps=steps, sensitivity=ranking,
        float_cost=sum(costs[n] for n in chosen), total_cost=sum(costs.values()),
        seconds=round(time.perf_counter() - start, 2), order=order,
    )


def _rank(adapter: SearchAdapter, layers: Sequence[SearchLayer], costs: dict[str, float],
          progress: Progress | None, known_probes: Mapping[str, LayerSensitivity] | None = None,
          ) -> list[LayerSensitivity]:
    """Each layer alone in int8 on the probe samples, in decreasing gain per cost (policy 4)."""
    known = [c for c in costs.values() if c > 0]
    fill = sum(known) / len(known) if known else 1.0
    out = []
    for i, layer in enumerate(layers):
        tell(progress, f"sensitivity {i + 1}/{len(layers)}: {layer.name}", 0.1 + 0.6 * i / max(1, len(layers)))
        p = (known_probes or {}).get(layer.name) or adapter.probe(layer.name)
        out.append(LayerSensitivity(layer.name, layer.op_type, layer.role or layer_role(layer.name, layer.op_type),
                                    p.max_abs, p.mean_abs, p.cosine, p.dice_agreement, p.samples, costs[layer.name],
                                    costs[layer.name] if costs[layer.name] > 0 else fill))
    out.sort(key=lambda s: s.gain_per_cost, reverse=True)
    return out


def _step(n: int, added: str | None, parity: Parity) -> dict[str, Any]:
    return {"float_layers": n, "added": added, "dice_agreement": parity.dice_agreement, "cosine": parity.cosine,
            "max_abs": parity.max_abs, "mean_abs": parity.mean_abs}


def layer_role(name: str, op_type: str) -> str:
    """A readable role from a layer's module path (``/inc/inc.0/conv_a/Conv`` or ``inc.0.conv_a``) and op type."""
    path = "/" + name.replace(".", "/").strip("/") + "/"
    if op_type == "ConvTranspose":
        return "up (transposed conv)"
    if "/conv_a/" in path:
        return "sfconv 1xk (to rank r)"
    if "/conv_b/" in path:
        return "sfconv kx1 (rank-r input)"
    if path.startswith("/head/"):
        return "head (1x1)"
    if op_type in ("MatMul", "Gemm"):
        return "linear"
    return "dense conv"
