"""Ring attention: each rank keeps its query shard, the K/V shards travel around the ring, and
each rank merges the partial (out, lse) of every block it computes by log-sum-exp.

Forward, rank r, W ranks (Algorithm of Liu et al. 2023, "Ring Attention", with FA2 blocks):

    out_r, lse_r = 0, -inf
    for s in 0 .. W-1:                     K/V held: shard of rank (r - s) mod W
        post send(K, V -> r+1), recv(K', V' <- r-1)       overlaps with the compute below
        for each launch of the plan:       (out_b, lse_b) = FA2 forward of the block
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

Memory. Both passes run the ring once per *head chunk* (a few K/V heads and their query heads,
`head_chunks`), so the ring's working set - the K/V shard held and the one arriving, two dK/dV
sets (one travelling, one arriving), the fp32 output / dQ accumulators and each launch's
gradients - is that of one chunk, not of all heads. Receive buffers are allocated once per chunk
and reused at every step. A rank then holds its shards, output and gradients (what one device
holds for its whole sequence) plus about (10 + G) * D * itemsize bytes per local token and
K/V head of a chunk (G = Hq / Hkv).

Accumulators: out and dQ in fp32 (fp64 for fp64 inputs) per chunk; dK/dV travel in
`grad_dtype(q.dtype)` (see there for the W = 8 error check behind it).
"""

from __future__ import annotations

import logging

import torch

from fa2lab import _checks, masks
from fa2lab.backends import Case, choose
from fa2lab._empty import empty_attention, no_query_rows
from fa2lab.distributed.comm import TAG_DKV, TAG_KV, Ready, Reshard, Ring, check_group, gather_objects
from fa2lab.distributed.plan import LAYOUTS, RingPlan, plan_ring
from fa2lab.tiled.attention import DEFAULT_TILES
from fa2lab.tiled.backward import flash_backward
from fa2lab.tiled.forward import accum_dtype, flash_forward

log = logging.getLogger("fa2lab")
NEG_INF = float("-inf")
# Query rows (B * G * kv heads * N_local) a launch keeps on a GPU before the ring splits heads
# into chunks: 65536 rows = 512 query tiles of 128, about four waves on an H200's 132 SMs, so a
# chunked launch still fills the device. On a CPU the tiled blocks loop over tiles anyway: chunk
# down to one K/V head.
CHUNK_MIN_ROWS_CUDA = 65536
# Keys (B * kv heads * keys of the smallest launch) a launch keeps on a GPU: the backward's dK/dV
# kernel runs one program per key tile and K/V head, so 16384 keys = 128 tiles of 128, one wave on
# 132 SMs. Without it a W = 8 causal zig-zag rank at 128k tokens (half-blocks of 8k keys, one K/V
# head per chunk: 64 programs) took 304 ms against 194 ms with two heads (H200, 2026-12-02, BENCHMARKS.md).
CHUNK_MIN_KEYS_CUDA = 16384


