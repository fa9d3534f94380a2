"""Range observers and quantization arithmetic: min-max, percentile, MSE-optimal and entropy (KL) ranges,
scale/zero-point computation, fake quantization. Pure functions over tensors and histograms.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np
import torch

from .config import TensorFormat

__all__ = ["RangeStats", "qparams", "fake_quant", "weight_qparams", "weight_integers", "choose_range"]

# uint8 quantize/dequantize is one fused pass and ~3x faster than fake_quantize on CPU; the same
# numbers (checked in tests). Its quint8 creation function warns about deprecation: silenced at the call.
_FAST_UINT8 = hasattr(torch, "quantize_per_tensor")


class RangeStats:
    """Accumulates what an activation observer needs: min/max (first pass) and a histogram (second pass)."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0
        self.nonfinite = False
        self.hist: torch.Tensor | None = None
        self.hist_lo = 0.0
        self.hist_hi = 0.0

    def update_minmax(self, x: torch.Tensor) -> None:
        x = x.detach()
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.nonfinite = True
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.count += x.numel()

    def start_histogram(self, bins: int) -> None:
        self.hist_lo, self.hist_hi = self.lo, self.hi
        if self.hist_hi <= self.hist_lo:
            self.hist_hi = self.hist_lo + 1e-8
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def update_histogram(self, x: torch.Tensor) -> None:
        assert self.hist is not None
        h = torch.histc(x.detach().float(), bins=self.hist.numel(), min=self.hist_lo, max=self.hist_hi)
        self.hist += h.to(device="cpu", dtype=torch.float64)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)


def _pow2(scale: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, torch.ceil(torch.log2(scale)))


def qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, fmt: TensorFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that represent [lo, hi] (widened to include 0) in ``fmt``."""
    lo_t = torch.as_tensor(lo, dtype=torch.float64).clamp(max=0.0)
    hi_t = torch.as_tensor(hi, dtype=torch.float64).clamp(min=0.0)
    qmin, qmax = fmt.qrange
    if fmt.symmetric:
        scale = torch.maximum(lo_t.abs(), hi_t) / qmax
    else:
        scale = (hi_t - lo_t) / (qmax - qmin)
    scale = scale.clamp(min=1e-30)  # tiny but float32-safe: degenerate (random-init) nets have 1e-13 ranges
    if fmt.pow2:
        scale = _pow2(scale)
    if fmt.symmetric:
        zp = torch.zeros_like(scale)
    else:
        zp = torch.clamp(torch.round(qmin - lo_t / scale), qmin, qmax)
    return scale.to(torch.float32), zp.to(torch.int32)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: TensorFormat,
               axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (round half to even, clamp to the format's integer range)."""
    if fmt.dtype == "float":
        return x
    if fmt.dtype == "fp16":
        return x.to(torch.float16).to(x.dtype)
    qmin, qmax = fmt.qrange
    if axis is None:
        if (_FAST_UINT8 and fmt.bits == 8 and not fmt.symmetric and x.dtype == torch.float32
                and not (x.requires_grad and torch.is_grad_enabled())):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.quantize_per_tensor(x, float(scale), int(zero_point), torch.quint8).dequantize()
            except (RuntimeError, NotImplementedError):
                pass
        return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device), zero_point.to(x.device), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.to(x.device), zero_point.to(x.device), axis, qmin, qmax)


