"""A darknet cfg/weights reader: builds an ``nn.Module`` for YOLO-style cfgs (Yolo-Fastest, YOLOv3(-tiny)).

Supported sections: [convolutional] (groups, batch_normalize, leaky/linear/relu/mish/logistic),
[shortcut] (add), [route] (concat, with groups/group_id for CSP splits), [maxpool], [upsample],
[dropout] (identity at inference) and [yolo] (marks a detection output). The model's forward returns
the raw head maps feeding each [yolo] section, in cfg order; ``decoder`` turns them into boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def parse_cfg(path: str | Path) -> list[dict]:
    """The cfg's sections in order: ``{"type": "convolutional", "filters": "16", ...}``."""
    sections: list[dict] = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line.strip("[]").strip()})
        else:
            key, _, value = line.partition("=")
            if not sections:
                raise ValueError(f"{path}: '{line}' before the first [section]")
            sections[-1][key.strip()] = value.strip()
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise ValueError(f"{path} does not start with a [net] section")
    return sections


def _activation(name: str) -> nn.Module:
    acts = {"leaky": lambda: nn.LeakyReLU(0.1), "relu": nn.ReLU, "mish": nn.Mish, "logistic": nn.Sigmoid,
            "swish": nn.SiLU, "linear": nn.Identity}
    if name not in acts:
        raise ValueError(f"darknet activation '{name}' is not supported")
    return acts[name]()


class ConvBlock(nn.Sequential):
    """conv (+ BN) + activation, named like the darknet layer it loads."""


