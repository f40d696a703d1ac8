"""The package's one timing function: `time_call(fn)` returns the median with its spread and the
conditions it ran under, and says when the figure cannot be trusted.

    t = time_call(lambda: attention(q, k, v), budget_s=0.5)
    t.median_s, t.min_s, t.max_s, t.repeats     # seconds; repeats after one warm-up call
    t.others_cpu, t.threads                     # other processes' share of the CPUs; torch threads
    t.gpu_start, t.gpu_end                      # on CUDA: clocks, power, temperature, other processes
    t.contended, t.throttled, t.warning()       # the verdict, never silent

On a CPU the calls are timed with a wall clock until `budget_s` is spent (at least `min_repeats`);
on CUDA with `triton.testing.do_bench` (CUDA events, L2 flushed between calls; `budget_s` is its
`rep`). The policy (`TimingPolicy`: per call, or per sweep spec through FA2LAB_TIMING) decides what
happens when other processes took more than `threshold` of the CPUs meanwhile, or other processes
ran on the GPU: wait `wait_s` (doubling) and measure again, up to `retries` times; a measurement
still contended after that is kept, the least contended attempt, and marked `contended`. A GPU
whose SM clock ended below `min_clock_ratio` of its maximum, or that reported a thermal or hardware
slowdown, is marked `throttled`.

Every Timing is also kept in a process-wide log (`recent()`, `take_recent()`), from which
`record_metrics` adds a sweep point's conditions and the command lines print `warning_text`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass

from fa2lab.measure.conditions import SLOWDOWN_REASONS, LoadWindow, gpu_conditions

__all__ = ["time_call", "Timing", "TimingPolicy", "default_policy", "once", "recent", "take_recent", "summarize",
           "warning_text", "process_warning", "print_process_warning", "median_seconds", "POLICY_ENV"]

POLICY_ENV = "FA2LAB_TIMING"  # JSON of TimingPolicy fields: the default policy of this process
log = logging.getLogger("fa2lab")


@dataclass(frozen=True)
class TimingPolicy:
    threshold: float = 0.10  # share of all CPUs other processes may use during a measurement
    retries: int = 2  # measurements taken again while contended (0: mark only)
    wait_s: float = 1.0  # pause before the first retry; doubles at each further one
    min_window_s: float = 0.25  # load is read over at least this long (/proc/stat counts 10 ms ticks)
    min_clock_ratio: float = 0.80  # GPU: SM clock at the end below this share of its maximum is throttled

    def __post_init__(self):
        _check_policy(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> TimingPolicy:
        """A policy from a mapping of some of its fields (a sweep spec's `timing:`); the others
        keep their defaults. ValueError names an unknown field or a bad value."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown timing policy field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_policy(p: TimingPolicy) -> None:
    for name in ("threshold", "min_clock_ratio"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"timing policy: {name} is a share between 0 and 1, got {value!r}")
    if isinstance(p.retries, bool) or not isinstance(p.retries, int) or p.retries < 0:
        raise ValueError(f"timing policy: retries must be an integer >= 0, got {p.retries!r}")
    for name in ("wait_s", "min_window_s"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"timing policy: {name} must be seconds >= 0, got {value!r}")


def once() -> TimingPolicy:
    """The process's policy without retries: for work that cannot be repeated (it is marked only)."""
    return dataclasses.replace(default_policy(), retries=0)


def default_policy() -> TimingPolicy:
    """The policy of this process: FA2LAB_TIMING (JSON, set by `fa2lab sweep` from a spec's
    `timing:`) over the defaults."""
    raw = os.environ.get(POLICY_ENV)
    if not raw:
        return TimingPolicy()
    try:
        return TimingPolicy.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{POLICY_ENV}={raw!r} is not a timing policy: {exc}") from None


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    device: str  # "cpu" or "cuda:<index>"
    threads: int  # torch intra-op threads
    others_cpu: float | None  # share of all CPUs other processes used (None: unknown on this OS)
    attempts: int  # measurements taken (1 + retries used)
    contended: bool
    threshold: float  # the policy's threshold it was judged by
    throttled: bool = False
    gpu_start: dict | None = None
    gpu_end: dict | None = None
    label: str = ""

    @property
    def gpu_others(self) -> int | None:
        counts = [g.get("other_processes") for g in (self.gpu_start, self.gpu_end) if g]
        counts = [c for c in counts if c is not None]
        return max(counts) if counts else None

    def fields(self) -> dict:
        """Flat columns for a results table: the spread, the conditions and the verdict."""
        out = dict(median_s=self.median_s, min_s=self.min_s, max_s=self.max_s, repeats=self.repeats,
                   attempts=self.attempts, others_cpu=self.others_cpu, threads=self.threads,
                   contended=self.contended, throttled=self.throttled)
        for when, g in (("start", self.gpu_start), ("end", self.gpu_end)):
            if g:
                for key in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c"):
                    out[f"{key}_{when}"] = g.get(key)
        if self.gpu_end:
            out["sm_clock_max_mhz"] = self.gpu_end.get("sm_clock_max_mhz")
            out["gpu_reasons"] = ",".join(self.gpu_end.get("reasons") or [])
            out["gpu_other_processes"] = self.gpu_others
        return out

    def as_metrics(self, name: str, scale: float = 1.0) -> dict:
        """`name` (the median times `scale`, e.g. 1e6 for microseconds) with `name_min`, `name_max`,
        `name_repeats` and `name_contended` (contended or throttled): what a notebook passes to
        record_metrics so that the report can draw the spread and leave the point out of fits."""
        return {name: self.median_s * scale, f"{name}_min": self.min_s * scale, f"{name}_max": self.max_s * scale,
                f"{name}_repeats": self.repeats, f"{name}_contended": self.contended or self.throttled}

    def warning(self) -> str | None:
        """One line saying why this figure cannot be trusted, or None when it can."""
        why = []
        if self.contended:
            if self.others_cpu is not None and self.others_cpu > self.threshold:
                why.append(f"other processes used {self.others_cpu:.0%} of the CPUs (threshold {self.threshold:.0%})")
            if self.gpu_others:
                why.append(f"{self.gpu_others} other process(es) on {self.device}")
        if self.throttled and self.gpu_end:
            g = self.gpu_end
            why.append(f"GPU clocks throttled (SM {g.get('sm_clock_mhz')} of {g.get('sm_clock_max_mhz')} MHz"
                       + (f"; {', '.join(r for r in g.get('reasons') or [] if r in SLOWDOWN_REASONS)}"
                          if set(g.get("reasons") or []) & SLOWDOWN_REASONS else "") + ")")
        if not why:
            return None
        return (f"{'CONTENDED' if self.contended else 'THROTTLED'}{' ' + self.label if self.label else ''}: "
                f"{'; '.join(why)}, after {self.attempts} attempt(s); median {self.median_s * 1e3:.4g} ms kept")


_LOG: collections.deque = collections.deque(maxlen=100_000)  # every Timing of this process
_SINCE: list = []  # those since the last take_recent()
_LOCK = threading.Lock()


def recent() -> list[Timing]:
    """Every Timing this process made (the newest 100k)."""
    with _LOCK:
        return list(_LOG)


def take_recent(clear: bool = True) -> list[Timing]:
    """The Timings made since the last call that cleared them (a sweep point's, for record_metrics)."""
    with _LOCK:
        out = list(_SINCE)
        if clear:
            _SINCE.clear()
    return out


def _record(t: Timing) -> None:
    with _LOCK:
        _LOG.append(t)
        _SINCE.append(t)


def _cpu_samples(fn, budget_s: float, min_repeats: int, max_repeats: int) -> list[float]:
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _synced(fn):
    import torch

    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _cuda_samples(fn, budget_s: float, min_repeats: int, max_repeats: int) -> list[float]:
    try:
        import triton.testing

        return [ms * 1e-3 for ms in triton.testing.do_bench(fn, warmup=25, rep=max(1, round(budget_s * 1e3)),
                                                             return_mode="all")]
    except ImportError:  # CUDA events by hand: same idea, without the L2 flush
        import torch

        times = []
        while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return times


def _device(device) -> tuple[str, int | None]:
    if device is None:
        return "cpu", None
    text = str(device)
    if text == "cpu":
        return "cpu", None
    if text.startswith("cuda"):
        index = int(text.split(":")[1]) if ":" in text else None
        if index is None:
            import torch

            index = torch.cuda.current_device()
        return f"cuda:{index}", index
    raise ValueError(f"time_call: device must be 'cpu' or 'cuda[:index]', got {device!r}")


def _throttled(g: dict | None, policy: TimingPolicy) -> bool:
    if not g:
        return False
    sm, top = g.get("sm_clock_mhz"), g.get("sm_clock_max_mhz")
    slow = bool(set(g.get("reasons") or []) & SLOWDOWN_REASONS)
    return slow or bool(sm and top and sm < policy.min_clock_ratio * top)


def time_call(fn, *, budget_s: float | None = None, min_repeats: int = 3, max_repeats: int = 20, warmup: int = 1,
              device=None, wall: bool = False, policy: TimingPolicy | None = None, label: str = "",
              progress=None, read_gpu=None) -> Timing:
    """Time fn() (no arguments): `warmup` untimed calls, then repeats until `budget_s` seconds
    are spent (default 2 s on a CPU, 0.1 s on CUDA), between `min_repeats` and `max_repeats`.
    `device`: None or "cpu" (wall clock), "cuda[:i]" (do_bench; with `wall`, a wall clock around
    fn() and a device synchronize, honouring warmup and the repeat counts). `policy`: see TimingPolicy
    (default: default_policy()). Retries and contended results are reported through `progress`
    (default: the "fa2lab" logger), with `label` naming the measurement. `read_gpu(index)`: the
    GPU reader (default fa2lab.measure.conditions.gpu_conditions; tests pass a fake).

    Stateful work (a decode loop that advances a cache) is timed once: warmup=0,
    min_repeats=max_repeats=1, wall=True on CUDA, policy=once()."""
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"time_call: need 1 <= min_repeats <= max_repeats, got {min_repeats} and {max_repeats}")
    if warmup < 0:
        raise ValueError(f"time_call: warmup must be >= 0, got {warmup}")
    import torch

    policy = policy or default_policy()
    name, index = _device(device)
    budget_s = (0.1 if index is not None else 2.0) if budget_s is None else budget_s
    if index is not None and wall:
        fn, samples = _synced(fn), _cpu_samples
    else:
        samples = _cpu_samples if index is None else _cuda_samples
    read_gpu = read_gpu or gpu_conditions
    say = progress or log.warning
    for _ in range(warmup if samples is _cpu_samples else 0):  # do_bench warms up by itself
        fn()
    best = None
    for attempt in range(1, policy.retries + 2):
        g0 = read_gpu(index) if index is not None else None
        window = LoadWindow().start()
        times = samples(fn, budget_s, min_repeats, max_repeats)
        g1 = read_gpu(index) if index is not None else None  # before the window's idle tail lets clocks fall
        share = window.share(policy.min_window_s)
        gpu_busy = any((g or {}).get("other_processes") for g in (g0, g1))
        contended = (share is not None and share > policy.threshold) or gpu_busy
        t = Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times), repeats=len(times),
                   device=name, threads=torch.get_num_threads(), others_cpu=share, attempts=attempt,
                   contended=contended, threshold=policy.threshold, throttled=_throttled(g1, policy),
                   gpu_start=g0, gpu_end=g1, label=label)
        if best is None or _worse(best, t):
            best = t
        if not (t.contended or t.throttled):
            best = t
            break
        if attempt <= policy.retries:
            wait = policy.wait_s * 2 ** (attempt - 1)
            say(f"  ({t.warning()}; measuring again in {wait:.3g} s)")
            time.sleep(wait)
    best = dataclasses.replace(best, attempts=attempt)
    if best.contended or best.throttled:
        say(f"  WARNING: {best.warning()}")
    _record(best)
    return best


