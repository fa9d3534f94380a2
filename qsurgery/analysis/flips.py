"""Prediction flips between float and quantized outputs: how many top-1 predictions changed, which way
(right->wrong, wrong->right), and the float-vs-int8 confusion matrix. An unchanged accuracy can hide flips.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError

__all__ = ["prediction_flips", "FlipReport"]


@dataclass
class FlipReport:
    total: int
    changed: int
    right_to_wrong: int | None = None
    wrong_to_right: int | None = None
    float_accuracy: float | None = None
    quant_accuracy: float | None = None
    pairs: Counter = field(default_factory=Counter)  # (float class, int8 class) -> count, changed only
    unchanged: Counter = field(default_factory=Counter)  # float class -> count, unchanged only
    #: each changed prediction: (image position, float class, int8 class, label or None), in image order
    flipped: list[tuple[int, int, int, int | None]] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return 1.0 - self.changed / max(self.total, 1)

    def confusion(self, classes: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """Float-vs-int8 counts over ``classes`` (default: every class involved in a flip); diagonal = unchanged."""
        classes = classes or sorted({c for pair in self.pairs for c in pair})
        index = {c: i for i, c in enumerate(classes)}
        matrix = torch.zeros(len(classes), len(classes), dtype=torch.long)
        for (f, q), n in self.pairs.items():
            if f in index and q in index:
                matrix[index[f], index[q]] += n
        for c, n in self.unchanged.items():
            if c in index:
                matrix[index[c], index[c]] += n
        return classes, matrix

    def summary(self) -> str:
        text = f"{self.changed} of {self.total} top-1 predictions changed ({100 * (1 - self.agreement):.2f} %)"
        if self.right_to_wrong is not None:
            other = self.changed - self.right_to_wrong - self.wrong_to_right
            text += (f": {self.right_to_wrong} right->wrong, {self.wrong_to_right} wrong->right"
                     + (f", {other} wrong->another wrong" if other else "") + "; top-1 float "
                     f"{100 * self.float_accuracy:.2f} % -> int8 {100 * self.quant_accuracy:.2f} %")
        return text

    def plot(self, path: str | Path, max_classes: int = 40) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        involved = Counter()
        for (f, q), n in self.pairs.items():
            involved[f] += n
            involved[q] += n
        classes = sorted(c for c, _ in involved.most_common(max_classes))
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        if classes:
            names, matrix = self.confusion(classes)
            off = matrix.clone().float()
            off.fill_diagonal_(float("nan"))
            im = ax.imshow(off.numpy(), cmap="Reds")
            ax.set_xticks(range(len(names)), [str(c) for c in names], rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), [str(c) for c in names], fontsize=6)
            fig.colorbar(im, ax=ax, label="images")
        ax.set_xlabel("int8 prediction")
        ax.set_ylabel("float prediction")
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(self.summary(), 70)), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


def prediction_flips(float_out: torch.Tensor, quant_out: torch.Tensor,
                     labels: torch.Tensor | None = None) -> FlipReport:
    """Compare top-1 predictions of two (N, classes) outputs; with ``labels`` also count right<->wrong."""
    if float_out.shape != quant_out.shape or float_out.dim() != 2:
        raise DataError(f"need two (N, classes) outputs of one shape, got {tuple(float_out.shape)} and "
                        f"{tuple(quant_out.shape)}")
    fp, qp = float_out.argmax(1).cpu(), quant_out.argmax(1).cpu()
    changed = fp != qp
    report = FlipReport(total=len(fp), changed=int(changed.sum()))
    report.pairs = Counter((int(f), int(q)) for f, q in zip(fp[changed], qp[changed]))
    report.unchanged = Counter(int(f) for f in fp[~changed])
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != fp.shape:
            raise DataError(f"labels of shape {tuple(labels.shape)} do not match {len(fp)} outputs")
    report.flipped = [(int(i), int(fp[i]), int(qp[i]), None if labels is None else int(labels[i]))
                      for i in changed.nonzero().flatten()]
    if labels is not None:
        fr, qr = fp == labels, qp == labels
        report.right_to_wrong = int((fr & ~qr).sum())
        report.wrong_to_right = int((~fr & qr).sum())
        report.float_accuracy = float(fr.float().mean())
        report.quant_accuracy = float(qr.float().mean())
    return report
