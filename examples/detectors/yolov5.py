"""YOLOv5n rebuilt from its architecture description; loads the public COCO state_dict (``model.<i>.*`` keys).

``forward`` returns the three raw head maps (P3/P4/P5, 255 channels = 3 anchors x (4 box + 1 obj + 80
classes)); ``decoder`` applies YOLOv5's Detect decoding on the host side, as edge deployments do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 1), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_, 1), Conv(c1, c_, 1), Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(4 * c_, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class Detect(nn.Module):
    """The three final 1x1 convs; anchors (in units of each level's stride) are a buffer."""

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256), nc: int = 80, na: int = 3):
        super().__init__()
        self.nc, self.na = nc, na
        self.m = nn.ModuleList(nn.Conv2d(c, na * (5 + nc), 1) for c in channels)
        self.register_buffer("anchors", torch.zeros(len(channels), na, 2))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(x) for m, x in zip(self.m, xs)]


class YOLOv5n(nn.Module):
    """YOLOv5n (v6.x), 640x640 input; returns the raw P3/P4/P5 head maps."""

    strides = (8, 16, 32)

    def __init__(self, nc: int = 80):
        super().__init__()
        self.model = nn.ModuleList([
            Conv(3, 16, 6, 2, 2), Conv(16, 32, 3, 2), C3(32, 32, 1), Conv(32, 64, 3, 2), C3(64, 64, 2),
            Conv(64, 128, 3, 2), C3(128, 128, 3), Conv(128, 256, 3, 2), C3(256, 256, 1), SPPF(256, 256),
            Conv(256, 128, 1), nn.Upsample(scale_factor=2, mode="nearest"), nn.Identity(),
            C3(256, 128, 1, False), Conv(128, 64, 1), nn.Upsample(scale_factor=2, mode="nearest"), nn.Identity(),
            C3(128, 64, 1, False), Conv(64, 64, 3, 2), nn.Identity(), C3(128, 128, 1, False),
            Conv(128, 128, 3, 2), nn.Identity(), C3(256, 256, 1, False), Detect((64, 128, 256), nc),
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m[1](m[0](x))
        x = m[3](m[2](x))
        p4 = m[4](x)
        x = m[6](m[5](p4))
        p6 = x
        x = m[9](m[8](m[7](x)))
        p10 = m[10](x)
        x = m[13](torch.cat([m[11](p10), p6], 1))
        p14 = m[14](x)
        p3 = m[17](torch.cat([m[15](p14), p4], 1))
        p4_ = m[20](torch.cat([m[18](p3), p14], 1))
        p5 = m[23](torch.cat([m[21](p4_), p10], 1))
        return m[24]([p3, p4_, p5])


def load(state_dict_path: str | Path) -> YOLOv5n:
    """YOLOv5n with the COCO weights (the fp16 state_dict cast to float), in eval mode."""
    sd = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    model = YOLOv5n()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{state_dict_path} does not match YOLOv5n: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def decoder(model: YOLOv5n):
    """Raw head maps -> per image ``(N, 4 + 80)`` rows: cx, cy, w, h in input pixels, obj * class scores."""
    anchors = model.model[24].anchors.detach().float().clone()
    na, nc = model.model[24].na, model.model[24].nc

    def decode(heads: list[torch.Tensor]) -> list[torch.Tensor]:
        rows = []
        for i, x in enumerate(heads):
            b, _, h, w = x.shape
            s = YOLOv5n.strides[i]
            y = x.float().view(b, na, 5 + nc, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack([gx, gy], -1).float()
            xy = (y[..., :2] * 2 - 0.5 + grid) * s
            wh = (y[..., 2:4] * 2) ** 2 * (anchors[i] * s).view(1, na, 1, 1, 2)
            rows.append(torch.cat([xy, wh, y[..., 4:5] * y[..., 5:]], -1).reshape(b, -1, 4 + nc))
        return list(torch.cat(rows, 1))

    return decode


__all__ = ["YOLOv5n", "load", "decoder"]