def median_seconds(fn, *, min_repeats: int = 3, max_repeats: int = 20, budget_s: float = 2.0) -> float:
    """time_call(fn, ...).median_s, for callers that need the number alone. The Timing is still
    judged, logged and warned about; prefer time_call, whose result carries the verdict."""
    # as before time_call: max_repeats caps the repeats even below min_repeats
    return time_call(fn, min_repeats=min(min_repeats, max_repeats), max_repeats=max_repeats, budget_s=budget_s).median_s


def _worse(a: Timing, b: Timing) -> bool:
    """Is `a` a less trustworthy attempt than `b` (kept: the least contended one)?"""
    def badness(t):
        return (t.contended + t.throttled, t.others_cpu or 0.0)
    return badness(b) < badness(a)


def summarize(timings: list[Timing]) -> dict:
    """A sweep point's conditions from its timings (empty without any): how many timings, how many
    contended or throttled, the largest share of the CPUs others used, torch threads, and on a GPU
    the lowest SM clock at the end of a timing and its maximum."""
    if not timings:
        return {}
    shares = [t.others_cpu for t in timings if t.others_cpu is not None]
    out = dict(timing_count=len(timings), timing_contended=sum(t.contended for t in timings),
               timing_throttled=sum(t.throttled for t in timings),
               timing_others_cpu=max(shares) if shares else None,
               timing_threshold=max(t.threshold for t in timings),
               timing_threads=max(t.threads for t in timings))
    clocks = [t.gpu_end.get("sm_clock_mhz") for t in timings if t.gpu_end and t.gpu_end.get("sm_clock_mhz")]
    if clocks:
        out.update(timing_sm_clock_mhz=min(clocks),
                   timing_sm_clock_max_mhz=max(t.gpu_end.get("sm_clock_max_mhz") or 0 for t in timings if t.gpu_end))
    return out


