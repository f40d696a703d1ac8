"""The attention variants inside the Triton kernels: the logits of a tile and dropout's mask.

Shared by the forward and both backward kernels so that the backward recomputes exactly the
forward's logits and mask. Everything in the kernels' log2 units (s * log2(e)); the formulas are
those of fa2lab.variants.options:

    softcap:  s = softcap * tanh(scale * q.k / softcap)   tanh: one MUFU op (tanh.approx.f32) on a GPU,
                                                         1 - 2 / (exp(2x) + 1) under the interpreter
    ALiBi:    s -= slope * |i + Nk - Nq - j|
    bias:     s += bias[b, h, i, j]           read through the bias's strides (0 where broadcast)
    dropout:  keep (b, h, i, j) iff (r >> 1) >= floor(p * 2^31), r = lane j % 4 of
              Philox4x32-10(seed, counter ((b * Hq + h) * Nq + i) * ceil(Nk / 4) + j // 4)

One Philox call gives the four keys j = 4c .. 4c + 3 of a row: `_dropout_keep_tile` draws a
(BLOCK_M, BLOCK_N / 4) block and interleaves the four results (a quarter of the Philox work per
score); `_dropout_keep` computes the same bit of one entry anywhere (any tile orientation, any
index block), so a kernel that cannot use the tile form still regenerates the same mask.

`qi`, `kj` are broadcastable 2-D index blocks (rows[:, None], cols[None, :] in the forward and the
dQ kernel; transposed in the dK/dV kernel), so one function serves both tile orientations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.common import LOG2E, LOG2E_K, interpreting

# The interpreter cannot run PTX: it keeps the exp2 form of tanh (read when this module is imported,
# as Triton reads TRITON_INTERPRET when a kernel is defined).
TANH_APPROX: tl.constexpr = tl.constexpr(not interpreting())
HALF_LN2: tl.constexpr = tl.constexpr(0.5 / LOG2E)  # cap_in (2 scale / softcap * log2 e) -> scale / softcap
P31: tl.constexpr = tl.constexpr(2.0 ** 31)


@triton.jit
def _tanh(x):
    """tanh(x) for an fp32 tile: the MUFU's tanh.approx.f32 (max relative error 2^-10.99, below bf16's
    and fp16's rounding of the logits it feeds), or 1 - 2 / (exp(2x) + 1) under the interpreter."""
    if TANH_APPROX:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E_K)) + 1.0)  # exp2 -> inf gives 1, -> 0 gives -1


@triton.jit
def _softcap(dot, cap_in, cap_out):
    """dot = q.k (fp32 tile) -> (s = softcap * tanh(scale q.k / softcap) in log2 units, the tanh)."""
    t = _tanh(dot * (cap_in * HALF_LN2))
    return t * cap_out, t


