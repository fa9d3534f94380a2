"""The benchmarks' one summary of repeated runs: a mean with its 95 % Student's t-interval."""

from __future__ import annotations

import statistics


def t975(df: int) -> float:
    """Student's t 97.5 % point for ``df`` degrees of freedom (normal beyond 30)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]
    return table[df - 1] if 1 <= df <= len(table) else 1.96


def mean_interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sd, low, high) of ``values``: the 95 % t-interval of their mean (needs two or more)."""
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t975(len(values) - 1) * sd / len(values) ** 0.5
    return mean, sd, mean - half, mean + half
