"""QuantPlan: for every quantized op, its weight and activation format, scales and ranges (readable, JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import TensorFormat

__all__ = ["LayerQuant", "QuantPlan"]


@dataclass
class LayerQuant:
    """The quantization of one unit: weight format/scales (weighted ops) and output activation format/range.

    ``observed`` is the float range seen in calibration, ``clip`` the range the observer chose; ``scale`` and
    ``zero_point`` encode ``clip`` in ``activation``'s format.
    """

    name: str
    kind: str
    nodes: list[str]
    module: str | None = None
    weight: TensorFormat | None = None
    weight_scale: torch.Tensor | None = None
    activation: TensorFormat | None = None
    observed: tuple[float, float] | None = None
    clip: tuple[float, float] | None = None
    scale: float | None = None
    zero_point: int | None = None
    folded_bn: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_int8(self) -> bool:
        """True when everything this unit quantizes is 8-bit integer (the cheap path on every device)."""
        fmts = [f for f in (self.weight, self.activation) if f is not None]
        return bool(fmts) and all(f.is_int and f.bits == 8 for f in fmts)

    @property
    def is_float(self) -> bool:
        fmts = [f for f in (self.weight, self.activation) if f is not None]
        return all(f.dtype == "float" for f in fmts)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "nodes": self.nodes, "module": self.module,
            "weight": self.weight.to_dict() if self.weight else None,
            "weight_scale": self.weight_scale.flatten().tolist() if self.weight_scale is not None else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "observed": list(self.observed) if self.observed else None,
            "clip": list(self.clip) if self.clip else None,
            "scale": self.scale, "zero_point": self.zero_point, "folded_bn": self.folded_bn, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerQuant:
        return cls(
            name=d["name"], kind=d["kind"], nodes=list(d["nodes"]), module=d.get("module"),
            weight=TensorFormat(**d["weight"]) if d.get("weight") else None,
            weight_scale=torch.tensor(d["weight_scale"]) if d.get("weight_scale") is not None else None,
            activation=TensorFormat(**d["activation"]) if d.get("activation") else None,
            observed=tuple(d["observed"]) if d.get("observed") else None,
            clip=tuple(d["clip"]) if d.get("clip") else None,
            scale=d.get("scale"), zero_point=d.get("zero_point"), folded_bn=d.get("folded_bn"),
            notes=list(d.get("notes", [])),
        )


@dataclass
class QuantPlan:
    """Every quantized unit of a simulated model, in execution order; indexable by unit name."""

    layers: list[LayerQuant]
    config: str = ""

    def __post_init__(self) -> None:
        self._index = {layer.name: layer for layer in self.layers}

    def __getitem__(self, name: str) -> LayerQuant:
        try:
            return self._index[name]
        except KeyError:
            from difflib import get_close_matches

            near = get_close_matches(name, list(self._index), n=5)
            hint = f"; close names: {near}" if near else ""
            raise ConfigError(f"no quantized layer named {name!r}{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[LayerQuant]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def non_int8(self) -> list[str]:
        """Units that are not plain int8 (float, fp16 or wider integers): what costs extra on a device."""
        return [layer.name for layer in self.layers if not layer.is_int8]

    def to_dict(self) -> dict:
        return {"config": self.config, "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> QuantPlan:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        data = json.loads(p.read_text() if p is not None else str(text_or_path))
        return cls([LayerQuant.from_dict(d) for d in data["layers"]], data.get("config", ""))

    def summary(self, max_rows: int | None = None) -> str:
        """A fixed-width table: name, kind, weight format, activation format, clipping range."""
        rows = [("layer", "kind", "weight", "activation", "range")]
        for layer in self.layers[:max_rows]:
            rows.append((
                layer.name, layer.kind,
                layer.weight.describe() if layer.weight else "-",
                layer.activation.describe() if layer.activation else "-",
                f"[{layer.clip[0]:.4g}, {layer.clip[1]:.4g}]" if layer.clip else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more")
        return "\n".join(lines)
