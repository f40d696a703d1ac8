"""Peak extra host memory of a call, read from the kernel's own accounting (Linux, glibc).

The process's peak resident set (VmHWM) is reset to the current RSS by writing 5 to
/proc/self/clear_refs; after the call, VmHWM - RSS_before is the most memory the call added at
any moment. For this to see every allocation, memory the process holds but has freed must not
count as resident: before the measurement `malloc_trim(0)` hands the pages of every free heap
chunk back to the OS (a chunk reused later faults its pages in again, and is counted), and glibc
is told (mallopt) to serve every new block above 64 KiB by its own mmap and never to trim the
heap while measuring. Those settings make each allocation a page fault, so timings are taken
outside the measurement, with `configure_for_timing()`.

libc is loaded on the first call, not on import (importing fa2lab.cost or fa2lab.hardware loads
nothing). Process-wide malloc settings change only in the calls that say so: `peak_extra_bytes`
(for the measurement, restoring the timing thresholds after it) and `configure_for_timing`.

`peak_tensor_bytes` reads the tensors' own peak instead, from the allocator's reports through
torch.profiler: exact and repeatable (what a test of a memory design asserts on), tensors only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import re

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
EXACT_MMAP_THRESHOLD = 64 * 1024  # a 128x128 fp32 tile and anything larger gets its own mmap
TIMING_MMAP_THRESHOLD = 32 * 2**20  # glibc's dynamic ceiling: tiles come from the heap, as in real use


@functools.cache
def _libc():
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def supported() -> bool:
    return _libc() is not None


def configure_for_timing() -> None:
    """Fixed glibc thresholds for timing, the same for every implementation of a sweep."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, TIMING_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * TIMING_MMAP_THRESHOLD)


@contextlib.contextmanager
def _exact_accounting():
    libc = _libc()
    libc.mallopt(_M_MMAP_THRESHOLD, EXACT_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        configure_for_timing()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_extra_bytes(fn) -> int | None:
    """Run fn() and return the peak memory it added on top of what the process held, or None
    where the OS cannot tell (not Linux with glibc)."""
    if _libc() is None:
        fn()
        return None
    # Unreachable cycles (autograd graphs of earlier calls) are freed first: freed by the collector
    # during fn, their pages would be reused without a page fault and the peak undercounted.
    gc.collect()
    with _exact_accounting():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - before)


def peak_tensor_bytes(fn) -> int | None:
    """Run fn() and return the most tensor memory it held at once on top of what existed before,
    from the allocator's own reports of every tensor allocation and free (torch.profiler with
    profile_memory): exact and the same from run to run, on any OS, where the resident-set reading
    of `peak_extra_bytes` moves by megabytes with the heap's layout. It counts tensors only (not
    Python objects or library workspaces). None where this torch's profiler has no event list."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return None
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:  # allocations positive, frees negative
        held += event.nbytes()
        peak = max(peak, held)
    return peak