@triton.jit
def _variant_logits(dot, qi, kj, load_ok, nq, nk, qk_scale, cap_in, cap_out, slope2, bias_base, sbm, sbn,
                    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dot = q.k (fp32 tile) -> (s in log2 units, tanh(scale q.k / softcap) or dot when not capped).
    cap_in = 2 * scale / softcap * log2(e), cap_out = softcap * log2(e), slope2 = slope * log2(e)."""
    if SOFTCAP:
        s, t = _softcap(dot, cap_in, cap_out)
    else:
        t = dot
        s = dot * qk_scale
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(qi + (nk - nq) - kj).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_base + qi.to(tl.int64) * sbm + kj.to(tl.int64) * sbn, mask=load_ok, other=0.0)
        s = s + bias.to(tl.float32) * LOG2E_K
    return s, t


@triton.jit
def _dropout_threshold(dropout_p):
    """floor(p * 2^31): a kept entry has its 31 high random bits at or above it (exact: p is fp32)."""
    return (tl.cast(dropout_p, tl.float32) * P31).to(tl.int32)


@triton.jit
def _dropout_keep(seed, bh, qi, kj, nq, nk, dropout_p):
    """Bool tile: True where entry (bh, i, j) is kept; any broadcastable index blocks (one Philox call
    per entry: the tile form below makes one per four). 64-bit counters: unique per group of 4 keys."""
    c = (bh.to(tl.int64) * nq + qi.to(tl.int64)) * ((nk + 3) // 4) + (kj // 4).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, c)
    lane = kj % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (r >> 1).to(tl.int32, bitcast=True) >= _dropout_threshold(dropout_p)


@triton.jit
def _dropout_keep_tile(seed, bh, rows, j0, nq, nk, dropout_p, BLOCK_N: tl.constexpr):
    """The same mask as `_dropout_keep` for the (rows, j0 .. j0 + BLOCK_N) tile, rows (BLOCK_M,) and
    j0 % 4 == 0: one Philox call per four keys, its results interleaved into columns 4c + lane."""
    groups = (j0 // 4) + tl.arange(0, BLOCK_N // 4)
    c = (bh.to(tl.int64) * nq + rows.to(tl.int64))[:, None] * ((nk + 3) // 4) + groups.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, c)  # (BLOCK_M, BLOCK_N // 4) each
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [m, c, y, x] = r_(2y + x): column 4c + 2y + x
    r = tl.reshape(r, (rows.shape[0], BLOCK_N))
    return (r >> 1).to(tl.int32, bitcast=True) >= _dropout_threshold(dropout_p)


@triton.jit
def _keep_mask_kernel(OUT, seed, Nq, Nk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p)
    ptrs = OUT + bh.to(tl.int64) * Nq * Nk + rows[:, None].to(tl.int64) * Nk + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Nq) & (cols[None, :] < Nk))


def triton_keep_mask(seed: int, b: int, hq: int, nq: int, nk: int, p: float, device) -> torch.Tensor:
    """The kernels' keep mask (B, Hq, Nq, Nk) bool for one seed (debugging, small problems)."""
    out = torch.empty(b, hq, nq, nk, dtype=torch.int8, device=device)
    if out.numel():
        _keep_mask_kernel[(triton.cdiv(nq, 32), triton.cdiv(nk, 32), b * hq)](out, seed, nq, nk, p, BLOCK_M=32,
                                                                             BLOCK_N=32)
    return out.bool()


class KernelVariants:
    """Kernel arguments of a call's variants (fa2lab.variants.Variants): pointers, strides, flags.
    Absent options pass q as a placeholder pointer; their constexpr flag keeps them out of the code."""

    def __init__(self, var, q, seed: int, scale: float):
        self.var, self.seed = var, seed
        self.softcap = var.softcap > 0
        self.cap_in = 2.0 * scale / var.softcap * LOG2E if self.softcap else 0.0
        self.cap_out = var.softcap * LOG2E if self.softcap else 0.0
        self.slopes = var.alibi_slopes.float() if var.alibi_slopes is not None else q  # (B, Hq), maybe stride 0
        self.slope_strides = self.slopes.stride() if var.alibi_slopes is not None else (0, 0)
        bias = var.attn_bias
        self.bias = bias if bias is not None else q
        # A broadcast (size-1) dim gets stride 0: every index reads its one element, no copy.
        self.bias_strides = (tuple(0 if n == 1 else st for n, st in zip(bias.shape, bias.stride()))
                             if bias is not None else (0, 0, 0, 0))
        self.sinks = var.sinks.float().contiguous() if var.sinks is not None else q

    def args(self):
        """Positional kernel arguments, in the order of the kernels' VARIANT parameters."""
        return (self.slopes, self.bias, self.sinks, *self.slope_strides, *self.bias_strides, self.cap_in,
                self.cap_out, self.var.dropout_p, self.seed)

    def flags(self) -> dict:
        v = self.var
        return dict(SOFTCAP=self.softcap, HAS_ALIBI=v.alibi_slopes is not None, HAS_BIAS=v.attn_bias is not None,
                    HAS_SINKS=v.sinks is not None, HAS_DROPOUT=v.dropout_p > 0)


PLAIN_FLAGS = dict(SOFTCAP=False, HAS_ALIBI=False, HAS_BIAS=False, HAS_SINKS=False, HAS_DROPOUT=False)


def plain_args(q):
    return (q, q, q, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0)
