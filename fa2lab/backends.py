"""The attention backends and how "auto" chooses among them.

Each backend says for a `Case` whether it can run it (`unsupported` returns a reason or None) and
runs it on dense (B, H, N, D) inputs. `fa2lab.api` is the one dispatch point; adding a backend
(the Triton kernels) means adding a class here and a place in `AUTO_ORDER`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fa2lab import masks
from fa2lab.reference import attention_ref
from fa2lab.tiled import tiled_attention


@dataclass(frozen=True)
class Case:
    """Everything about a call that decides which backend can run it."""

    device: str
    dtype: torch.dtype
    nq: int
    nk: int
    hq: int
    hkv: int
    d: int
    dv: int
    causal: bool
    window_size: tuple[int, int]
    return_lse: bool

    @classmethod
    def of(cls, q, k, v, causal, window_size, return_lse) -> "Case":
        return cls(q.device.type, q.dtype, q.shape[-2], k.shape[-2], q.shape[1], k.shape[1],
                   q.shape[-1], v.shape[-1], bool(causal), tuple(window_size), bool(return_lse))

    @property
    def window(self) -> tuple[int, int]:
        return masks.effective_window(self.causal, self.window_size)


class Reference:
    name = "reference"
    summary = "naive materialised attention, fp32 (fp64 for fp64) inside: O(Nq*Nk) memory"

    def unsupported(self, case: Case) -> str | None:
        return None

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse):
        return attention_ref(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale,
                             upcast=True, return_lse=return_lse)


class Tiled:
    name = "tiled"
    summary = "FlashAttention-2 in PyTorch (fa2lab.tiled): O(N) memory, every mask and shape"

    def unsupported(self, case: Case) -> str | None:
        return None

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse):
        return tiled_attention(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale,
                               return_lse=return_lse)


class Sdpa:
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (torch's fused kernels)"

    def unsupported(self, case: Case) -> str | None:
        left, right = case.window
        if case.return_lse:
            return "torch SDPA does not return the log-sum-exp"
        if left >= 0 or (right >= 0 and not case.causal):
            return f"torch SDPA has no sliding window (window_size={case.window_size})"
        if case.causal and case.nq != case.nk:
            return f"torch SDPA aligns causal masks top-left, fa2lab bottom-right (Nq={case.nq} != Nk={case.nk})"
        if min(case.nq, case.nk) == 0:
            return f"torch SDPA does not define zero-length inputs (Nq={case.nq}, Nk={case.nk})"
        return None

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _triton_installed() -> bool:
    # find_spec walks sys.path: tens of microseconds, once per process instead of per call
    return importlib.util.find_spec("triton") is not None


def triton_unavailable(device: str, dtype: torch.dtype, head_dims: tuple[int, ...]) -> str | None:
    """Why the Triton kernels cannot run a case, or None."""
    if not _triton_installed():
        return "triton is not installed (pip install triton; Linux x86-64)"
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernels need a CUDA device, got {device} (TRITON_INTERPRET=1 interprets them on the CPU, slowly)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32, got {dtype}"
    if max(head_dims) > 256:
        return f"the Triton kernels support head dims up to 256, got {max(head_dims)}"
    return None


class Triton:
    name = "triton"
    summary = "fa2lab's Triton FA2 kernels (fa2lab.kernels): forward + backward, every mask, GQA, varlen"

    def unsupported(self, case: Case) -> str | None:
        return triton_unavailable(case.device, case.dtype, (case.d, case.dv))

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse):
        from fa2lab.kernels.attention import triton_attention

        left, right = masks.effective_window(causal, window_size)
        return triton_attention(q, k, v, scale=scale, left=left, right=right, return_lse=return_lse)


BACKENDS = {b.name: b for b in (Reference(), Tiled(), Sdpa(), Triton())}

# Fastest first, per device type (measured: BENCHMARKS.md). CPU: torch's fused kernel beats the
# PyTorch-level FA2 wherever it applies; the tiled FA2 runs everything else in O(N) memory. CUDA,
# fp16/bf16: the Triton kernels (1.3-1.4x SDPA's default flash forward, >= its backward on the
# H100); fp32 on CUDA: SDPA first (the kernels' exact-fp32 dots are slow).
AUTO_ORDER = {"cpu": ("sdpa", "tiled"), "cuda": ("triton", "sdpa", "tiled"), "cuda-fp32": ("sdpa", "triton", "tiled")}
DEFAULT_AUTO_ORDER = ("sdpa", "tiled")


def choose(cases: list[Case]) -> tuple[str, str]:
    """(backend name, reason) for "auto": the first in AUTO_ORDER that runs every case."""
    device = cases[0].device if cases else "cpu"
    if device == "cuda" and cases[0].dtype in (torch.float32, torch.float64):
        device = "cuda-fp32"
    skipped = []
    for name in AUTO_ORDER.get(device, DEFAULT_AUTO_ORDER):
        reasons = [r for r in (BACKENDS[name].unsupported(c) for c in cases) if r]
        if not reasons:
            why = f"fastest supported on {device}" + (f"; {'; '.join(skipped)}" if skipped else "")
            return name, why
        skipped.append(f"not {name}: {reasons[0]}")
    return "reference", "; ".join(skipped)
