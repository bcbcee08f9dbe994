"""Interleaved timing: every variant once per round, in a shuffled order, ratios taken within a round.

Timing one variant after the other lets load on a shared machine drift between them (perception.py's sequential
figures swung from 2x to 0.7x between two runs); interleaving makes drift and noise hit all variants alike.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def measure(variants: dict[str, Callable[[], object]], rounds: int, seed: int = 0,
            warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per round (one warm-up call each first)."""
    if warmup:
        for fn in variants.values():
            fn()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def throughput_rows(times: dict[str, list[float]], n_items: int, base: str) -> list[tuple[str, float, float, float, float]]:
    """(variant, median items/s, median speed ratio vs ``base``, min ratio, max ratio); ratio > 1 = faster."""
    rows = []
    for name, values in times.items():
        ratios = [b / v for v, b in zip(values, times[base], strict=True)]
        rows.append((name, n_items / statistics.median(values), statistics.median(ratios), min(ratios), max(ratios)))
    return rows
