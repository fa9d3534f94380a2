"""The analysis report (``report.md`` + ``report.html`` + plots): what int8 costs, which layers are to blame,
why, and the fix to try first for each."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..quant.plan import QuantPlan
from .flips import FlipReport
from .layers import LayerErrorReport
from .sensitivity import SensitivityReport

__all__ = ["Suspect", "suspects", "write_report"]


@dataclass
class Suspect:
    layer: str
    drop: float
    gain: float | None
    fixes: list[str] = field(default_factory=list)


def suspects(quantize_one: SensitivityReport, float_one: SensitivityReport | None, layers: LayerErrorReport | None,
             plan: QuantPlan, depthwise: set[str], k: int = 8) -> list[Suspect]:
    """The k layers that hurt most alone, each with the fixes the measurements point to, most specific first."""
    gains = {r.layer: r.delta for r in float_one.rows} if float_one else {}
    diag = {r.layer: r.diagnosis for r in layers.rows} if layers else {}
    out = []
    for row in quantize_one.top(k):
        fixes = list(diag.get(row.layer, []))
        if row.layer in depthwise:
            fixes.append("depthwise conv (few weights per output): equalization, bias correction and learned "
                         "rounding (qsurgery repair measures them), or 16 bits where the device runs them")
        gain = gains.get(row.layer)
        if gain is not None and gain > 0:
            fixes.append(f"keeping it float recovers {gain:+.4g} {float_one.metric} (skip it, or int16 where the "
                         "device allows)")
        if not fixes:
            fixes.append("int16 for this layer, or keep it float where the device allows mixed precision")
        out.append(Suspect(row.layer, row.delta, gain, fixes))
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; a cell naming a ``.png`` file shows that image."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(f"![]({c})" if c.endswith(".png") else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    """The same table in HTML (a ``.png`` cell as a 64-pixel thumbnail)."""
    def cell(c: str) -> str:
        if c.endswith(".png"):
            return f'<td><img src="{html.escape(c)}" alt="image" width="64"></td>'
        return f"<td>{html.escape(c.strip('`'))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out_dir: str | Path, *, title: str, facts: list[tuple[str, str]], plan: QuantPlan,
                 flips: FlipReport, quantize_one: SensitivityReport, float_one: SensitivityReport | None,
                 layers: LayerErrorReport | None, depthwise: set[str], notes: list[str] = (),
                 images: Any = None, max_flips: int = 24, verdict: str | None = None,
                 class_names: Sequence[str] | None = None) -> Path:
    """Write report.md, report.html and the plots into ``out_dir``; returns the markdown path. ``images``: the
    evaluation images in the order of ``flips`` (a tensor, or an indexable of image tensors): the first
    ``max_flips`` changed predictions are listed with a thumbnail each (``flips/``). ``verdict``: the one line
    printed first, under the title. ``class_names``: names for the class indices in the flip list."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quantize_one.plot(out / "sensitivity_quantize_one.png")
    if float_one is not None:
        float_one.plot(out / "sensitivity_float_one.png")
    if layers is not None:
        layers.plot(out / "sqnr_by_depth.png")
    flips.plot(out / "flips.png")
    quantize_one.to_json(out / "sensitivity_quantize_one.json")
    if float_one is not None:
        float_one.to_json(out / "sensitivity_float_one.json")
    if layers is not None:
        layers.to_json(out / "layers.json")
    plan.to_json(out / "plan.json")

    blocks: list[tuple[str, object]] = [("h1", title)]
    if verdict:
        blocks.append(("p", verdict))
    blocks.append(("table", (["", ""], [[k, v] for k, v in facts])))
    blocks += [("p", n) for n in notes]
    blocks.append(("h2", "Prediction flips"))
    blocks.append(("p", flips.summary() + "."))
    if flips.flipped:
        blocks.append(("table", _flip_rows(flips, images, out, max_flips, class_names)))
    blocks.append(("img", "flips.png"))
    blocks.append(("h2", "Suspects and the fix to try first"))
    rows = []
    for i, s in enumerate(suspects(quantize_one, float_one, layers, plan, depthwise), 1):
        rows.append([str(i), f"`{s.layer}`", f"{s.drop:.3g}", "-" if s.gain is None else f"{s.gain:+.3g}",
                     "; ".join(s.fixes)])
    blocks.append(("table", (["rank", "layer", f"{quantize_one.metric} loss alone", "gain if float",
                              "suggested fix"], rows)))
    blocks.append(("h2", "Sensitivity: only this layer int8 (rest float)"))
    blocks.append(("p", f"Metric {quantize_one.metric}; cost in forward passes per batch: "
                        f"{quantize_one.forward_cost}."))
    blocks.append(("table", _sens_rows(quantize_one, 20)))
    blocks.append(("img", "sensitivity_quantize_one.png"))
    if float_one is not None:
        blocks.append(("h2", "Sensitivity: all int8 but this layer"))
        blocks.append(("p", f"Metric {float_one.metric}; all-int8 {float_one.baseline:.4g}, float "
                            f"{float_one.reference:.4g}."))
        blocks.append(("table", _sens_rows(float_one, 20)))
        blocks.append(("img", "sensitivity_float_one.png"))
    if layers is not None:
        blocks.append(("h2", "Layer by layer: float vs int8 along the network"))
        blocks.append(("p", "SQNR of each quantized op's output (the error accumulated up to there), its own "
                            "activation rounding alone, its weight rounding alone, the share of values outside the "
                            "calibrated range, and the spread of its per-channel ranges. Layers with a diagnosis:"))
        weak = [[str(r.depth), f"`{r.layer}`", f"{r.sqnr_db:.1f}",
                 "-" if r.rounding_sqnr_db is None else f"{r.rounding_sqnr_db:.1f}",
                 "-" if r.weight_sqnr_db is None else f"{r.weight_sqnr_db:.1f}",
                 "-" if r.clip_rate is None else f"{100 * r.clip_rate:.3f} %",
                 "-" if r.channel_spread is None else f"{r.channel_spread:.1f}x", "; ".join(r.diagnosis)]
                for r in layers.weak()]
        blocks.append(("table", (["depth", "layer", "SQNR dB", "own rounding dB", "weights dB", "clipped",
                                  "channel spread", "diagnosis"], weak)))
        blocks.append(("img", "sqnr_by_depth.png"))
    blocks.append(("p", "Machine-readable: plan.json, sensitivity_*.json, layers.json."))

    md, body = [], []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            md.append(("# " if kind == "h1" else "## ") + str(value))
            body.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
        elif kind == "p":
            md.append(str(value))
            body.append(f"<p>{html.escape(str(value))}</p>")
        elif kind == "img":
            md.append(f"![{value}]({value})")
            body.append(f'<img src="{value}" alt="{value}" style="max-width:100%">')
        else:
            header, rows = value
            md.append(_md_table(header, rows))
            body.append(_html_table(header, rows))
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}"
             "th{background:#f3f3f3}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")
    return out / "report.md"


