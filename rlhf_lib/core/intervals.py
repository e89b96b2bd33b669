"""Confidence intervals shared by the stages: a proportion's Wilson score interval."""

from __future__ import annotations

import math
import statistics


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (successes may be fractional: ties as half)."""
    # Wilson 1927; Agresti & Coull 1998 recommend it over the normal interval for small n or extreme p
    if n <= 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
