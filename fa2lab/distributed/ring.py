"""Ring attention: each rank keeps its query shard, the K/V shards travel around the ring, and
each rank merges the partial (out, lse) of every block it computes (`fa2lab.merge_states`).

Forward, rank r, W ranks (Algorithm of Liu et al. 2023, "Ring Attention", with FA2 blocks):

    out_r, lse_r = 0, -inf
    for s in 0 .. W-1:                     K/V held: shard of rank (r - s) mod W
        post send(K, V -> r+1), recv(K', V' <- r-1)       overlaps with the compute below
        for each block of the plan:        (out_b, lse_b) = FA2 forward of the cropped block
            out_r, lse_r = merge(out_r, lse_r, out_b, lse_b)
        K, V = wait(K', V')

Backward recomputes each block from the saved global lse (FA2 Algorithm 2 with D_i = rowsum(dO_i
* O_i) of the final output), so per-block gradients simply add up. dQ stays home; dK, dV
accumulators travel with their K/V shard, one step behind, and one last hop brings each back to
its owner:

    for s in 0 .. W-1:
        post send(K, V -> r+1)
        dQ += ..., dK_b, dV_b = block gradients against the K/V held
        dK, dV = wait(dK, dV from r-1) + (dK_b, dV_b)     (s = 0: just dK_b, dV_b)
        post send(dK, dV -> r+1);  K, V = wait(...)
    dK, dV = wait(dK, dV from r-1)                        own shard, complete

K/V travel in the input dtype, dK/dV accumulators in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import logging

import torch

from fa2lab import _checks, masks
from fa2lab.backends import Case, choose
from fa2lab._empty import empty_attention, no_query_rows
from fa2lab.decode.merge import merge_states
from fa2lab.distributed.comm import TAG_DKV, TAG_KV, Ready, Reshard, Ring, check_group, gather_objects
from fa2lab.distributed.plan import RingPlan, plan_ring
from fa2lab.tiled.attention import DEFAULT_TILES
from fa2lab.tiled.backward import flash_backward
from fa2lab.tiled.forward import accum_dtype, flash_forward

log = logging.getLogger("fa2lab")
NEG_INF = float("-inf")


def _rows(x, rows):
    return x[:, :, rows[0]:rows[1]]  # (B, H, n, ...) -> (B, H, b - a, ...)


def _block_kw(blk, scale):
    return dict(scale=scale, causal=False, window_size=blk.window,
                block_q=DEFAULT_TILES.block_q, block_k=DEFAULT_TILES.block_k)


def _use_kernels(q, k=None, v=None) -> bool:
    """fp16/bf16 on CUDA: each block goes through the Triton kernels (same semantics, same (out,
    lse) contract, dLSE-aware backward); elsewhere through the PyTorch FA2. Decided by
    `fa2lab.backends.choose("ring", ...)`."""
    k = q if k is None else k
    v = k if v is None else v
    return choose("ring", Case.of(q, k, v, False, (-1, -1), True)).name == "triton"


def _block_forward(q_b, k_b, v_b, blk, scale, kernels):
    if kernels:
        from fa2lab.kernels.fwd import flash_fwd_triton

        o_b, l_b = flash_fwd_triton(q_b, k_b, v_b, scale=scale, left=blk.window[0], right=blk.window[1])
        return o_b.float(), l_b
    acc_t = accum_dtype(q_b.dtype)
    return flash_forward(q_b.to(acc_t), k_b.to(acc_t), v_b.to(acc_t), **_block_kw(blk, scale))


def _block_backward(do_b, dlse_b, q_b, k_b, v_b, out_b, lse_b, blk, scale, kernels):
    if kernels:
        from fa2lab.kernels.bwd import flash_bwd_triton

        # Row slices of (B, H, N, D) stay views: the kernels take strides (no copies of q, dO, O).
        return flash_bwd_triton(do_b, dlse_b, q_b, k_b, v_b, out_b, lse_b.float(), scale=scale,
                                left=blk.window[0], right=blk.window[1])
    acc_t = accum_dtype(q_b.dtype)
    dq, dk, dv, _, _ = flash_backward(do_b.to(acc_t), dlse_b, q_b.to(acc_t), k_b.to(acc_t), v_b.to(acc_t),
                                      out_b.to(acc_t), lse_b, **_block_kw(blk, scale))  # no variants: no dbias, dsinks
    return dq, dk, dv


def step_forward(out, lse, q_in, k_s, v_s, step, scale: float, kernels: bool = False) -> None:
    """One ring step on one rank: every block of `step` against the K/V shard (k_s, v_s) it holds,
    merged in place into the rank's running (out, lse) by log-sum-exp."""
    for blk in step.blocks:
        o_b, l_b = _block_forward(_rows(q_in, blk.q_rows), _rows(k_s, blk.k_rows), _rows(v_s, blk.k_rows),
                                  blk, scale, kernels)
        a, z = blk.q_rows
        out[:, :, a:z], lse[:, :, a:z] = merge_states(out[:, :, a:z], lse[:, :, a:z], o_b, l_b)


