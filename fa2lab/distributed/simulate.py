"""Ring attention in one process, for notebooks and tests: every rank's state after every step.

`simulate_ring` runs the same per-step code as `ring_attention` (`ring.step_forward`), but the
ranks are a loop and the K/V "sent" around the ring is sliced from the gathered sequence, so the
LSE merge can be watched step by step without a process group.

`simulate_ring_grads` runs the ring's own forward and backward (`ring.ring_forward`,
`ring.ring_backward`) for every rank, each rank a thread of this process and the ring's hops
copies between them. Transport moves bytes exactly, so its out, lse and gradients are those of a
real ring of W devices of this kind, bit for bit: how the error of W = 8 is checked on one GPU.
"""

from __future__ import annotations

import queue
import threading

import torch

from fa2lab.distributed.plan import RingPlan
from fa2lab.distributed.ring import ring_backward, ring_forward, step_forward
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


class _Received:
    def __init__(self, boxes, tags, into, timeout):
        self.boxes, self.tags, self.into, self.timeout = boxes, tags, into, timeout

    def wait(self):
        got = [self.boxes[t].get(timeout=self.timeout) for t in self.tags]
        if self.into is None:
            return got
        return [buf.copy_(t) for buf, t in zip(self.into, got)]


class LocalRing:
    """The ring's transport between threads of one process: `shift` puts copies of the tensors in
    the next rank's mailbox; `wait` takes the previous rank's. Same interface as comm.Ring."""

    def __init__(self, rank: int, world: int, boxes: dict, timeout: float = 120.0):
        self.rank, self.world, self.boxes, self.timeout = rank, world, boxes, timeout
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world

    def shift(self, tensors, tag, what, into=None):
        for i, t in enumerate(tensors):
            self.boxes[(self.next, tag + i)].put(t.clone())
        return _Received({i: self.boxes[(self.rank, tag + i)] for i in range(len(tensors))}, range(len(tensors)),
                         into, self.timeout)


def simulate_ring_grads(q, k, v, do, plan: RingPlan, softmax_scale: float | None = None,
                        travel_dtype: torch.dtype | None = None, overlap: bool = True):
    """The ring's forward and backward for every rank of `plan`, in one process (threads).

    q (B, Hq, W*Nq_local, D), k/v (B, Hkv, W*Nk_local, D / Dv), do (B, Hq, W*Nq_local, Dv): the
    gathered sequence and the output's gradient. Returns (out, lse, dq, dk, dv) gathered back
    into sequence order, in the dtypes ring_attention gives. `travel_dtype`: the dtype dK/dV
    travel in (default `ring.grad_dtype`).
    """
    w = plan.world_size
    if q.shape[2] != w * plan.nq_local or k.shape[2] != w * plan.nk_local or do.shape[:3] != q.shape[:3]:
        raise ValueError(f"the plan is for {w} ranks x ({plan.nq_local} queries, {plan.nk_local} keys); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, do {tuple(do.shape)}: pass the gathered sequence")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    boxes = {(r, t): queue.Queue() for r in range(w) for t in range(32)}
    results, errors = [None] * w, []

    def rank_main(r):
        try:
            ring = LocalRing(r, w, boxes)
            q_r, do_r = shard(q, plan, r, plan.nq_local), shard(do, plan, r, plan.nq_local)
            k_r, v_r = shard(k, plan, r, plan.nk_local), shard(v, plan, r, plan.nk_local)
            out, lse = ring_forward(q_r, k_r, v_r, plan, ring, scale, overlap)
            grads = ring_backward(do_r, None, q_r, k_r, v_r, out, lse, plan, ring, scale, overlap, travel_dtype)
            results[r] = (out, lse, *grads)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(w)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    n_local = [plan.nq_local, plan.nq_local, plan.nq_local, plan.nk_local, plan.nk_local]
    return tuple(gather([res[i] if i != 1 else res[i].unsqueeze(-1) for res in results], plan, n_local[i])
                 .squeeze(-1) if i == 1 else gather([res[i] for res in results], plan, n_local[i])
                 for i in range(5))


class LoopbackRing:
    """One rank of a W-rank ring alone on this device: every hop "receives" a copy of what this
    rank sends, into the ring's own receive buffers. The rank runs its plan's launches and
    allocates every buffer of a real rank, so its peak memory and compute time are those of a
    rank of W devices (without the network); its numbers are not attention (the K/V it holds
    is its own at every step). For measuring one rank on one GPU: `bench.ring --loopback`."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world

    def shift(self, tensors, tag, what, into=None):
        from fa2lab.distributed.comm import Ready

        if into is None:
            return Ready([t.clone(memory_format=torch.contiguous_format) for t in tensors])
        return Ready([buf.copy_(t) for buf, t in zip(into, tensors)])
