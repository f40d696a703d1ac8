"""Writing results so that a killed process never leaves half a file: write a temporary file in
the same folder, then os.replace it over the target (atomic on POSIX and Windows).

`record_metrics` is what notebooks call to hand their numbers to `fa2lab sweep`, with the conditions
of the timings the point made (fa2lab.measure.timing)."""

from __future__ import annotations

import json
import numbers
import os
import re
import uuid
from pathlib import Path

CONDITIONS_FILE = "conditions.json"  # next to a point's metrics.json


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same folder (os.replace cannot cross file systems); opened with "x"
    # so that the file gets the usual permissions (mkstemp's are owner-only).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def _plain(key: str, value):
    """A JSON-friendly scalar (or flat list of scalars) from Python, numpy or torch values."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        try:
            value = value.item()  # numpy / torch scalar or one-element array
        except (ValueError, RuntimeError):
            raise TypeError(f"metric {key!r} is an array of shape {tuple(value.shape)}; record a number "
                            f"(e.g. x.max().item()) or a list (x.tolist())") from None
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (list, tuple, dict)) for v in value):
        return [_plain(key, v) for v in value]
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; record numbers, strings, booleans, "
                    f"None or flat lists of them (e.g. float(x) or tensor.item())")


def record_metrics(metrics: dict, path=None) -> dict:
    """Check `metrics` (name -> number, string, bool, None or a flat list of them) and, when `path`
    is given (a notebook's `metrics_path` parameter, set by `fa2lab sweep`), write them there as
    JSON, atomically. Returns the plain-Python metrics, e.g. for display. Non-finite floats are kept
    (JSON NaN / Infinity, which Python and pandas read back).

    A timing is recorded with its spread through `Timing.as_metrics(name, scale)`. Whatever the
    notebook passes, the conditions of every fa2lab.measure.time_call made since the last
    record_metrics with a path go next to the metrics, in conditions.json
    (fa2lab.measure.timing.summarize: timing_count, timing_contended, timing_others_cpu, ...), which
    the sweep runner adds to the point's row: a point measured under contention is marked in
    results.csv even when its notebook records bare numbers."""
    if not isinstance(metrics, dict):
        raise TypeError(f"expected a dict of metrics, got {type(metrics).__name__}")
    plain = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ValueError(f"metric names become table columns: use letters, digits, '_', '.', '-' "
                             f"(starting with a letter or '_'), got {key!r}")
        plain[key] = _plain(key, value)
    if path:
        from fa2lab.measure.timing import summarize, take_recent

        atomic_write_json(path, plain)
        conditions = summarize(take_recent())
        if conditions:
            atomic_write_json(Path(path).with_name(CONDITIONS_FILE), conditions)
    return plain