def head_chunks(b: int, hq: int, hkv: int, n_local: int, device: torch.device,
                min_keys: int | None = None) -> list[tuple[int, int]]:
    """K/V head ranges [h0, h1) the ring runs one after the other (their query heads are
    [h0 * G, h1 * G)). One K/V head per chunk on a CPU; on CUDA as few heads as keep
    CHUNK_MIN_ROWS_CUDA query rows and CHUNK_MIN_KEYS_CUDA keys of the smallest launch
    (`min_keys`, default n_local) in each launch."""
    group = hq // hkv if hkv else 1
    per = 1
    if device.type == "cuda":
        rows_per_head = max(1, b * group * n_local)
        keys_per_head = max(1, b * (n_local if min_keys is None else min_keys))
        per = min(hkv, max(-(-CHUNK_MIN_ROWS_CUDA // rows_per_head), -(-CHUNK_MIN_KEYS_CUDA // keys_per_head)))
    per = max(1, per)
    return [(h0, min(h0 + per, hkv)) for h0 in range(0, hkv, per)]


def min_launch_keys(plan: RingPlan) -> int | None:
    """Keys of the smallest launch of any rank (None: nothing launches). Over all ranks, not this
    one's: every rank must split heads into the same chunks, since each chunk is a ring of its own."""
    keys = [blk.k_rows[1] - blk.k_rows[0] for steps in plan.steps for step in steps
            for blk in (step.launches or step.blocks)]
    return min(keys) if keys else None


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dK/dV accumulators travel in: fp32 for fp16/bf16 (fp64 for fp64). Travelling in
    the input dtype would halve those bytes but round the partial sums at every hop;
    `python -m fa2lab.bench.ring_check --simulate 8` measures what that costs at W = 8 against
    the error rule (BENCHMARKS.md, ring section)."""
    return accum_dtype(dtype)


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
        # The same choice as fa2lab.attention: the Hopper kernels on sm_90 where TMA can address
        # the block's views, the portable ones elsewhere.
        from fa2lab.kernels.attention import kernel_forward

        return kernel_forward(q_b, k_b, v_b, scale=scale, left=blk.window[0], right=blk.window[1])
    acc_t = accum_dtype(q_b.dtype)
    return flash_forward(q_b.to(acc_t), k_b.to(acc_t), v_b.to(acc_t), **_block_kw(blk, scale))


def _block_backward(do_b, dlse_b, q_b, k_b, v_b, out_b, lse_b, blk, scale, kernels):
    if kernels:
        from fa2lab.kernels.attention import kernel_backward

        # Row and head slices of (B, H, N, D) stay views: the kernels take strides (no copies).
        return kernel_backward(do_b, dlse_b, q_b, k_b, v_b, out_b, lse_b.float(), scale=scale,
                               left=blk.window[0], right=blk.window[1])
    acc_t = accum_dtype(q_b.dtype)
    dq, dk, dv, _, _ = flash_backward(do_b.to(acc_t), dlse_b, q_b.to(acc_t), k_b.to(acc_t), v_b.to(acc_t),
                                      out_b.to(acc_t), lse_b, **_block_kw(blk, scale))  # no variants: no dbias, dsinks
    return dq, dk, dv


def merge_into(out, lse, out_b, lse_b) -> None:
    """`fa2lab.merge_states(out, lse, out_b, lse_b)` written into (out, lse) in place, with no
    temporary of out's size (merge_states stacks both parts: two more accumulators per merge).
    out (..., n, Dv) and lse (..., n) in the accumulation dtype; out_b in any float dtype."""
    new = torch.logaddexp(lse, lse_b.to(lse.dtype))  # (..., n); -inf where both parts are empty
    ref = new.masked_fill(new == NEG_INF, 0.0)  # avoids -inf - -inf
    out.mul_((lse - ref).exp_().unsqueeze(-1)).addcmul_(out_b, (lse_b - ref).exp_().unsqueeze(-1))
    lse.copy_(new)


def step_forward(out, lse, q_in, k_s, v_s, step, scale: float, kernels: bool = False) -> None:
    """One ring step on one rank: every launch of `step` against the K/V shard (k_s, v_s) it
    holds, merged in place into the rank's running (out, lse) by log-sum-exp."""
    for blk in step.launches:
        o_b, l_b = _block_forward(_rows(q_in, blk.q_rows), _rows(k_s, blk.k_rows), _rows(v_s, blk.k_rows),
                                  blk, scale, kernels)
        merge_into(_rows(out, blk.q_rows), _rows(lse, blk.q_rows), o_b, l_b)


class _Buffers:
    """A pair of K/V (or dK/dV) receive buffers reused across the steps of one chunk: the set held
    now and the set arriving. The caller's own tensors are held at step 0 and never received into."""

    def __init__(self, first, own: bool):
        self.held, self.spare, self.own = list(first), None, own

    def post(self, ring, tag, what, overlap):
        if self.spare is None:
            self.spare = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self.held]
        pending = ring.shift(self.held, tag, what, into=self.spare)
        return pending if overlap else Ready(pending.wait())

    def arrived(self, pending):
        received = pending.wait()  # also waits for the send of `held`: its buffer is free again
        self.held, self.spare = received, (None if self.own else self.held)
        self.own = False
        return received


def _heads(x, h0, h1):
    return x[:, h0:h1]  # (B, H, N, ...) -> (B, h1 - h0, N, ...)


def ring_forward(q, k, v, plan: RingPlan, ring: Ring, scale: float, overlap: bool = True):
    """This rank's (out (B, Hq, Nq_local, Dv) in q's dtype, lse (B, Hq, Nq_local) in fp32/fp64)."""
    acc_t = accum_dtype(q.dtype)
    b, hq, nq, _ = q.shape
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    kernels = _use_kernels(q, k, v)
    out = torch.empty(b, hq, nq, v.shape[-1], dtype=q.dtype, device=q.device)  # (B, Hq, Nq_local, Dv)
    lse = torch.empty(b, hq, nq, dtype=acc_t, device=q.device)  # (B, Hq, Nq_local)
    for h0, h1 in head_chunks(b, hq, hkv, nq, q.device, min_launch_keys(plan)):
        qh = (h0 * group, h1 * group)
        q_in = _heads(q, *qh) if kernels else _heads(q, *qh).to(acc_t)
        o_acc = torch.zeros(b, qh[1] - qh[0], nq, v.shape[-1], dtype=acc_t, device=q.device)  # (B, cG, Nq_l, Dv)
        l_acc = torch.full((b, qh[1] - qh[0], nq), NEG_INF, dtype=acc_t, device=q.device)
        kv = _Buffers([_heads(k, h0, h1).contiguous(), _heads(v, h0, h1).contiguous()], own=True)
        for step in plan.steps[ring.rank]:
            last = step.step == ring.world - 1
            what = (f"the K/V shard of rank {step.kv_rank}, heads {h0}..{h1 - 1} (forward, ring step "
                    f"{step.step + 1} of {ring.world})")
            pending = kv.post(ring, TAG_KV, what, overlap) if not last else None
            step_forward(o_acc, l_acc, q_in, *kv.held, step, scale, kernels)
            if pending is not None:
                kv.arrived(pending)
        _heads(out, *qh).copy_(o_acc)
        _heads(lse, *qh).copy_(l_acc)
        del o_acc, l_acc, kv
    return out, lse


def ring_backward(do, dlse, q, k, v, out, lse, plan: RingPlan, ring: Ring, scale: float, overlap: bool = True,
                  travel_dtype: torch.dtype | None = None):
    """Gradients (dq, dk, dv) of this rank's shards, in the dtypes of q, k, v. dK/dV accumulators
    travel in `travel_dtype` (default `grad_dtype(q.dtype)`)."""
    acc_t = accum_dtype(q.dtype)
    travel_t = travel_dtype or grad_dtype(q.dtype)
    kernels = _use_kernels(q, k, v)
    b, hq, nq, _ = q.shape
    hkv, nk, group = k.shape[1], k.shape[2], hq // k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for h0, h1 in head_chunks(b, hq, hkv, nq, q.device, min_launch_keys(plan)):
        qh = (h0 * group, h1 * group)
        q_c, do_c, out_c, lse_c = (_heads(t, *qh) for t in (q, do, out, lse))
        if not kernels:
            q_c, do_c, out_c = q_c.to(acc_t), do_c.to(acc_t), out_c.to(acc_t)
        dlse_c = None if dlse is None else _heads(dlse, *qh).to(acc_t)
        dq_acc = torch.zeros(q_c.shape, dtype=acc_t, device=q.device)  # (B, cG, Nq_local, D)
        kv = _Buffers([_heads(k, h0, h1).contiguous(), _heads(v, h0, h1).contiguous()], own=True)
        dkv = None  # the dK/dV set of the shard held, arriving (a _Buffers once the first set travels)
        dkv_pending = None
        for step in plan.steps[ring.rank]:
            last = step.step == ring.world - 1
            what = (f"the K/V shard of rank {step.kv_rank}, heads {h0}..{h1 - 1} (backward, ring step "
                    f"{step.step + 1} of {ring.world})")
            pending = kv.post(ring, TAG_KV, what, overlap) if not last else None
            k_s, v_s = kv.held
            if dkv_pending is None:  # step 0: this shard's first contributions start its set
                sets = [torch.zeros((b, h1 - h0, nk, k.shape[-1]), dtype=travel_t, device=k.device),
                        torch.zeros((b, h1 - h0, nk, v.shape[-1]), dtype=travel_t, device=v.device)]
            grads = []
            for blk in step.launches:
                qr, kr = blk.q_rows, blk.k_rows
                g_q, g_k, g_v = _block_backward(
                    _rows(do_c, qr), None if dlse_c is None else _rows(dlse_c, qr), _rows(q_c, qr),
                    _rows(k_s, kr), _rows(v_s, kr), _rows(out_c, qr), _rows(lse_c, qr), blk, scale, kernels)
                _rows(dq_acc, qr).add_(g_q)
                del g_q
                grads.append((kr, g_k, g_v))
            if dkv_pending is not None:
                sets = dkv.arrived(dkv_pending)  # the accumulators of the shard held now
            for kr, g_k, g_v in grads:
                _rows(sets[0], kr).add_(g_k)
                _rows(sets[1], kr).add_(g_v)
            del grads
            if ring.world > 1:
                if dkv is None:
                    dkv = _Buffers(sets, own=False)
                dkv.held = sets
                dkv_pending = dkv.post(ring, TAG_DKV, f"the dK/dV accumulators of rank {step.kv_rank}'s shard, heads "
                                       f"{h0}..{h1 - 1} (backward, ring step {step.step + 1} of {ring.world})", overlap)
            if pending is not None:
                kv.arrived(pending)
        final = dkv.arrived(dkv_pending) if dkv_pending is not None else sets  # own shard, complete
        _heads(dk, h0, h1).copy_(final[0])
        _heads(dv, h0, h1).copy_(final[1])
        _heads(dq, *qh).copy_(dq_acc)
        del dq_acc, kv, dkv, final, sets
    return dq, dk, dv


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


def check_layout(layout, name: str = "ring_attention") -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: unknown layout {layout!r}; the caller's shards are 'contiguous' (rank r holds "
                         f"positions [r*N_local, (r+1)*N_local)) or 'zigzag' (rank r holds chunks r and 2W-1-r "
                         f"of 2W; fa2lab.distributed.zigzag_shard cuts them)")
    return layout


def check_ring_inputs(q, k, v, causal, window_size, scale, group, name: str = "ring_attention",
                      layout: str = "contiguous") -> list[dict]:
    """Validate locally, then compare every rank's shapes and options (one all_gather_object),
    so that a problem on any rank raises on every rank instead of leaving the others waiting."""
    problem = _local_problem(q, k, v, window_size)
    if problem is None and layout == "zigzag" and (q.shape[2] % 2 or k.shape[2] % 2):
        problem = (f"{name}(layout='zigzag') takes shards of two equal chunks; got N_local={q.shape[2]}, "
                   f"Nk_local={k.shape[2]}; use even shard lengths (pad the sequence to a multiple of 2W) or "
                   f"layout='contiguous'")
    meta = dict(problem=problem, q=_describe(q), k=_describe(k), v=_describe(v),
                causal=bool(causal), window_size=tuple(window_size) if isinstance(window_size, (tuple, list)) else
                window_size, scale=scale, layout=layout)
    metas = gather_objects(meta, group, "shard shapes and options")
    me = metas[torch.distributed.get_rank(group)]
    if me["problem"]:
        raise ValueError(me["problem"])
    bad = [(r, m["problem"]) for r, m in enumerate(metas) if m["problem"]]
    if bad:
        raise ValueError(f"{name}: rank {bad[0][0]} rejected its inputs: {bad[0][1]}")
    world = len(metas)
    for name in "qkv":
        lengths = [m[name][0][2] for m in metas]
        if len(set(lengths)) > 1:
            total = sum(lengths)
            fix = -(-total // world) * world
            raise ValueError(
                f"{name} needs equal shards: every rank must hold the same length, got {name} "
                f"lengths {lengths} on ranks 0..{world - 1} (total {total}). Split the sequence into "
                f"{world} equal shards: pad it to {fix} (a multiple of the world size {world}; of "
                f"{2 * world} for zig-zag balance under a causal mask). With causal=True padding at the end "
                f"is never seen by real queries; drop the padded outputs"
            )
    for field in ("q", "k", "v", "causal", "window_size", "scale", "layout"):
        values = [m[field] for m in metas]
        if any(v_ != values[0] for v_ in values):
            raise ValueError(
                f"{name}: ranks disagree on {field}: "
                + ", ".join(f"rank {r}: {v_}" for r, v_ in enumerate(values))
                + "; every rank must pass shards of one shape, dtype and device type, and the same options"
            )
    return metas


def ring_attention(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None, group=None,
                   return_lse=False, layout="contiguous"):
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
    That exchange copies q, k, v and the output once more on every rank; `layout="zigzag"` says
    the caller's shards already are zig-zag (rank r holds chunks r and 2W-1-r of 2W, as cut by
    `fa2lab.distributed.zigzag_shard`): nothing moves, and out / lse come back in that layout.

    Every wait is bounded by the process group's timeout; a dead or absent rank raises a
    `RingError` naming the ranks involved. Needs an initialised process group (gloo or NCCL).
    """
    group = check_group(group)
    layout = check_layout(layout)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1]) if isinstance(q, torch.Tensor) else softmax_scale
    check_ring_inputs(q, k, v, causal, window_size, scale, group, layout=layout)
    window_size = _checks.check_window(window_size)
    if no_query_rows(q):  # B, Hq or N_local is 0 on every rank (the ranks agreed above): no ring to run
        return empty_attention(q, k, v, (*q.shape[:3], v.shape[-1]), q.shape[:3], return_lse)
    ring = Ring(group)
    plan = plan_ring(ring.world, q.shape[2], k.shape[2], causal=causal, window_size=window_size,
                     layout="zigzag" if layout == "zigzag" else None)
    left, right = masks.effective_window(causal, window_size)
    if ring.world > 1 and left < 0 <= right and plan.layout == "contiguous":
        log.info("fa2lab: ring_attention runs contiguous (unbalanced) shards: zig-zag needs even shard "
                 "lengths, got Nq_local=%d, Nk_local=%d", q.shape[2], k.shape[2])
    out, lse = _run(q, k, v, plan, ring, scale, overlap=True, reshard=plan.layout != layout)
    return (out, lse) if return_lse else out


def _run(q, k, v, plan: RingPlan, ring: Ring, scale: float, overlap: bool, reshard: bool | None = None):
    """Plan-level entry, also used by the benchmark to switch the overlap off. `reshard`: move
    contiguous shards into the plan's zig-zag layout and back (default: when the plan is zig-zag)."""
    reshard = plan.layout == "zigzag" if reshard is None else reshard
    if reshard:
        q, k, v = Reshard.apply(ring, True, q, k, v)
    out, lse = _RingAttention.apply(q, k, v, plan, ring, scale, overlap)
    if reshard:
        out, lse = Reshard.apply(ring, False, out, lse)
    return out, lse


__all__ = ["ring_attention", "plan_ring"]