def warning_text(timed: int, contended: int, throttled: int = 0, *, worst_share: float | None = None,
                 threshold: float = 0.10, what: str = "timings") -> str | None:
    """The one warning that the report's banner, `fa2lab run` and the benchmark command lines print
    when some of their figures were measured under contention or at throttled GPU clocks."""
    if not (contended or throttled):
        return None
    parts = []
    if contended:
        load = f" (up to {worst_share:.0%} of the CPUs)" if worst_share is not None else ""
        parts.append(f"{contended} of {timed} {what} were measured while other processes used more than "
                     f"{threshold:.0%} of the CPUs or the GPU{load}")
    if throttled:
        parts.append(f"{throttled} of {timed} at throttled GPU clocks")
    return ("WARNING: " + "; ".join(parts) + ". They are marked 'contended' / 'throttled', kept, and left out "
            "of fitted slopes; run again on a quiet machine for sound figures.")


def process_warning(timings: list[Timing] | None = None) -> str | None:
    """warning_text over `timings` (default: every timing of this process)."""
    timings = recent() if timings is None else timings
    shares = [t.others_cpu for t in timings if t.contended and t.others_cpu is not None]
    return warning_text(len(timings), sum(t.contended for t in timings), sum(t.throttled for t in timings),
                        worst_share=max(shares) if shares else None,
                        threshold=max((t.threshold for t in timings), default=0.10))


def print_process_warning(timings: list[Timing] | None = None, out=print) -> bool:
    """Print process_warning() when there is one (the benchmark CLIs' last line); True if printed."""
    text = process_warning(timings)
    if text:
        out("\n" + text)
    return bool(text)