def ring_forward(q, k, v, plan: RingPlan, ring: Ring, scale: float, overlap: bool = True):
    """This rank's (out (B, Hq, Nq_local, Dv) in q's dtype, lse (B, Hq, Nq_local) in fp32/fp64)."""
    acc_t = accum_dtype(q.dtype)
    b, hq, nq, _ = q.shape
    kernels = _use_kernels(q, k, v)
    q_in = q if kernels else q.to(acc_t)
    out = torch.zeros(b, hq, nq, v.shape[-1], dtype=acc_t, device=q.device)  # (B, Hq, Nq_local, Dv)
    lse = torch.full((b, hq, nq), NEG_INF, dtype=acc_t, device=q.device)  # (B, Hq, Nq_local)
    kv = [k.contiguous(), v.contiguous()]
    for step in plan.steps[ring.rank]:
        last = step.step == ring.world - 1
        what = f"the K/V shard of rank {step.kv_rank} (forward, ring step {step.step + 1} of {ring.world})"
        pending = ring.shift(kv, TAG_KV, what) if overlap and not last else None
        step_forward(out, lse, q_in, *kv, step, scale, kernels)
        if not last:
            kv = (pending or ring.shift(kv, TAG_KV, what)).wait()
    return out.to(q.dtype), lse


def ring_backward(do, dlse, q, k, v, out, lse, plan: RingPlan, ring: Ring, scale: float, overlap: bool = True):
    """Gradients (dq, dk, dv) of this rank's shards, in the dtypes of q, k, v."""
    acc_t = accum_dtype(q.dtype)
    kernels = _use_kernels(q, k, v)
    q_in, do_in, out_in = (q, do, out) if kernels else (q.to(acc_t), do.to(acc_t), out.to(acc_t))
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(acc_t)
    dq = torch.zeros(q.shape, dtype=acc_t, device=q.device)  # (B, Hq, Nq_local, D)
    kv = [k.contiguous(), v.contiguous()]
    dkv_pending = None
    for step in plan.steps[ring.rank]:
        last = step.step == ring.world - 1
        what = f"the K/V shard of rank {step.kv_rank} (backward, ring step {step.step + 1} of {ring.world})"
        pending = ring.shift(kv, TAG_KV, what) if overlap and not last else None
        k_s, v_s = kv
        dk_b = torch.zeros(k.shape, dtype=acc_t, device=k.device)  # (B, Hkv, Nk_local, D)
        dv_b = torch.zeros(v.shape, dtype=acc_t, device=v.device)  # (B, Hkv, Nk_local, Dv)
        for blk in step.blocks:
            qr, kr = blk.q_rows, blk.k_rows
            g_q, g_k, g_v = _block_backward(
                _rows(do_in, qr), _rows(dlse, qr), _rows(q_in, qr), _rows(k_s, kr), _rows(v_s, kr),
                _rows(out_in, qr), _rows(lse, qr), blk, scale, kernels)
            _rows(dq, qr).add_(g_q)
            _rows(dk_b, kr).add_(g_k)
            _rows(dv_b, kr).add_(g_v)
        if dkv_pending is not None:
            dk_in, dv_in = dkv_pending.wait()  # the accumulators of the shard held now
            dk_b, dv_b = dk_b.add_(dk_in), dv_b.add_(dv_in)
            del dk_in, dv_in  # a third fp32 dK/dV set alive would cost 2 * Hkv * D * 4 B per token
        if ring.world > 1:
            owner = step.kv_rank
            dkv_pending = ring.shift([dk_b, dv_b], TAG_DKV,
                                     f"the dK/dV accumulators of rank {owner}'s shard (backward, ring step "
                                     f"{step.step + 1} of {ring.world})")
            if not overlap:
                dkv_pending = Ready(dkv_pending.wait())
        if not last:
            kv = (pending or ring.shift(kv, TAG_KV, what)).wait()
    dk, dv = dkv_pending.wait() if dkv_pending is not None else (dk_b, dv_b)  # own shard, complete
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, ring, scale, overlap):
        out, lse = ring_forward(q, k, v, plan, ring, scale, overlap)
        ctx.save_for_backward(q, k, v, out, lse)  # O(N_local): the blocks are recomputed
        ctx.cfg = (plan, ring, scale, overlap)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = ring_backward(dout, dlse, q, k, v, out, lse, *ctx.cfg)
        return dq, dk, dv, None, None, None, None


def _local_problem(q, k, v, window_size) -> str | None:
    try:
        _checks.check_dense(q, k, v, window_size)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _describe(x) -> tuple:
    return (tuple(x.shape), str(x.dtype), str(x.device.type)) if isinstance(x, torch.Tensor) else (type(x).__name__,)


