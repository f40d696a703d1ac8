"""Roofline predictions: time = max(FLOPs / peak, bytes / bandwidth, exps / exp rate) + overhead.

The third roof is the exponential: one per computed score element, on the special-function units
of a GPU (FA3: 3.9 T/s against 989 TFLOP/s of matmul on an H100) or through torch.exp on a CPU.
`fa2_forward` and `decode` apply it to FA2's exact tile schedule and byte count for a profile's
own tile config; `cpu_tiled_forward` is the CPU version, step by step (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2lab.measure.memory import TIMING_MMAP_THRESHOLD
from fa2lab.cost.schedule import tile_schedule
from fa2lab.cost.traffic import fa2_forward_bytes, split_k_decode_bytes
from fa2lab.hardware.profile import HardwareProfile, dtype_bytes
from fa2lab.hardware.tiles import cpu_seconds_per_score


@dataclass(frozen=True)
class Roofline:
    flops: float
    bytes: float
    exps: float
    t_compute: float  # flops / peak FLOP/s
    t_memory: float  # bytes / bandwidth
    t_exp: float  # exps / exp rate (0 where the profile has no exp rate)
    overhead: float  # launch or per-step overheads, added on top

    @property
    def time(self) -> float:
        return max(self.t_compute, self.t_memory, self.t_exp) + self.overhead

    @property
    def bound(self) -> str:
        roofs = {"compute": self.t_compute, "memory": self.t_memory, "exp": self.t_exp}
        return max(roofs, key=roofs.get)

    @property
    def intensity(self) -> float:
        """FLOPs per byte: above profile ridge point (peak / bandwidth) means compute-bound."""
        return self.flops / self.bytes if self.bytes else float("inf")


def roofline(profile: HardwareProfile, flops: float, nbytes: float, dtype="float16", *, exps: float = 0.0,
             overhead: float = 0.0, tensor_cores: bool = True) -> Roofline:
    peak = profile.flops(dtype, tensor_cores)
    if not peak:
        raise ValueError(f"profile {profile.name!r} has no peak FLOP/s for {dtype}; known: "
                         f"{sorted(set(profile.peak_flops) | set(profile.peak_flops_simd))}")
    t_exp = exps / profile.exp_per_s if profile.exp_per_s else 0.0
    return Roofline(flops, nbytes, exps, flops / peak, nbytes / profile.mem_bw, t_exp, overhead)


def fa2_forward(profile: HardwareProfile, b: int, hq: int, nq: int, nk: int, d: int, dtype="float16", *,
                causal: bool = False, window_size=(-1, -1), hkv: int | None = None, block_q: int | None = None,
                block_k: int | None = None, cache_reuse: bool = True) -> Roofline:
    """One FA2 forward kernel launch with the profile's tiles (or the given ones).

    The FA paper counts every K_j/V_j load as off-chip traffic. On a real GPU the query tiles of
    one head run at about the same time and re-read K/V from L2: with `cache_reuse` (default), when
    the K/V of the heads in flight fit the last-level cache, K and V cost one read per head.
    """
    if block_q is None or block_k is None:
        cfg = profile.tile_config(d, dtype, causal, batch_heads=b * hq, seq_len=nq)
        block_q, block_k = cfg.block_m, cfg.block_n
    elem = dtype_bytes(dtype)
    sched = tile_schedule(nq, nk, block_q, block_k, causal, window_size)
    elems = b * hq * sched.computed_elements  # scores computed, masked ones of partial tiles included
    nbytes = fa2_forward_bytes(sched, b, hq, d, elem=elem, hkv=hkv).total
    heads_in_flight = -(-profile.units // sched.q_tiles)  # a head's query tiles run side by side
    if cache_reuse and heads_in_flight * nk * 2 * d * elem <= profile.llc_bytes:
        reread = b * hq * (sched.kv_rows - nk) * 2 * d * elem  # loads after the first come from L2
        nbytes -= max(0, reread)
    return roofline(profile, 4.0 * d * elems, nbytes, dtype, exps=elems, overhead=profile.step_overhead_s)


def decode(profile: HardwareProfile, b: int, hq: int, hkv: int, cache_len: int, d: int, dtype="float16", *,
           splits: int | None = None) -> Roofline:
    """Decode one token per sequence against `cache_len` cached keys, split-K as the profile picks."""
    if splits is None:
        splits = profile.decode_splits(b, hkv, cache_len)
    nbytes = split_k_decode_bytes(b, hq, hkv, cache_len, d, splits=splits, elem=dtype_bytes(dtype)).total
    elems = b * hq * cache_len
    launches = 2 if splits > 1 else 1  # split kernel + merge kernel
    # matmul-vector products: tensor cores do not help a single query row
    return roofline(profile, 4.0 * d * elems, nbytes, dtype, exps=elems,
                    overhead=launches * profile.step_overhead_s, tensor_cores=False)


def cpu_tiled_forward(profile: HardwareProfile, b: int, hq: int, nq: int, nk: int, d: int, *,
                      block_q: int, block_k: int, causal: bool = False, window_size=(-1, -1)) -> Roofline:
    """fa2lab's PyTorch tiled forward on a CPU, summed over its tile steps (all B*Hq heads per step):

        time = computed steps x step_overhead_s                      Python + ~15 op dispatches
             + computed scores x cpu_seconds_per_score(d)            2 matmuls + softmax passes
               (x spill_factor when the per-core working set outgrows L2)
             + accumulator rows x Dv x row_s                         acc *= alpha: Br*Dv per step
             + scores of partial tiles x mask_s                      mask built and applied
             + steps x S bytes x fault_s_per_byte   if S >= 32 MiB   glibc maps it fresh each step

    Returned as a Roofline: t_compute holds the score terms, overhead the per-step terms, t_memory
    FA2's DRAM bytes / bandwidth (it rarely binds: the tiles stay in cache).
    """
    sched = tile_schedule(nq, nk, block_q, block_k, causal, window_size)
    heads = b * hq
    elems = heads * sched.computed_elements
    per_core = -(-heads // profile.units)
    working_set = per_core * 4 * (block_q * block_k + 4 * block_q * d)
    spill = profile.spill_factor if working_set > profile.smem_per_block else 1.0
    partial_elems = heads * sched.partial_elements
    s_bytes = heads * min(block_q, nq) * min(block_k, nk) * 4  # one score tile, float32
    fault = s_bytes * profile.fault_s_per_byte if s_bytes >= TIMING_MMAP_THRESHOLD else 0.0
    rescale = heads * sched.q_rows * d * profile.row_s  # sum of Br_i over computed tiles, x Dv
    t_scores = elems * cpu_seconds_per_score(profile, d) * spill + partial_elems * profile.mask_s + rescale
    nbytes = fa2_forward_bytes(sched, b, hq, d, elem=4).total
    overhead = sched.computed * (profile.step_overhead_s + fault)
    return Roofline(4.0 * d * elems, nbytes, elems, t_scores, nbytes / profile.mem_bw, 0.0, overhead)

