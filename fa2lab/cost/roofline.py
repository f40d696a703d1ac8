"""Roofline predictions: time = max(FLOPs / peak, bytes / bandwidth, exps / exp rate) + overhead.

The third roof is the exponential: one per computed score element, on the special-function units
of a GPU (FA3: 3.9 T/s against 989 TFLOP/s of matmul on an H100) or through torch.exp on a CPU.
`cpu_tiled_forward` is fa2lab's tiled PyTorch forward on a CPU, step by step (see its docstring);
fa2lab.cost.predict applies the roofs to FA2's exact tile schedule for a profile's own tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2lab.cost.traffic import fa2_forward_bytes
from fa2lab.hardware.profile import HardwareProfile
from fa2lab.measure.memory import TIMING_MMAP_THRESHOLD
from fa2lab.tiled.schedule import tile_schedule


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


def cpu_seconds_per_score(p: HardwareProfile, d: int) -> float:
    """Seconds per score element of one tile step whose tiles stay in L2: the profile's measured
    `score_s` at d=64, plus 4(d-64) FLOPs at peak for other head dims; else 4d FLOPs + one exp."""
    flops = p.flops("float32", tensor_cores=False)
    if p.score_s is not None:
        return max(p.score_s + 4 * (d - 64) / flops, 4 * d / flops)
    return 4 * d / flops + (1.0 / p.exp_per_s if p.exp_per_s else 0.0)
