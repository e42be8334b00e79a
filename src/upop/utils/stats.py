"""Small statistics the engine and the tasks share."""

from __future__ import annotations

import math


def binomial_error(percent: float, n: int) -> float:
    """The standard error of a percentage measured on ``n`` samples: sqrt(m (100 - m) / n), m clipped to [0, 100]
    (infinite without samples)."""
    if n < 1:
        return math.inf
    m = min(max(float(percent), 0.0), 100.0)
    return math.sqrt(m * (100.0 - m) / n)


def mean_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (sample standard deviation / sqrt(n); infinite under 2)."""
    n = len(values)
    if n < 2:
        return math.inf
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
