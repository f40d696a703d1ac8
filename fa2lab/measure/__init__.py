"""Measurement tools, below everything that uses them: timing, peak-memory accounting, the
exactness rule. Hardware calibration, the cost model, benchmark drivers and tests import these;
this package imports nothing of fa2lab's.

    timing.median_seconds(fn)          wall-clock median on the CPU
    memory.peak_extra_bytes(fn)        the most resident memory fn() added (Linux, glibc)
    exactness.within_torch_error(...)  error <= 2x PyTorch's own same-dtype error (3x for gradients)
"""
