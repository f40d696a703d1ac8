"""Measurement tools, below everything that uses them: timing, peak-memory accounting, the
exactness rule. Hardware calibration, the cost model, benchmark drivers and tests import these;
this package imports nothing of fa2lab's.

    timing.time_call(fn, ...) -> Timing  the package's one timing function: median, spread, conditions
    timing.TimingPolicy                  when a measurement is contended, retried, marked
    conditions.gpu_conditions(i)         a GPU's clocks, power, temperature, other processes
    conditions.others_share(fn)          other processes' share of the CPUs while fn() runs
    memory.peak_extra_bytes(fn)          the most resident memory fn() added (Linux, glibc)
    exactness.within_torch_error(...)    error <= 2x PyTorch's own same-dtype error (3x for gradients)
"""

from fa2lab.measure.timing import Timing, TimingPolicy, time_call

__all__ = ["time_call", "Timing", "TimingPolicy"]
