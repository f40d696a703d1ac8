"""DeepSpeed-Ulysses (Jacobs et al. 2023): head-parallel attention over a sequence sharded across
W ranks. Instead of moving K/V around a ring, two all-to-alls swap what is sharded:

    q, k, v (B, H, N_local, D)        every rank: all heads, its part of the sequence
      all_to_all  heads -> sequence
    q, k, v (B, H / W, N, D)          every rank: H / W heads, the whole sequence
      out, lse = fa2lab.attention(...)   one ordinary call: any mask, GQA, the fastest backend
      all_to_all  sequence -> heads
    out (B, H, N_local, Dv)

The backward is the same in reverse (autograd through the two all-to-alls and the attention
call). Rank j gets query heads [j*Hq/W, (j+1)*Hq/W) and K/V heads [j*Hkv/W, (j+1)*Hkv/W): with
Hq = G * Hkv those query heads read exactly those K/V heads, so GQA needs no copies - but W may
not exceed the K/V heads (Hkv % W == 0). Each all-to-all sends (W-1)/W of a rank's tensor
(`UlyssesPlan.comm_volume`): per rank O(N_local) bytes whatever W, where a ring sends W-1 K/V
shards. The attention itself is one call over the whole sequence per rank, so its work is
balanced for every mask with no zig-zag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fa2lab import _checks
from fa2lab._empty import empty_attention, no_query_rows
from fa2lab.distributed.comm import RingError, check_group
from fa2lab.distributed.plan import _segments


@dataclass(frozen=True)
class UlyssesPlan:
    """The head split of Ulysses over `world_size` ranks, and what it sends."""

    world_size: int
    nq_local: int
    nk_local: int
    heads_q: int
    heads_kv: int

    @property
    def heads_q_local(self) -> int:
        return self.heads_q // self.world_size

    @property
    def heads_kv_local(self) -> int:
        return self.heads_kv // self.world_size

    def heads_of(self, rank: int) -> dict:
        """Query and K/V head ranges [a, b) rank `rank` computes over the whole sequence."""
        hq, hk = self.heads_q_local, self.heads_kv_local
        return dict(rank=rank, q_heads=(rank * hq, (rank + 1) * hq), kv_heads=(rank * hk, (rank + 1) * hk),
                    query_rows=self.world_size * self.nq_local, keys=self.world_size * self.nk_local)

    def comm_volume(self, batch: int, head_dim: int, head_dim_v: int | None = None, itemsize: int = 2,
                    backward: bool = True) -> list[dict]:
        """Bytes one rank sends per all-to-all ((W-1)/W of the tensor; the rest stays home).
        bytes = (W-1)/W * B * heads * N_local * dim * itemsize per tensor."""
        dv = head_dim if head_dim_v is None else head_dim_v
        w, part = self.world_size, (self.world_size - 1) / self.world_size
        q = batch * self.heads_q * self.nq_local * head_dim * itemsize
        k = batch * self.heads_kv * self.nk_local * head_dim * itemsize
        v = batch * self.heads_kv * self.nk_local * dv * itemsize
        o = batch * self.heads_q * self.nq_local * dv * itemsize
        rows = [dict(schedule="ulysses", phase="forward", step=0, what="q, k, v: heads -> sequence",
                     bytes_sent=int(part * (q + k + v))),
                dict(schedule="ulysses", phase="forward", step=1, what="out: sequence -> heads", bytes_sent=int(part * o))]
        if backward:
            rows += [dict(schedule="ulysses", phase="backward", step=0, what="dout: heads -> sequence",
                          bytes_sent=int(part * o)),
                     dict(schedule="ulysses", phase="backward", step=1, what="dq, dk, dv: sequence -> heads",
                          bytes_sent=int(part * (q + k + v)))]
        for r in rows:
            r["world_size"] = w
        return rows


def check_ulysses_heads(world_size: int, heads_q: int, heads_kv: int) -> None:
    if heads_kv % world_size or heads_q % world_size:
        raise ValueError(
            f"ulysses_attention splits the heads across the {world_size} ranks: it needs Hq % W == 0 and Hkv % W == 0, "
            f"got Hq={heads_q}, Hkv={heads_kv}, W={world_size}. Use a group of at most Hkv={heads_kv} ranks whose "
            f"size divides it, or ring_attention (no limit on W)")


def plan_ulysses(world_size: int, nq_local: int, nk_local: int | None = None, *, heads_q: int,
                 heads_kv: int | None = None) -> UlyssesPlan:
    """Plan Ulysses over `world_size` ranks holding `nq_local` queries and `nk_local` keys each,
    heads_q query and heads_kv K/V heads (default heads_q). Pure arithmetic, no process group."""
    nk_local = nq_local if nk_local is None else nk_local
    heads_kv = heads_q if heads_kv is None else heads_kv
    for name, value, low in (("world_size", world_size, 1), ("nq_local", nq_local, 0), ("nk_local", nk_local, 0),
                             ("heads_q", heads_q, 1), ("heads_kv", heads_kv, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")
    _checks.check_heads(heads_q, heads_kv, heads_kv)
    check_ulysses_heads(world_size, heads_q, heads_kv)
    return UlyssesPlan(world_size, nq_local, nk_local, heads_q, heads_kv)


def _all_to_all(recv, send, group, what):
    try:
        dist.all_to_all_single(recv, send, group=group)
    except RuntimeError as e:
        raise RingError(f"ulysses_attention: rank {dist.get_rank(group)} could not exchange {what} with the other "
                        f"{dist.get_world_size(group) - 1} rank(s): {e}. A rank died, or did not call "
                        f"ulysses_attention within the process group's timeout") from e
    return recv


def heads_to_sequence(x, group, what="q, k, v"):
    """(B, H, N_local, D) on every rank -> (B, H / W, W * N_local, D): rank j's heads, all positions
    (the ranks' shards in rank order)."""
    w = dist.get_world_size(group)
    b, h, n, d = x.shape
    send = x.reshape(b, w, h // w, n, d).transpose(0, 1).contiguous()  # (W, B, H/W, N_local, D): piece j to rank j
    recv = _all_to_all(torch.empty_like(send), send, group, what)  # recv[i]: rank i's positions of my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // w, w * n, d)


def sequence_to_heads(y, group, what="the output"):
    """The inverse of heads_to_sequence: (B, H / W, W * N_local, D) -> (B, H, N_local, D)."""
    w = dist.get_world_size(group)
    b, hl, nn, d = y.shape
    n = nn // w
    send = y.reshape(b, hl, w, n, d).permute(2, 0, 1, 3, 4).contiguous()  # (W, B, H/W, N_local, D): positions of rank i
    recv = _all_to_all(torch.empty_like(send), send, group, what)  # recv[j]: heads of rank j, my positions
    return recv.transpose(0, 1).reshape(b, w * hl, n, d)


class _HeadsToSequence(torch.autograd.Function):
    """The all-to-all as an autograd op: its gradient is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, to_sequence):
        ctx.group, ctx.to_sequence = group, to_sequence
        return heads_to_sequence(x, group) if to_sequence else sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.to_sequence:
            return sequence_to_heads(grad.contiguous(), ctx.group, "gradients (backward)"), None, None
        return heads_to_sequence(grad.contiguous(), ctx.group, "gradients (backward)"), None, None


def _zigzag_order(world: int, device) -> torch.Tensor:
    """For the 2W chunks gathered in rank order (rank r's chunks r, 2W-1-r), the position of each
    global chunk g: gathered[..., order] is the sequence in global order."""
    pos = {}
    for r in range(world):
        for half, (g, _, _) in enumerate(_segments("zigzag", r, world, 2)):
            pos[g] = 2 * r + half
    return torch.tensor([pos[g] for g in range(2 * world)], device=device)


def _reorder(x, order):
    """(B, H, N, ...) cut into len(order) chunks along N, chunk g taken from position order[g]."""
    b, h, n = x.shape[:3]
    parts = x.reshape(b, h, len(order), n // len(order), *x.shape[3:])
    return parts.index_select(2, order).reshape(x.shape)


def ulysses_attention(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None, group=None,
                      return_lse=False, layout="contiguous"):
    """Context-parallel attention by head parallelism: equal to `fa2lab.attention` on the
    gathered sequence, with the same arguments and shard conventions as `ring_attention`.

    q: (B, Hq, N_local, D), k: (B, Hkv, Nk_local, D), v: (B, Hkv, Nk_local, Dv): this rank's shards,
    equal lengths on every rank; W (the group's size) must divide Hq and Hkv (W <= Hkv) ->
    out (B, Hq, N_local, Dv), this rank's shard of the output; with `return_lse` also lse
    (B, Hq, N_local), float32 (float64 for float64 inputs). Differentiable in q, k, v and through lse.
    layout: "contiguous" (rank r holds positions [r*N_local, (r+1)*N_local)) or "zigzag" (chunks r
    and 2W-1-r of 2W, as ring_attention(layout="zigzag") takes them; the output comes back alike).
    Masks are those of `fa2lab.attention` on the global sequence; the local call picks its backend
    by `fa2lab.backends.choose` like every other entry point.
    """
    from fa2lab.api import attention
    from fa2lab.distributed.ring import check_layout, check_ring_inputs

    group = check_group(group)
    layout = check_layout(layout, "ulysses_attention")
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1]) if isinstance(q, torch.Tensor) else softmax_scale
    check_ring_inputs(q, k, v, causal, window_size, scale, group, name="ulysses_attention", layout=layout)
    window_size = _checks.check_window(window_size)
    world = dist.get_world_size(group)
    check_ulysses_heads(world, q.shape[1], k.shape[1])  # the same shapes on every rank: the same verdict
    if no_query_rows(q):
        return empty_attention(q, k, v, (*q.shape[:3], v.shape[-1]), q.shape[:3], return_lse)
    q_s, k_s, v_s = (_HeadsToSequence.apply(t, group, True) for t in (q, k, v))  # (B, H/W, N, D)
    order = _zigzag_order(world, q.device) if layout == "zigzag" and world > 1 else None
    if order is not None:
        q_s, k_s, v_s = (_reorder(t, order) for t in (q_s, k_s, v_s))
    out, lse = attention(q_s, k_s, v_s, causal=causal, window_size=window_size, softmax_scale=scale,
                         return_lse=True)  # (B, Hq/W, N, Dv), (B, Hq/W, N)
    if not return_lse:
        lse = None
    if order is not None:
        back = torch.argsort(order)
        out = _reorder(out, back)
        lse = None if lse is None else _reorder(lse.unsqueeze(-1), back).squeeze(-1)
    out = _HeadsToSequence.apply(out, group, False)
    if lse is None:
        return out
    return out, _HeadsToSequence.apply(lse.unsqueeze(-1), group, False).squeeze(-1)


__all__ = ["ulysses_attention", "plan_ulysses", "UlyssesPlan"]
