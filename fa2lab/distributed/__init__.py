"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

    ring_attention(q, k, v, *, causal, window_size, softmax_scale, group, return_lse)
        exact attention of this rank's query shard against the whole sequence; K/V shards travel
        around the ring (torch.distributed P2P), partial results merge by their log-sum-exp
    plan_ring(world_size, nq_local, nk_local, *, causal, window_size, layout)
        the ring schedule without a process group: which K/V shard each rank holds at each step,
        which blocks it computes or skips, and the work balance (`RingPlan.schedule/balance`)
    ulysses_attention(q, k, v, *, causal, window_size, softmax_scale, group, return_lse, layout)
        the same by head parallelism (DeepSpeed-Ulysses): two all-to-alls, one attention call
    plan_ulysses(world_size, nq_local, nk_local, *, heads_q, heads_kv)
        its head split and communication volume (`UlyssesPlan.comm_volume`)
    simulate_ring(q, k, v, plan)
        the ring in one process: every rank's merged (out, lse) after every step (notebooks)

Files: plan.py (layouts, block cropping, schedule), comm.py (P2P transport, re-sharding, errors),
ring.py (the forward/backward ring and the public function), simulate.py (one-process ring),
ulysses.py (head-parallel all-to-all attention).
"""

from fa2lab.distributed.comm import RingError
from fa2lab.distributed.plan import RingPlan, plan_ring, zigzag_shard
from fa2lab.distributed.ring import ring_attention
from fa2lab.distributed.simulate import gather, shard, simulate_ring, simulate_ring_grads
from fa2lab.distributed.ulysses import UlyssesPlan, plan_ulysses, ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "plan_ring", "plan_ulysses", "UlyssesPlan", "RingPlan", "RingError", "simulate_ring", "simulate_ring_grads", "shard",
           "gather", "zigzag_shard"]
