"""The exactness rule (CONVENTIONS.md, 9): an error is judged against PyTorch's own.

Compute a float64 truth; a low-precision result passes when its max error is at most `factor`
times the error of plain PyTorch computing in the same dtype (2x for outputs, 3x for gradients),
plus a small floor for cases where PyTorch happens to be exact. tests/helpers.py, the correctness
check (fa2lab.bench.check) and the GPU benchmark (fa2lab.bench.gpu) all apply this one rule.
"""

from __future__ import annotations

import torch

FWD_FACTOR = 2.0  # outputs: at most twice PyTorch's own same-dtype error
GRAD_FACTOR = 3.0  # gradients: three times (one more rounding of P in the backward)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; 0 for empty tensors."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def exact_floor(dtype: torch.dtype) -> float:
    """The slack for a PyTorch error of 0 (a single key, say): a quarter of the dtype's epsilon."""
    return torch.finfo(dtype).eps / 4


def within_torch_error(err: float, torch_err: float, factor: float = FWD_FACTOR, floor: float = 0.0) -> bool:
    """The rule: err <= factor * torch_err + floor."""
    return err <= factor * torch_err + floor


def error_ratio(err: float, torch_err: float) -> float:
    """err / torch_err, the figure a report prints; nan when PyTorch was exact."""
    return err / torch_err if torch_err else float("nan")


__all__ = ["FWD_FACTOR", "GRAD_FACTOR", "error_ratio", "exact_floor", "max_err", "within_torch_error"]
