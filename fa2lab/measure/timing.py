"""Wall-clock medians on the CPU (on a GPU, use triton.testing.do_bench instead).

Used by the benchmark drivers (fa2lab.bench), hardware calibration and notebook 04."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, *, min_repeats: int = 3, max_repeats: int = 20, budget_s: float = 2.0) -> float:
    """Median wall time of fn() after one warm-up call; repeats until `budget_s` is spent."""
    fn()
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