def weight_qparams(w: torch.Tensor, fmt: TensorFormat, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric or asymmetric, per-channel (along ``axis``) or per-tensor weight scales; min-max or MSE."""
    w = w.detach().to(torch.float64)
    if fmt.per_channel:
        flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
    else:
        flat = w.reshape(1, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    if fmt.observer == "mse":
        best_err = torch.full_like(lo, math.inf)
        best_lo, best_hi = lo.clone(), hi.clone()
        for alpha in torch.linspace(0.3, 1.0, 71, dtype=torch.float64):
            c_lo, c_hi = lo * alpha, hi * alpha
            scale, zp = qparams(c_lo, c_hi, fmt)
            scale, zp = scale.double(), zp.double()
            qmin, qmax = fmt.qrange
            s, z = scale[:, None], zp[:, None]
            q = (torch.clamp(torch.round(flat / s) + z, qmin, qmax) - z) * s
            err = ((flat - q) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        lo, hi = best_lo, best_hi
    scale, zp = qparams(lo, hi, fmt)
    if not fmt.per_channel:
        return scale.reshape(()), zp.reshape(())
    return scale, zp


def weight_integers(w: torch.Tensor, scale: torch.Tensor, fmt: TensorFormat, axis: int = 0) -> torch.Tensor:
    """The symmetric integers (as floats) that stand for ``w`` at ``scale`` (per channel along ``axis`` when
    ``scale`` has one value per channel): what the exported file stores and an integer runtime multiplies."""
    if scale.numel() > 1:
        shape = [1] * w.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
    else:
        s = scale.reshape(())
    qmin, qmax = fmt.qrange
    return torch.clamp(torch.round(w / s.to(w)), qmin, qmax)


# ---------------------------------------------------------------------- histogram-based range choice
def _centers(stats: RangeStats) -> tuple[np.ndarray, np.ndarray]:
    assert stats.hist is not None
    counts = stats.hist.numpy()
    edges = np.linspace(stats.hist_lo, stats.hist_hi, counts.size + 1)
    return counts, (edges[:-1] + edges[1:]) / 2


def _percentile_range(stats: RangeStats, fmt: TensorFormat, pct: float) -> tuple[float, float]:
    counts, centers = _centers(stats)
    total = counts.sum()
    if total <= 0:
        return stats.lo, stats.hi
    q = pct / 100.0
    if fmt.symmetric:
        order = np.argsort(np.abs(centers))
        cdf = np.cumsum(counts[order]) / total
        amax = float(np.abs(centers[order][min(np.searchsorted(cdf, q), cdf.size - 1)]))
        amax = min(amax, max(abs(stats.lo), abs(stats.hi)))
        return -amax, amax
    cdf = np.cumsum(counts) / total
    hi = float(centers[min(np.searchsorted(cdf, q), cdf.size - 1)])
    lo = float(centers[min(np.searchsorted(cdf, 1.0 - q), cdf.size - 1)])
    return max(min(lo, 0.0), stats.lo) if stats.lo < 0 else stats.lo, min(hi, stats.hi)


def _expected_sq_error(counts: np.ndarray, centers: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                       fmt: TensorFormat) -> np.ndarray:
    """Expected squared quantization error of the histogram for each candidate range (vectorised)."""
    scale, zp = qparams(torch.from_numpy(lo), torch.from_numpy(hi), fmt)
    scale, zp = scale.double().numpy(), zp.double().numpy()
    qmin, qmax = fmt.qrange
    rep_lo = ((qmin - zp) * scale)[:, None]
    rep_hi = ((qmax - zp) * scale)[:, None]
    v = centers[None, :]
    below = np.clip(rep_lo - v, 0, None)
    above = np.clip(v - rep_hi, 0, None)
    inside = (v >= rep_lo) & (v <= rep_hi)
    err = (counts[None, :] * (below**2 + above**2)).sum(1) + (counts[None, :] * inside).sum(1) * scale**2 / 12.0
    return err


def _mse_range(stats: RangeStats, fmt: TensorFormat) -> tuple[float, float]:
    counts, centers = _centers(stats)
    lo0, hi0 = min(stats.lo, 0.0), max(stats.hi, 0.0)
    alphas = np.linspace(0.02, 1.0, 50)
    if fmt.symmetric:
        amax = max(abs(lo0), hi0)
        lo_c, hi_c = -amax * alphas, amax * alphas
    else:
        a, b = np.meshgrid(alphas, alphas, indexing="ij")
        lo_c, hi_c = (lo0 * a).ravel(), (hi0 * b).ravel()
    err = _expected_sq_error(counts, centers, lo_c, hi_c, fmt)
    i = int(np.argmin(err))
    return float(lo_c[i]), float(hi_c[i])


def _kl_range(stats: RangeStats, fmt: TensorFormat) -> tuple[float, float]:
    """TensorRT-style entropy calibration, generalised to asymmetric ranges by scaling both ends."""
    counts, centers = _centers(stats)
    nbins = counts.size
    # the exact zeros of ReLU-like outputs form one huge bin that dominates the divergence; like NVIDIA's
    # pytorch-quantization, give that bin its neighbour's count
    zero = int(np.argmin(np.abs(centers)))
    if stats.hist_lo <= 0.0 <= stats.hist_hi and nbins > 1:
        counts = counts.copy()
        counts[zero] = counts[zero + 1] if zero + 1 < nbins else counts[zero - 1]
    levels = 2**fmt.bits - (1 if fmt.symmetric else 0)
    lo0, hi0 = min(stats.lo, 0.0), max(stats.hi, 0.0)
    width = (stats.hist_hi - stats.hist_lo) / nbins
    best = (math.inf, lo0, hi0)
    for alpha in np.linspace(1.0, 0.05, 96):
        if fmt.symmetric:
            amax = max(abs(lo0), hi0) * alpha
            c_lo, c_hi = -amax, amax
        else:
            c_lo, c_hi = lo0 * alpha, hi0 * alpha
        i0 = int(np.clip(np.floor((c_lo - stats.hist_lo) / width), 0, nbins - 1))
        i1 = int(np.clip(np.ceil((c_hi - stats.hist_lo) / width), i0 + 1, nbins))
        if i1 - i0 < levels:
            if alpha < 1.0:
                break
            continue
        p = counts[i0:i1].copy()
        p[0] += counts[:i0].sum()
        p[-1] += counts[i1:].sum()
        if p.sum() <= 0:
            continue
        chunks = np.array_split(np.arange(p.size), levels)
        q = np.zeros_like(p)
        for idx in chunks:
            seg = counts[i0:i1][idx]
            nz = seg > 0
            if nz.any():
                q[idx[nz]] = seg.sum() / nz.sum()
        mask = p > 0
        pn = p / p.sum()
        qn = q / max(q.sum(), 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12)))
        if kl < best[0]:
            best = (kl, c_lo, c_hi)
    return best[1], best[2]


# the MSE and entropy searches cost ~0.1 s per tensor; a search over the same histogram and format (the
# repair engine recalibrates the same float activations on every trial) returns its earlier answer
_SEARCHED: dict[tuple, tuple[float, float]] = {}
_SEARCHED_MAX = 8192


def choose_range(stats: RangeStats, fmt: TensorFormat, percentile: float = 99.99) -> tuple[float, float]:
    """The clipping range [lo, hi] that ``fmt.observer`` picks from the statistics of one tensor."""
    if fmt.observer == "minmax" or stats.hist is None:
        return stats.lo, stats.hi
    if fmt.observer == "percentile":
        return _percentile_range(stats, fmt, percentile)
    if fmt.observer not in ("mse", "entropy"):
        raise ValueError(f"unknown observer {fmt.observer!r}")
    counts = stats.hist.numpy()
    key = (hashlib.blake2b(counts.tobytes(), digest_size=16).digest(), counts.size, stats.lo, stats.hi,
           stats.hist_lo, stats.hist_hi, fmt)
    found = _SEARCHED.get(key)
    if found is None:
        found = _mse_range(stats, fmt) if fmt.observer == "mse" else _kl_range(stats, fmt)
        if len(_SEARCHED) >= _SEARCHED_MAX:
            _SEARCHED.clear()
        _SEARCHED[key] = found
    return found
