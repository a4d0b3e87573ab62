"""Summaries the timing benchmarks share (adapter_speed, gpu_check, pipeline_speed, thread_load).

    from timing import quartiles        # a benchmark run as a file has benchmarks/ on sys.path
    q1, q3 = quartiles([1.02, 0.98, 1.05, 1.01])
"""

from __future__ import annotations

import statistics


def quartiles(values: list[float]) -> tuple[float, float]:
    """(first, third) quartile of `values` (inclusive method); a single value is both."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]