def _thumbnail(image: torch.Tensor, path: Path, side: int = 64) -> None:
    """A small PNG of one (C, H, W) model input, its values stretched to the full range (inputs are
    normalised, so the colours are approximate)."""
    from PIL import Image

    x = image.detach().float().cpu()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    array = (x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).resize((side, side * array.shape[0] // array.shape[1])).save(path)


def _flip_rows(flips: FlipReport, images: Any, out: Path, k: int, names: Sequence[str] | None = None
               ) -> tuple[list[str], list[list[str]]]:
    """The first ``k`` changed predictions as table rows (thumbnails written under ``out/flips/``), each class
    index followed by its name where ``names`` has one."""

    def cls(c: int) -> str:
        return f"{c} {names[c]}" if names is not None and 0 <= c < len(names) else str(c)

    labeled = any(label is not None for *_, label in flips.flipped)
    header = ["image", "float class", "int8 class"] + (["label", "effect"] if labeled else [])
    header += ["thumbnail"] if images is not None else []
    if images is not None:
        (out / "flips").mkdir(exist_ok=True)
    rows = []
    for i, f, q, label in flips.flipped[:k]:
        row = [str(i), cls(f), cls(q)]
        if labeled:
            effect = "right -> wrong" if label == f else "wrong -> right" if label == q else "wrong -> wrong"
            row += [cls(label), effect]
        if images is not None:
            name = f"flips/{i:05d}.png"
            _thumbnail(images[i], out / name)
            row.append(name)
        rows.append(row)
    if len(flips.flipped) > k:
        rows.append([f"... {len(flips.flipped) - k} more"] + [""] * (len(header) - 1))
    return header, rows


def _sens_rows(report: SensitivityReport, k: int) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "layer", "op", "MMACs", report.metric, "delta"]
    rows = [[str(i), f"`{r.layer}`", r.kind, f"{r.macs / 1e6:.2f}", f"{r.value:.4g}", f"{r.delta:+.4g}"]
            for i, r in enumerate(report.rows[:k], 1)]
    return header, rows
