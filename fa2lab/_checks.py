"""Input validation at the public boundary: every error names the values and the fix."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError by Python's convention, and a ValueError like
    every other bad input of fa2lab (so `except ValueError` catches every refusal)."""


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"expected {name} to be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"expected {name} to have {ndim} dims {layout}, got shape {tuple(t.shape)}; "
            f"reshape it (e.g. q.transpose(1, 2) if it is (B, N, H, D))"
        )


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    ts = list(tensors.values())
    first = ts[0]
    if first.dtype in FLOAT_DTYPES and all(t.dtype == first.dtype and t.device == first.device for t in ts[1:]):
        return  # the common case, without building the messages below
    names = list(tensors)
    first = tensors[names[0]]
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"expected {name} to be float16, bfloat16, float32 or float64, got {t.dtype}; "
                f"convert it with {name}.float()"
            )
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(
            f"expected {', '.join(names)} to share a dtype, got {dtypes}; cast them to one, "
            f"e.g. k.to(q.dtype)"
        )
    devices = {name: str(t.device) for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            f"expected {', '.join(names)} on one device, got {devices}; move them with "
            f".to({str(first.device)!r})"
        )


def check_heads(hq: int, hkv: int, hkv_v: int) -> None:
    if hkv != hkv_v:
        raise ValueError(f"expected k and v to have the same number of heads, got {hkv} and {hkv_v}")
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):  # Hq = Hkv = 0: no heads at all, allowed
        raise ValueError(
            f"expected the query heads Hq={hq} to be a multiple of the key/value heads Hkv={hkv} "
            f"(GQA/MQA); use Hkv in {[d for d in range(1, hq + 1) if hq % d == 0]}"
        )


def check_head_dims(dq: int, dk: int) -> None:
    if dq != dk:
        raise ValueError(f"expected q and k to share head_dim, got {dq} and {dk}; project them to one size")


def check_window(window_size) -> tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"expected window_size to be a pair (left, right), got {window_size!r}")
    left, right = window_size
    for side, val in (("left", left), ("right", right)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise ValueError(f"expected window_size {side} to be an int, got {val!r}")
        if val < -1:
            raise ValueError(
                f"expected window_size {side} >= -1 (-1 means unbounded), got {val}; "
                f"use -1 for no bound or a key count >= 0"
            )
    return int(left), int(right)


def resolve_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) and not (
            isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() == 1):
        raise ValueError(f"expected softmax_scale to be a number or None (1/sqrt(D)), got {softmax_scale!r}")
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"expected a finite softmax_scale, got {softmax_scale!r}; None means 1/sqrt(D)")
    return scale


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, batch: int | None) -> list[int]:
    """Validate cumulative sequence lengths; returns them as a Python list."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1:
        raise ValueError(f"expected {name} to be a 1-D int32 tensor (batch + 1,), got {cu!r}")
    if cu.dtype != torch.int32:
        raise ValueError(f"expected {name} to be int32, got {cu.dtype}; use {name}.to(torch.int32)")
    if cu.numel() < 1:
        raise ValueError(f"expected {name} to hold at least one value (batch + 1 offsets), got none")
    values = cu.tolist()
    if batch is not None and len(values) != batch + 1:
        raise ValueError(
            f"expected {name} to have batch + 1 = {batch + 1} entries like cu_seqlens_q, got {len(values)}"
        )
    if values[0] != 0:
        raise ValueError(f"expected {name}[0] == 0, got {values[0]}; offsets start at the first token")
    steps = [b - a for a, b in zip(values, values[1:])]
    if any(s < 0 for s in steps):
        bad = next(i for i, s in enumerate(steps) if s < 0)
        raise ValueError(
            f"expected {name} to be non-decreasing, got {values[bad]} then {values[bad + 1]} at "
            f"index {bad}; it holds cumulative lengths, e.g. torch.cumsum(lengths, 0) with a leading 0"
        )
    if values[-1] != total:
        raise ValueError(
            f"expected {name}[-1] to equal the packed length {total}, got {values[-1]}; "
            f"the offsets and the packed tensor disagree"
        )
    return values


def check_dense(q, k, v, window_size) -> tuple[int, int]:
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> the checked window (left, right)."""
    check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    check_tensor("k", k, 4, "(B, Hkv, Nk, D)")
    check_tensor("v", v, 4, "(B, Hkv, Nk, Dv)")
    check_same_dtype_device(q=q, k=k, v=v)
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"expected q, k, v to share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"expected k and v to have the same length Nk, got {k.shape[2]} and {v.shape[2]}")
    check_head_dims(q.shape[-1], k.shape[-1])
    check_heads(q.shape[1], k.shape[1], v.shape[1])
    return check_window(window_size)


def check_floating(name: str, t) -> None:
    """Attention of integer tensors would truncate every score and weight: refuse them."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected {name} to be a floating-point torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"expected {name} to be float16, bfloat16, float32 or float64, got {t.dtype}; "
                         f"convert it with {name}.float() (or .to(the cache's dtype))")


INT32_MAX = 2**31 - 1


def check_int32(name: str, t) -> torch.Tensor:
    """An integer tensor of lengths or offsets as int32, refusing values that int32 cannot hold
    (a plain .to(torch.int32) wraps 2**32 + 1 to 1 without a word). Reads the values (one sync)."""
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"expected {name} to be an integer tensor (int32), got "
                         f"{getattr(t, 'dtype', type(t).__name__)}; e.g. torch.tensor([...], dtype=torch.int32)")
    if t.dtype != torch.int32 and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < -INT32_MAX - 1 or hi > INT32_MAX:
            raise ValueError(f"expected {name} to fit in int32, got values in [{lo}, {hi}]; lengths and offsets "
                             f"beyond 2**31 - 1 are not supported")
    return t.to(torch.int32)


def check_flag(name: str, value) -> bool:
    """A True/False option (causal, return_lse, ...); 0 and 1 pass, anything else is refused."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"expected {name} to be True or False, got {value!r}")


def check_size(name: str, value, low: int = 1, *, optional: bool = False):
    """An integer size >= low (None passes when optional)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"expected {name} to be an int >= {low}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_float_dtype(name: str, dtype) -> torch.dtype:
    """A floating torch dtype for a buffer or a computation."""
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"expected {name} to be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")
    return dtype


def check_optional_number(name: str, value, what: str):
    """None or a finite real number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"expected {name} to be a finite number or None ({what}), got {value!r}")
    return float(value)


def read_yaml_mapping(path, what: str) -> dict:
    """A YAML file of `what` (a config) as a mapping, read with safe_load: a missing file, a YAML
    syntax error, an unsafe tag or a non-mapping is a ValueError naming the file."""
    from pathlib import Path

    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid YAML {what} (plain YAML only, no tags): {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of {what} keys, got {type(data).__name__}")
    return data
