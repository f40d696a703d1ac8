"""The ring's transport on torch.distributed: validation across ranks, P2P shifts, re-sharding.

Only point-to-point sends (isend/irecv through `batch_isend_irecv`) and one `all_gather_object`
are used, so any backend with P2P runs it: gloo on CPU, NCCL on GPU. Every wait goes through
`Pending.wait`, which turns a backend failure (a peer that died: "connection reset"; a peer that
stopped calling: the process group's timeout) into a `RingError` that says which rank waited for
which, at which step, and what to do. Nothing here can wait longer than the group's timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# P2P tags: transfers of different kinds may be in flight between the same two ranks at once.
TAG_KV, TAG_DKV, TAG_RESHARD = 0, 8, 16


class RingError(RuntimeError):
    """A rank of the ring failed, died or timed out; raised on the ranks that noticed."""


def check_group(group):
    """The process group to use, or a clear error when there is none."""
    if not dist.is_available():
        raise RuntimeError("ring_attention needs torch.distributed, which this torch build lacks; "
                           "install a torch build with distributed support")
    if not dist.is_initialized():
        raise RuntimeError(
            "ring_attention needs an initialised process group; call "
            "torch.distributed.init_process_group('gloo' or 'nccl', timeout=datetime.timedelta(seconds=60)) "
            "on every rank first (torchrun sets the rendezvous variables), then pass group=None or a subgroup"
        )
    return group if group is not None else dist.group.WORLD


def gather_objects(obj, group, what: str) -> list:
    """all_gather_object with a failure turned into a RingError."""
    world = dist.get_world_size(group)
    out = [None] * world
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as e:
        raise RingError(
            f"ring_attention: rank {dist.get_rank(group)} could not gather {what} from the other "
            f"{world - 1} rank(s): {e}. A rank died, or did not call ring_attention within the "
            f"process group's timeout (init_process_group(timeout=...)); check every rank calls it"
        ) from e
    return out


class Pending:
    """Posted sends/receives; `wait` returns the received tensors."""

    def __init__(self, works, received, describe: str):
        self.works, self.received, self.describe = works, received, describe

    def wait(self) -> list[torch.Tensor]:
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as e:
            raise RingError(
                f"ring_attention: {self.describe} failed: {e}. The peer died or stopped calling "
                f"ring_attention; the wait is bounded by the process group's timeout "
                f"(init_process_group(timeout=...)). Check the peer's log for its own error"
            ) from e
        return self.received


class Ready:
    """Tensors already received: what a Pending becomes once waited for."""

    def __init__(self, received):
        self.received = received

    def wait(self) -> list[torch.Tensor]:
        return self.received


class Ring:
    """This rank's place in the ring: its neighbours as global ranks, for P2P ops."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world

    def global_rank(self, r: int) -> int:
        return r if self.group is dist.group.WORLD else dist.get_global_rank(self.group, r)

    def shift(self, tensors, tag: int, what: str, into=None) -> Pending:
        """Send `tensors` to rank + 1 and receive same-shaped ones from rank - 1, asynchronously,
        into the buffers `into` when given (contiguous, reused across steps: no allocation)."""
        received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors] if into is None \
            else list(into)
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(self.next), self.group, tag + i)
               for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(self.prev), self.group, tag + i)
                for i, t in enumerate(received)]
        describe = (f"rank {self.rank} passing {what} to rank {self.next} "
                    f"(and taking the next one from rank {self.prev})")
        return Pending(self._post(ops, describe), received, describe)

    def _post(self, ops, describe):
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise RingError(f"ring_attention: {describe} could not start: {e}") from e


def reshard(ring: Ring, xs, to_zigzag: bool) -> list[torch.Tensor]:
    """Move tensors (B, H, N_local, ...) between the contiguous and zig-zag layouts.

    With 2W chunks of N_local / 2, contiguous rank r holds chunks 2r, 2r+1 and zig-zag rank r
    holds chunks r, 2W-1-r; each chunk goes from its owner in one layout to its owner in the
    other, point to point (about half of every shard moves).
    """
    w, r = ring.world, ring.rank

    def contiguous_home(c):  # (rank, half) of chunk c
        return c // 2, c % 2

    def zigzag_home(c):
        return (c, 0) if c < w else (2 * w - 1 - c, 1)

    src_home, dst_home = (contiguous_home, zigzag_home) if to_zigzag else (zigzag_home, contiguous_home)
    outs = [torch.empty_like(x) for x in xs]
    ops = []
    for c in range(2 * w):
        (src, src_half), (dst, dst_half) = src_home(c), dst_home(c)
        if r not in (src, dst):
            continue
        for t, (x, out) in enumerate(zip(xs, outs)):
            half = x.shape[2] // 2
            piece_in = x[:, :, src_half * half:(src_half + 1) * half]
            piece_out = out[:, :, dst_half * half:(dst_half + 1) * half]
            tag = TAG_RESHARD + c * len(xs) + t  # one message per (chunk, tensor)
            if src == dst:
                piece_out.copy_(piece_in)
            elif r == src:
                ops.append(dist.P2POp(dist.isend, piece_in.contiguous(), ring.global_rank(dst), ring.group, tag))
            else:
                buf = torch.empty_like(piece_out)
                ops.append(dist.P2POp(dist.irecv, buf, ring.global_rank(src), ring.group, tag))
                ops.append((piece_out, buf))
    p2p = [op for op in ops if isinstance(op, dist.P2POp)]
    if p2p:
        direction = "contiguous -> zigzag" if to_zigzag else "zigzag -> contiguous"
        describe = f"rank {r} re-sharding ({direction}) with its peers"
        Pending(ring._post(p2p, describe), None, describe).wait()
    for op in ops:
        if isinstance(op, tuple):
            op[0].copy_(op[1])
    return outs


class Reshard(torch.autograd.Function):
    """`reshard` as an autograd op: the gradient of a permutation is the inverse permutation."""

    @staticmethod
    def forward(ctx, ring, to_zigzag, *xs):
        ctx.ring, ctx.to_zigzag = ring, to_zigzag
        return tuple(reshard(ring, xs, to_zigzag))

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros_like(g) if g is None else g for g in grads]
        return (None, None, *reshard(ctx.ring, grads, not ctx.to_zigzag))
