"""What a quantization plan costs on a target: MACs by format, weight and activation bytes, format changes.

One cost model for every pass, the precision assignment and the recipes, so that "cheaper" means the same
thing everywhere. Figures are per sample, from the shapes recorded at capture.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch.fx as fx

from .graph import find_units, fold_batchnorm, module_macs
from .quant.plan import QuantPlan
from .quant.simulate import _consumer_units
from .targets import Target, get_target, layer_format

__all__ = ["PlanCost", "plan_cost"]

_BYTES = {"int8": (1, 1), "w4a8": (0.5, 1), "a16w8": (1, 2), "int16": (2, 2), "fp16": (2, 2), "float": (4, 4)}


@dataclass
class PlanCost:
    """A plan's cost on a target. ``total`` = sum of MACs x ``mac_cost[format]`` + bytes x ``byte_cost`` +
    format changes x ``conversion_cost`` x elements converted (relative units: one int8 MAC = 1)."""

    target: str
    macs: int
    macs_by_format: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0
    activation_bytes: int = 0
    conversions: int = 0
    non_int8_layers: list[str] = field(default_factory=list)
    total: float = 0.0

    @property
    def non_int8_macs(self) -> int:
        return sum(v for k, v in self.macs_by_format.items() if k != "int8")

    @property
    def non_int8_mac_share(self) -> float:
        """Share of the model's MACs not run in int8 (the issue's x axis)."""
        return self.non_int8_macs / max(self.macs, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["non_int8_macs"] = self.non_int8_macs
        d["non_int8_mac_share"] = self.non_int8_mac_share
        return d

    def summary(self) -> str:
        fm = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in sorted(self.macs_by_format.items()))
        return (f"{self.target}: MACs {fm} ({100 * self.non_int8_mac_share:.2f} % not int8), weights "
                f"{self.weight_bytes / 1e6:.2f} MB, activations {self.activation_bytes / 1e6:.2f} MB, "
                f"{self.conversions} format change(s), {len(self.non_int8_layers)} non-int8 layer(s), "
                f"relative cost {self.total / 1e6:.2f} M")


def plan_cost(graph: fx.GraphModule, plan: QuantPlan, target: str | Target | dict = "generic") -> PlanCost:
    """Cost of running ``graph`` quantized as ``plan`` on ``target``."""
    target = get_target(target)
    gm = graph
    if any(layer.folded_bn for layer in plan):  # the plan's units are those of the BN-folded graph
        gm = copy.deepcopy(graph)
        fold_batchnorm(gm)
    units = {u.name: u for u in find_units(gm)}
    nodes = {n.name: n for n in gm.graph.nodes}
    macs = module_macs(gm)
    fmt_of = {layer.name: layer_format(layer) for layer in plan}
    cost = PlanCost(target.name, macs=sum(macs.values()))
    owner = {u.anchor: u for u in units.values()}
    for layer in plan:
        unit = units.get(layer.name)
        if unit is None:
            continue
        fmt = fmt_of[layer.name]
        w_bytes, a_bytes = _BYTES.get(fmt, (4, 4))
        m = macs.get(unit.module, 0) if unit.module else 0
        cost.macs_by_format[fmt] = cost.macs_by_format.get(fmt, 0) + m
        if fmt != "int8":
            cost.non_int8_layers.append(layer.name)
        if unit.module:
            n_w = sum(p.numel() for p in gm.get_submodule(unit.module).parameters())
            cost.weight_bytes += n_w * w_bytes
        meta = nodes[unit.output].meta.get("tensor_meta")
        n_out = _per_sample(meta)
        cost.activation_bytes += n_out * a_bytes
        cost.total += m * target.mac_cost.get(fmt, max(target.mac_cost.values()))
        cost.total += (n_out * a_bytes) * target.byte_cost.get(fmt, 1.0)
        for consumer in _consumer_units(gm, nodes[unit.output], owner):
            if fmt_of.get(consumer.name, fmt) != fmt:
                cost.conversions += 1
                cost.total += target.conversion_cost * n_out
    return cost


def _per_sample(meta) -> int:
    if meta is None or not hasattr(meta, "shape"):
        return 0
    shape = tuple(meta.shape)
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n
