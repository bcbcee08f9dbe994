"""Interleaved timing: every variant once per round, in a shuffled order, ratios taken within a round.

Timing one variant after the other lets load on a shared machine drift between them (perception.py's sequential
figures swung from 2x to 0.7x between two runs); interleaving makes drift and noise hit all variants alike.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path


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


def environment(packages: Iterable[str]) -> dict[str, object]:
    """What a figure depends on besides the code: machine, load, thread settings, package versions. The load
    average is what other processes did to the machine during the run (the figures of a shared machine move with
    it)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "load_average_1_5_15": list(os.getloadavg()),
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "versions": versions}


def write_json_report(path: str | os.PathLike, script: str, settings: dict[str, object], environment_start: dict,
                      rows: list[dict[str, object]], packages: Iterable[str]) -> None:
    """Write a benchmark's figures with its settings and environment (start and end) as JSON, atomically: the
    README quotes only figures found in such a committed file."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bolid.safetensors_io import atomic_write_text

    report = {"script": script, "command": [Path(sys.executable).name, *sys.argv], "settings": settings,
              "environment_start": environment_start, "environment_end": environment(packages), "rows": rows}
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