def check_ring_inputs(q, k, v, causal, window_size, scale, group) -> list[dict]:
    """Validate locally, then compare every rank's shapes and options (one all_gather_object),
    so that a problem on any rank raises on every rank instead of leaving the others waiting."""
    meta = dict(problem=_local_problem(q, k, v, window_size), q=_describe(q), k=_describe(k), v=_describe(v),
                causal=bool(causal), window_size=tuple(window_size) if isinstance(window_size, (tuple, list)) else
                window_size, scale=scale)
    metas = gather_objects(meta, group, "shard shapes and options")
    me = metas[torch.distributed.get_rank(group)]
    if me["problem"]:
        raise ValueError(me["problem"])
    bad = [(r, m["problem"]) for r, m in enumerate(metas) if m["problem"]]
    if bad:
        raise ValueError(f"ring_attention: rank {bad[0][0]} rejected its inputs: {bad[0][1]}")
    world = len(metas)
    for name in "qkv":
        lengths = [m[name][0][2] for m in metas]
        if len(set(lengths)) > 1:
            total = sum(lengths)
            fix = -(-total // world) * world
            raise ValueError(
                f"ring_attention needs equal shards: every rank must hold the same length, got {name} "
                f"lengths {lengths} on ranks 0..{world - 1} (total {total}). Split the sequence into "
                f"{world} equal shards: pad it to {fix} (a multiple of the world size {world}; of "
                f"{2 * world} for zig-zag balance under a causal mask). With causal=True padding at the end "
                f"is never seen by real queries; drop the padded outputs"
            )
    for field in ("q", "k", "v", "causal", "window_size", "scale"):
        values = [m[field] for m in metas]
        if any(v_ != values[0] for v_ in values):
            raise ValueError(
                f"ring_attention: ranks disagree on {field}: "
                + ", ".join(f"rank {r}: {v_}" for r, v_ in enumerate(values))
                + "; every rank must pass shards of one shape, dtype and device type, and the same options"
            )
    return metas


def ring_attention(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None, group=None,
                   return_lse=False):
    """Context-parallel attention: exact attention over a sequence sharded across the ranks of
    `group`, equal to `fa2lab.attention` on the gathered sequence.

    q: (B, Hq, N_local, D), k: (B, Hkv, Nk_local, D), v: (B, Hkv, Nk_local, Dv): this rank's
    contiguous shards (rank r holds positions [r*N_local, (r+1)*N_local)), equal lengths on every
    rank, Hq % Hkv == 0 -> out (B, Hq, N_local, Dv), this rank's shard of the output; with
    `return_lse` also lse (B, Hq, N_local), float32 (float64 for float64 inputs).
    Differentiable in q, k, v and through lse; the backward circulates K/V and dK/dV on the ring.

    Masks are those of `fa2lab.attention` on the global sequence (Nq = W*N_local, Nk = W*Nk_local,
    bottom-right aligned). W = 2, N_local = 2, causal: the blocks each rank computes
                   keys  r0: 0 1 | r1: 2 3
        q0 (rank 0)      x .   |   . .        rank 0: step 0 diagonal, step 1 skipped
        q1 (rank 0)      x x   |   . .
        q2 (rank 1)      x x   |   x .        rank 1: step 0 diagonal, step 1 full
        q3 (rank 1)      x x   |   x x
    That split is unbalanced, so a causal mask (no left window) with even shard lengths runs on
    the zig-zag layout (`fa2lab.distributed.plan`): the shards are exchanged once into chunks
    (r, 2W-1-r), computed, and the output moved back - inputs and outputs stay contiguous.

    Every wait is bounded by the process group's timeout; a dead or absent rank raises a
    `RingError` naming the ranks involved. Needs an initialised process group (gloo or NCCL).
    """
    group = check_group(group)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1]) if isinstance(q, torch.Tensor) else softmax_scale
    check_ring_inputs(q, k, v, causal, window_size, scale, group)
    window_size = _checks.check_window(window_size)
    if no_query_rows(q):  # B, Hq or N_local is 0 on every rank (the ranks agreed above): no ring to run
        return empty_attention(q, k, v, (*q.shape[:3], v.shape[-1]), q.shape[:3], return_lse)
    ring = Ring(group)
    plan = plan_ring(ring.world, q.shape[2], k.shape[2], causal=causal, window_size=window_size)
    left, right = masks.effective_window(causal, window_size)
    if ring.world > 1 and left < 0 <= right and plan.layout == "contiguous":
        log.info("fa2lab: ring_attention runs contiguous (unbalanced) shards: zig-zag needs even shard "
                 "lengths, got Nq_local=%d, Nk_local=%d", q.shape[2], k.shape[2])
    out, lse = _run(q, k, v, plan, ring, scale, overlap=True)
    return (out, lse) if return_lse else out


def _run(q, k, v, plan: RingPlan, ring: Ring, scale: float, overlap: bool):
    """Plan-level entry, also used by the benchmark to switch the overlap off."""
    if plan.layout == "zigzag":
        q, k, v = Reshard.apply(ring, True, q, k, v)
    out, lse = _RingAttention.apply(q, k, v, plan, ring, scale, overlap)
    if plan.layout == "zigzag":
        out, lse = Reshard.apply(ring, False, out, lse)
    return out, lse


__all__ = ["ring_attention", "plan_ring"]