class Darknet(nn.Module):
    """The network a darknet cfg describes; ``forward`` returns the [yolo] inputs (raw head maps)."""

    def __init__(self, sections: list[dict]):
        super().__init__()
        self.net = sections[0]
        self.width, self.height = int(self.net.get("width", 416)), int(self.net.get("height", 416))
        self.defs = sections[1:]
        self.layers = nn.ModuleList()
        self.yolo: list[dict] = []
        channels: list[int] = []
        c = int(self.net.get("channels", 3))
        for i, s in enumerate(self.defs):
            t = s["type"]
            if t == "convolutional":
                filters, k = int(s["filters"]), int(s["size"])
                stride, groups = int(s.get("stride", 1)), int(s.get("groups", 1))
                pad = k // 2 if int(s.get("pad", 0)) else int(s.get("padding", 0))
                bn = int(s.get("batch_normalize", 0))
                block = ConvBlock()
                block.add_module("conv", nn.Conv2d(c, filters, k, stride, pad, groups=groups, bias=not bn))
                if bn:
                    block.add_module("bn", nn.BatchNorm2d(filters, eps=1e-6))
                act = s.get("activation", "logistic")
                if act != "linear":
                    block.add_module("act", _activation(act))
                self.layers.append(block)
                c = filters
            elif t == "maxpool":
                k, stride = int(s.get("size", 2)), int(s.get("stride", 2))
                if stride == 1:
                    self.layers.append(nn.MaxPool2d(k, 1, (k - 1) // 2))
                else:
                    self.layers.append(nn.MaxPool2d(k, stride, 0))
            elif t == "upsample":
                self.layers.append(nn.Upsample(scale_factor=int(s.get("stride", 2)), mode="nearest"))
            elif t == "route":
                srcs = [int(v) for v in s["layers"].split(",")]
                srcs = [v if v >= 0 else i + v for v in srcs]
                s["_srcs"] = srcs
                groups, gid = int(s.get("groups", 1)), int(s.get("group_id", 0))
                c = sum(channels[v] for v in srcs) // groups
                s["_groups"], s["_gid"] = groups, gid
                self.layers.append(nn.Identity())
            elif t == "shortcut":
                src = int(s["from"])
                s["_src"] = src if src >= 0 else i + src
                if s.get("activation", "linear") != "linear":
                    raise ValueError(f"layer {i}: shortcut activation {s['activation']} is not supported")
                self.layers.append(nn.Identity())
            elif t in ("dropout", "yolo"):
                self.layers.append(nn.Identity())
                if t == "yolo":
                    anchors = [float(v) for v in s["anchors"].split(",")]
                    anchors = [anchors[j:j + 2] for j in range(0, len(anchors), 2)]
                    mask = [int(v) for v in s["mask"].split(",")]
                    self.yolo.append({"layer": i, "anchors": [anchors[m] for m in mask],
                                      "classes": int(s["classes"]), "scale_x_y": float(s.get("scale_x_y", 1))})
            else:
                raise ValueError(f"layer {i}: darknet section [{t}] is not supported")
            channels.append(c)
        self._keep = {d for s in self.defs for d in s.get("_srcs", [])} | {s["_src"] for s in self.defs
                                                                           if "_src" in s}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: dict[int, torch.Tensor] = {}
        heads = []
        for i, (s, layer) in enumerate(zip(self.defs, self.layers)):
            t = s["type"]
            if t == "route":
                x = torch.cat([outs[j] for j in s["_srcs"]], 1) if len(s["_srcs"]) > 1 else outs[s["_srcs"][0]]
                if s["_groups"] > 1:
                    x = torch.chunk(x, s["_groups"], 1)[s["_gid"]]
            elif t == "shortcut":
                x = x + outs[s["_src"]]
            elif t == "yolo":
                heads.append(x)
            else:
                x = layer(x)
            if i in self._keep:
                outs[i] = x
        return heads


def load_weights(model: Darknet, path: str | Path) -> None:
    """Fill ``model`` from a darknet .weights file (header, then BN/bias and conv weights layer by layer)."""
    data = Path(path).read_bytes()
    major, minor, _ = np.frombuffer(data[:12], dtype=np.int32)
    offset = 12 + (8 if major * 10 + minor >= 2 else 4)
    values = np.frombuffer(data[offset:], dtype=np.float32)
    pos = 0

    def take(t: torch.Tensor) -> None:
        nonlocal pos
        n = t.numel()
        if pos + n > len(values):
            raise ValueError(f"{path} ends early: needs more than its {len(values)} floats")
        t.data.copy_(torch.from_numpy(values[pos:pos + n].copy()).view_as(t))
        pos += n

    for layer in model.layers:
        if not isinstance(layer, ConvBlock):
            continue
        if hasattr(layer, "bn"):
            for t in (layer.bn.bias, layer.bn.weight, layer.bn.running_mean, layer.bn.running_var):
                take(t)
        else:
            take(layer.conv.bias)
        take(layer.conv.weight)
    if pos != len(values):
        raise ValueError(f"{path} has {len(values) - pos} floats left over: it does not match the cfg")


def load(cfg: str | Path, weights: str | Path | None = None) -> Darknet:
    """Build the cfg's network (eval mode) and load the weights if given."""
    model = Darknet(parse_cfg(cfg))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def decoder(model: Darknet):
    """A function: the model's raw head maps -> per image ``(N, 4 + classes)`` rows (cx, cy, w, h in input
    pixels, class scores = sigmoid(objectness) * sigmoid(class))."""
    specs = [(torch.tensor(y["anchors"]), y["classes"], y["scale_x_y"]) for y in model.yolo]
    size = torch.tensor([model.width, model.height], dtype=torch.float32)

    def decode(heads: list[torch.Tensor]) -> list[torch.Tensor]:
        rows = []
        for x, (anchors, nc, sxy) in zip(heads, specs):
            b, _, h, w = x.shape
            na = len(anchors)
            p = x.float().view(b, na, 5 + nc, h, w).permute(0, 1, 3, 4, 2)
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack([gx, gy], -1).float()
            xy = (p[..., :2].sigmoid() * sxy - (sxy - 1) / 2 + grid) / torch.tensor([w, h]) * size
            wh = p[..., 2:4].exp() * anchors.view(1, na, 1, 1, 2)
            scores = p[..., 4:5].sigmoid() * p[..., 5:].sigmoid()
            rows.append(torch.cat([xy, wh, scores], -1).reshape(b, -1, 4 + nc))
        return list(torch.cat(rows, 1))

    return decode


__all__ = ["Darknet", "parse_cfg", "load", "load_weights", "decoder"]
