"""Ring attention in one process, for notebooks and tests: every rank's state after every step.

`simulate_ring` runs the same per-step code as `ring_attention` (`ring.step_forward`), but the
ranks are a loop and the K/V "sent" around the ring is sliced from the gathered sequence, so the
LSE merge can be watched step by step without a process group.
"""

from __future__ import annotations

import torch

from fa2lab.distributed.plan import RingPlan
from fa2lab.distributed.ring import step_forward
from fa2lab.tiled.forward import accum_dtype


def shard(x: torch.Tensor, plan: RingPlan, rank: int, n_local: int) -> torch.Tensor:
    """Rank `rank`'s shard (B, H, n_local, D) of the gathered sequence x (B, H, W * n_local, D)
    in the plan's layout (contiguous, or the two zig-zag chunks)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[2] != plan.world_size * n_local:
        raise ValueError(f"expected the gathered sequence (B, H, W * n_local = {plan.world_size * n_local}, ...), "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (isinstance(rank, int) and 0 <= rank < plan.world_size):
        raise ValueError(f"expected rank in [0, {plan.world_size}), got {rank!r}")
    return torch.cat([x[:, :, g:g + n] for g, _, n in plan.segments(rank, n_local)], dim=2)


def gather(shards: list[torch.Tensor], plan: RingPlan, n_local: int) -> torch.Tensor:
    """The inverse of `shard`: per-rank tensors (B, H, n_local, ...) -> the gathered sequence."""
    if not isinstance(shards, (list, tuple)) or len(shards) != plan.world_size:
        raise ValueError(f"expected one shard per rank ({plan.world_size}), got "
                         f"{len(shards) if isinstance(shards, (list, tuple)) else type(shards).__name__}")
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor) or s.dim() < 3 or s.shape[2] != n_local:
            raise ValueError(f"expected shard {r} to be a tensor (B, H, n_local={n_local}, ...), got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
    # Sorted by global start only: zero-length pieces share a start, and tensors do not compare.
    pieces = sorted(((g, s[:, :, local:local + n]) for r, s in enumerate(shards)
                     for g, local, n in plan.segments(r, n_local)), key=lambda piece: piece[0])
    return torch.cat([p for _, p in pieces], dim=2)


def simulate_ring(q, k, v, plan: RingPlan, softmax_scale: float | None = None) -> list[list[tuple]]:
    """q (B, Hq, W*Nq_local, D), k/v (B, Hkv, W*Nk_local, D): the gathered sequence.

    Returns states[rank][step] = (out, lse) of that rank's query shard after merging the blocks of
    steps 0..step: out (B, Hq, Nq_local, Dv) and lse (B, Hq, Nq_local) in the accumulation dtype
    (fp32, fp64 for fp64 inputs). Rows that have seen no key yet hold out = 0, lse = -inf. The
    last state of each rank equals `ring_attention`'s result on that rank.
    """
    w = plan.world_size
    if q.shape[2] != w * plan.nq_local or k.shape[2] != w * plan.nk_local or v.shape[2] != k.shape[2]:
        raise ValueError(f"the plan is for {w} ranks x ({plan.nq_local} queries, {plan.nk_local} keys); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: pass the gathered sequence")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    acc_t = accum_dtype(q.dtype)
    states = []
    for rank in range(w):
        q_r = shard(q, plan, rank, plan.nq_local).to(acc_t)
        b, hq, nq, _ = q_r.shape
        out = torch.zeros(b, hq, nq, v.shape[-1], dtype=acc_t)
        lse = torch.full((b, hq, nq), float("-inf"), dtype=acc_t)
        per_step = []
        for step in plan.steps[rank]:
            k_s = shard(k, plan, step.kv_rank, plan.nk_local)  # what the ring delivered at this step
            v_s = shard(v, plan, step.kv_rank, plan.nk_local)
            step_forward(out, lse, q_r, k_s.to(acc_t), v_s.to(acc_t), step, scale)
            per_step.append((out.clone(), lse.clone()))
        states.append(per_step)
    return states
