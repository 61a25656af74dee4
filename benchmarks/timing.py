"""Timing shared by the benchmarks: the best of a few runs, with the CPU time of that run.

On the shared 2-core machines these benchmarks run on, wall clock includes waiting for a core;
the CPU seconds of the same run say what the code itself costs, so every benchmark reports both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple


class Timing(NamedTuple):
    wall: float      # seconds of the fastest run
    cpu: float       # CPU seconds of this process during that run
    result: Any      # what the fastest run returned


def best_of(repeat: int, fn: Callable[[], Any]) -> Timing:
    """Run `fn` `repeat` times (at least once); the fastest run's wall and CPU time and result."""
    best = Timing(float("inf"), float("inf"), None)
    for _ in range(max(1, repeat)):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - start
        if wall < best.wall:
            best = Timing(wall, time.process_time() - start_cpu, out)
    return best
