"""A quick exactness check of every backend against the float64 oracle on awkward shapes."""

from __future__ import annotations

import torch

from fa2lab.api import attention
from fa2lab.backends import BACKENDS, Case
from fa2lab.measure.exactness import error_ratio, max_err
from fa2lab.reference import attention_ref

# (label, B, Hq, Hkv, Nq, Nk, D, causal, window)
CHECK_CASES = [
    ("single token", 1, 2, 2, 1, 1, 64, True, (-1, -1)),
    ("Nq<Nk causal GQA 4:1", 2, 8, 2, 97, 232, 40, True, (-1, -1)),
    ("Nq>Nk causal (empty rows)", 1, 4, 4, 232, 97, 80, True, (-1, -1)),
    ("window (64, 0) N=1025", 1, 4, 1, 1025, 1025, 64, False, (64, 0)),
    ("full N=1025 GQA 32:8", 1, 32, 8, 1025, 1025, 32, False, (-1, -1)),
]


def correctness_rows(dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    rows = []
    for label, b, hq, hkv, nq, nk, d, causal, window in CHECK_CASES:
        g = torch.Generator().manual_seed(0)
        q64 = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
        k64 = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
        v64 = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
        truth = attention_ref(q64, k64, v64, causal=causal, window_size=window)
        for dtype in dtypes:
            q, k, v = (t.to(dtype) for t in (q64, k64, v64))
            torch_err = max_err(attention_ref(q, k, v, causal=causal, window_size=window, upcast=False), truth)
            case = Case.of(q, k, v, causal, window, False)
            for name, backend in BACKENDS.items():
                if backend.unsupported(case):
                    continue
                out = attention(q, k, v, causal=causal, window_size=window, backend=name)
                err = max_err(out, truth)
                rows.append(dict(case=label, dtype=str(dtype).removeprefix("torch."), backend=name,
                                 max_abs_err=err, torch_same_dtype_err=torch_err,
                                 ratio=error_ratio(err, torch_err)))
    return rows
