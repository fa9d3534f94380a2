"""Is the calibration set good enough? Coverage of the evaluation activations and convergence of the ranges.

When int8 disagrees with float, the first question is whether calibration was bad (too few images, or images
unlike the data the model will see) or a layer needs more bits. ``calibration_coverage`` answers it from
activations alone, without labels:

- **convergence**: every quantized tensor's min/max range as calibration images are added one by one; if the
  last half of the images still widens the ranges, more images are needed;
- **coverage**: how much of the evaluation data's activations fall outside the calibrated ranges
  (saturation), and how the ranges compare (a calibration range several times wider than the evaluation
  range wastes int8 steps just as surely as a narrower one clips).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .errors import DataError
from .graph import device_of, input_count
from .quant.config import QuantConfig
from .quant.simulate import SimulatedModel, iter_inputs, quantize

__all__ = ["calibration_coverage", "CoverageReport", "CoverageRow"]

SATURATION_LIMIT = 1e-3  # share of evaluation values outside the calibrated range that counts as saturating
RANGE_LIMIT = 2.0  # calibration range this many times wider (or narrower) than the evaluation range
GROWTH_LIMIT = 0.05  # the second half of the images still widens the median range by more than this
UNLIKE_SHARE = 0.10  # share of layers flagged before the whole set is called unlike the evaluation data


@dataclass
class CoverageRow:
    """One quantized tensor: its calibrated and evaluation ranges, saturation and range ratio."""

    layer: str
    calib_range: tuple[float, float]
    eval_range: tuple[float, float]
    saturation: float
    range_ratio: float
    growth: float

    @property
    def flagged(self) -> str | None:
        if self.saturation > SATURATION_LIMIT and self.range_ratio > 1.25:
            return "saturates"
        if self.range_ratio < 1 / RANGE_LIMIT:
            return "too wide"
        if self.range_ratio > RANGE_LIMIT:
            return "too narrow"
        return None


@dataclass
class CoverageReport:
    """The verdict (``enough`` / ``more images`` / ``unlike``), a sentence saying it, the per-layer rows, and
    the convergence curve: images used -> median relative range growth still to come."""

    verdict: str
    message: str
    n_calib: int
    n_eval: int
    rows: list[CoverageRow] = field(default_factory=list)
    curve: dict[int, float] = field(default_factory=dict)
    suggested_images: int | None = None

    @property
    def flagged(self) -> list[CoverageRow]:
        return [r for r in self.rows if r.flagged]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "message": self.message, "n_calib": self.n_calib, "n_eval": self.n_eval,
                "suggested_images": self.suggested_images, "curve": self.curve,
                "rows": [asdict(r) | {"flagged": r.flagged} for r in self.rows]}

    def to_markdown(self, k: int = 10) -> str:
        lines = [f"**Calibration: {self.message}**", "",
                 f"{self.n_calib} calibration images, {self.n_eval} evaluation images; median range growth "
                 "still to come after n images: " + ", ".join(f"{n}: {100 * g:.1f} %" for n, g in
                                                                  self.curve.items()), ""]
        rows = sorted(self.rows, key=lambda r: -(r.saturation + abs(math.log(max(r.range_ratio, 1e-9)))))[:k]
        lines += ["| layer | calibrated range | evaluation range | eval values outside | eval/calib range | "
                  "flag |", "|---|---|---|---:|---:|---|"]
        for r in rows:
            lines.append(f"| `{r.layer}` | [{r.calib_range[0]:.3g}, {r.calib_range[1]:.3g}] | "
                         f"[{r.eval_range[0]:.3g}, {r.eval_range[1]:.3g}] | {100 * r.saturation:.3f} % | "
                         f"{r.range_ratio:.2f} | {r.flagged or ''} |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.semilogx(list(self.curve), [100 * v for v in self.curve.values()], "o-", base=2)
        ax.axhline(100 * GROWTH_LIMIT, ls="--", c="k", lw=0.8)
        ax.set_xlabel("calibration images")
        ax.set_ylabel("range growth still to come (%)")
        ax.set_title(self.verdict)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


class _Recorder:
    """Forward hooks on every activation quantizer: per-sample min/max, and counts outside given ranges."""

    def __init__(self, sim: SimulatedModel):
        self.sim = sim
        self.names = sim.plan.names()
        self.per_sample: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.bounds: dict[str, tuple[float, float]] | None = None
        self.outside = dict.fromkeys(self.names, 0)
        self.total = dict.fromkeys(self.names, 0)
        self.hooks = [sim.quantizer(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, inputs, _out):
            x = inputs[0].detach()
            flat = x.reshape(x.shape[0], -1).float() if x.dim() > 1 else x.reshape(1, -1).float()
            lo, hi = flat.aminmax(dim=1)
            self.per_sample[name].append(torch.stack([lo, hi], 1).cpu())
            if self.bounds is not None:
                b_lo, b_hi = self.bounds[name]
                self.outside[name] += int(((flat < b_lo) | (flat > b_hi)).sum())
                self.total[name] += flat.numel()
        return hook

    def ranges(self, name: str) -> torch.Tensor:
        """(n_samples, 2) per-sample min and max, in the order seen."""
        return torch.cat(self.per_sample[name]) if self.per_sample[name] else torch.empty(0, 2)

    def reset(self) -> None:
        self.per_sample = {n: [] for n in self.names}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _run(sim: SimulatedModel, data: Any, progress: bool, desc: str) -> None:
    batches = iter_inputs(data, input_count(sim.graph_module), device=device_of(sim))
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            sim(*batch)


def calibration_coverage(graph: fx.GraphModule, calib_data: Any, eval_data: Any, *,
                         config: QuantConfig | None = None, progress: bool = True) -> CoverageReport:
    """Check a calibration set against evaluation data (labels not needed) and give a verdict:
    ``enough``, ``more images`` (ranges still growing; about how many), or ``unlike`` (the evaluation data's
    activations fall outside, or far inside, the calibrated ranges in many layers; which ones)."""
    sim, plan = quantize(graph, calib_data, config, progress=False)
    sim.set_quantized(None, False)  # observe float activations
    rec = _Recorder(sim)
    try:
        _run(sim, calib_data, progress, "coverage (calibration)")
        calib = {n: rec.ranges(n) for n in rec.names}
        n_calib = next(iter(calib.values())).shape[0]
        if n_calib < 2:
            raise DataError("a calibration set of one image cannot show whether its ranges converged: give a few "
                            "dozen images (128 is a good start)")
        rec.reset()
        rec.bounds = {n: (float(calib[n][:, 0].min()), float(calib[n][:, 1].max())) for n in rec.names}
        _run(sim, eval_data, progress, "coverage (evaluation)")
        evals = {n: rec.ranges(n) for n in rec.names}
        n_eval = next(iter(evals.values())).shape[0]
        if n_eval == 0:
            raise DataError("no evaluation data")
    finally:
        rec.close()
        sim.set_quantized(None, True)

    def span(r: torch.Tensor, k: int) -> float:
        lo, hi = float(r[:k, 0].min()), float(r[:k, 1].max())
        return max(hi, 0.0) - min(lo, 0.0)

    checkpoints = sorted({2 ** i for i in range(int(math.log2(n_calib)) + 1)} | {n_calib})
    curve = {}
    for k in checkpoints:
        growth = [1 - span(calib[n], k) / max(span(calib[n], n_calib), 1e-12) for n in rec.names]
        curve[k] = float(torch.tensor(growth).median())
    half = max(1, n_calib // 2)
    rows = []
    for n in rec.names:
        c_lo, c_hi = rec.bounds[n]
        e_lo, e_hi = float(evals[n][:, 0].min()), float(evals[n][:, 1].max())
        c_span = max(c_hi, 0.0) - min(c_lo, 0.0)
        e_span = max(e_hi, 0.0) - min(e_lo, 0.0)
        rows.append(CoverageRow(n, (c_lo, c_hi), (e_lo, e_hi), rec.outside[n] / max(rec.total[n], 1),
                                e_span / max(c_span, 1e-12), 1 - span(calib[n], half) / max(c_span, 1e-12)))
    growth_last_half = float(torch.tensor([r.growth for r in rows]).median())
    flagged = [r for r in rows if r.flagged]
    suggested = None
    if growth_last_half > GROWTH_LIMIT:
        doublings = math.ceil(math.log2(growth_last_half / (GROWTH_LIMIT / 2)))
        suggested = n_calib * 2 ** max(1, doublings)
        verdict, message = "more images", (
            f"more images needed (about {suggested}): the second half of the {n_calib} images still widened the "
            f"median range by {100 * growth_last_half:.1f} %")
    elif len(flagged) > UNLIKE_SHARE * len(rows):
        names = ", ".join(f"{r.layer} ({r.flagged})" for r in flagged[:6])
        verdict, message = "unlike", (
            f"calibration set looks unlike the evaluation data: in {len(flagged)} of {len(rows)} layers the "
            f"evaluation activations saturate or use a small part of the calibrated range ({names}"
            f"{', ...' if len(flagged) > 6 else ''})")
    else:
        verdict, message = "enough", (
            f"enough: ranges converged (last half of {n_calib} images widened them by "
            f"{100 * growth_last_half:.1f} %) and cover the evaluation data ({len(flagged)} layer(s) flagged)")
    return CoverageReport(verdict, message, n_calib, n_eval, rows, curve, suggested)
