"""Backend selection for model layers: by device, dtype, head dim and length, with logged fallback.

The design notes assume that below ~64-128 tokens tiling overhead makes plain (materialised)
attention faster. fa2lab does not assume it: `measure_crossover` times the naive path against the
FA2 paths on this machine for one (device, dtype, D) and registers the result; `select_backend`
then picks plain attention only where that measurement says it beats the FA2 path that would
otherwise run, and only for cases whose Nq x Nk score matrix is small. Without a measurement it
never picks plain attention.

    choice = select_backend(case)            # Choice(name, reason); logged once per kind of case
    c = measure_crossover(device="cpu", dtype=torch.float32, head_dim=64)   # ~1-3 s; registers it
    c.length("tiled")                        # N from which the PyTorch FA2 beats plain attention

The decision itself is `fa2lab.backends.choose("model", case, crossover=...)`, the one dispatch
point: this module only measures and keeps the crossover. An explicit backend that cannot run a
case (e.g. "sdpa" with a sliding window) raises a ValueError that names the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fa2lab import backends
from fa2lab.backends import BACKENDS, MAX_PLAIN_SCORES, Case, Choice

_crossovers: dict[tuple[str, torch.dtype, int], "Crossover"] = {}

__all__ = ["Choice", "Crossover", "MAX_PLAIN_SCORES", "clear_crossovers", "get_crossover", "measure_crossover",
           "select_backend", "set_crossover"]


@dataclass(frozen=True)
class Crossover:
    """Best-of-repeats seconds per backend at each length (Nq = Nk = N, causal) on this machine."""

    device: str
    dtype: torch.dtype
    head_dim: int
    heads: int
    heads_kv: int
    lengths: tuple[int, ...]
    times_s: tuple[tuple[str, tuple[float, ...]], ...]  # (backend, seconds per length)
    source: str  # who measured it, when, with how many threads

    def table(self) -> dict[str, tuple[float, ...]]:
        return dict(self.times_s)

    def length(self, backend: str) -> int | None:
        """The crossover against `backend`: the smallest measured N from which `backend` is at least
        as fast as plain attention at every longer measured N. None if plain attention never beat it;
        the largest N + 1 if plain attention won throughout."""
        t = self.table()
        plain, other = t.get("reference"), t.get(backend)
        if plain is None or other is None:
            return None
        wins = [p < o for p, o in zip(plain, other)]
        if not any(wins):
            return None
        last = max(i for i, w in enumerate(wins) if w)
        return self.lengths[last + 1] if last + 1 < len(self.lengths) else self.lengths[-1] + 1

    def plain_is_faster(self, backend: str, nq: int, nk: int) -> bool:
        """True when Nq * Nk is below crossover^2 scores (Nq = Nk = N in the measurement); never
        beyond the measured range."""
        cross = self.length(backend)
        if cross is None or nq * nk > self.lengths[-1] ** 2:
            return False
        return nq * nk < cross * cross


def set_crossover(crossover: Crossover) -> None:
    """Register a measurement for `select_backend` (replaces one for the same device, dtype, D)."""
    _crossovers[(crossover.device, crossover.dtype, crossover.head_dim)] = crossover
    _changed()


_listeners: list = []  # called when the crossovers change (fa2lab.models.functional forgets its decided calls)


def on_change(callback) -> None:
    """Call `callback()` whenever a crossover is registered or cleared: what "auto" decides may change."""
    _listeners.append(callback)


def _changed() -> None:
    for callback in _listeners:
        callback()


def get_crossover(device: str, dtype: torch.dtype, head_dim: int) -> Crossover | None:
    return _crossovers.get((device, dtype, head_dim))


def clear_crossovers() -> None:
    _crossovers.clear()
    _changed()


def measure_crossover(*, device="cpu", dtype=torch.float32, head_dim=64, heads=8, heads_kv=None, batch=1,
                      lengths=(16, 32, 64, 128, 256, 512, 1024), rounds=5, register=True) -> Crossover:
    """Time plain attention (fa2lab's "reference") against the FA2 paths that "auto" may use on this
    device (e.g. "sdpa", "tiled"), causal, Nq = Nk = N, for each N in `lengths`. Each round times
    every backend once, interleaved, so a burst of load from other processes hits all of them; the
    fastest round of each backend is kept."""
    heads_kv = heads_kv or heads
    probe = Case(str(torch.device(device).type), dtype, 1, 1, heads, heads_kv, head_dim, head_dim, True, (-1, -1),
                 False)
    names = ["reference", *backends.auto_order("model", probe)]
    times: dict[str, list[float]] = {n: [] for n in names}
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        q = torch.randn(batch, heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(batch, heads_kv, n, head_dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(batch, heads_kv, n, head_dim, generator=g).to(device=device, dtype=dtype)
        case = Case.of(q, k, v, True, (-1, -1), False)
        calls = {name: (lambda run=BACKENDS[name]: (run(q, k, v, causal=True, window_size=(-1, -1),
                                                       scale=head_dim ** -0.5, return_lse=False), sync()))
                 for name in names if BACKENDS[name].unsupported(case) is None}
        best = {name: float("inf") for name in names}
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        for name in names:
            times[name].append(best[name])
    source = (f"measured {time.strftime('%Y-%m-%d %H:%M')} by fa2lab.models.selection.measure_crossover, "
              f"{torch.get_num_threads()} threads, B={batch} Hq={heads} Hkv={heads_kv}, best of {rounds} rounds")
    result = Crossover(str(torch.device(device).type), dtype, head_dim, heads, heads_kv, tuple(lengths),
                       tuple((k, tuple(v)) for k, v in times.items() if float("inf") not in v), source)
    if register:
        set_crossover(result)
    return result


def select_backend(cases: Case | list[Case], requested: str = "auto") -> Choice:
    """The backend for one attention call of a model layer (a list: the sequences of a varlen
    batch, all run by one backend): `fa2lab.backends.choose("model", ...)` with this machine's
    measured crossover. An explicit backend that cannot run the case raises a ValueError."""
    cases = [cases] if isinstance(cases, Case) else list(cases)
    crossover = get_crossover(cases[0].device, cases[0].dtype, cases[0].d) if cases else None
    return backends.choose("model", cases, requested, crossover=crossover)
