"""Timing helpers shared by the benchmarks.

On a small, shared machine the speed of everything drifts by tens of percent
within a minute, so a measurement and its baseline are taken *interleaved* —
one sample of each in turn, the order rotating every round — and each reports
the median of its samples. Their ratio then compares like with like even when
absolute times do not repeat from one run to the next.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Mapping


async def timed(fn: Callable[[], Awaitable[object]], repeat: int) -> float:
    """Median wall seconds of ``repeat`` awaited calls of ``fn``, one after the other."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def rotations(names: list[str], rounds: int) -> list[list[str]]:
    """``rounds`` orderings of ``names``, each starting one further along.

    No contender is always first (warm caches) or always last (a drifting machine).
    """
    return [names[i % len(names) :] + names[: i % len(names)] for i in range(rounds)]


async def interleaved(
    fns: Mapping[str, Callable[[], Awaitable[object]]], repeat: int
) -> dict[str, float]:
    """Median wall seconds of each awaited ``fns[name]()``, sampled in rotating turns."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for order in rotations(list(fns), repeat):
        for name in order:
            start = time.perf_counter()
            await fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_sync(fns: Mapping[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall seconds of each ``fns[name]()``, sampled in rotating turns."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for order in rotations(list(fns), repeat):
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
