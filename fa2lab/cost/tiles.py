"""Tile sizes from first principles (an optimisation over the cost model, so it lives in fa2lab.cost;
fa2lab.hardware holds the facts it starts from): the on-chip budget, then registers and occupancy (GPU), or the
cache and the per-step overhead of eager PyTorch (CPU). Every step of the arithmetic is kept in
`TileConfig.derivation`, so a reader can check it with a pencil.

Starting point, FlashAttention (Dao et al. 2022), Algorithm 1 line 1: with an on-chip memory of M
elements, Bc = ceil(M / 4d) and Br = min(Bc, d), so that Q_i, K_j, V_j and O_i share M.

GPU (FA2, Dao 2023, section 3.3): O_i and the score tile S live in registers, shared memory holds
Q_i and the pipelined K_j/V_j tiles, and "typically we choose blocks of size {64, 128} x {64, 128},
depending on the head dimension d and the device shared memory size": the candidates below are
those (and smaller ones, for small devices), kept when shared memory, registers per thread (no
spills) and the register file (at least one block per SM) allow, the largest Br x Bc winning.

CPU (fa2lab's tiled PyTorch): there is no programmer-managed SRAM, and the paper's Br = min(Bc, d)
gives Br = 64 on a CPU (which is what the design notes' "tile 64 for an i5-10210U" amounts to):
in eager PyTorch such tiles are overhead-bound, since every tile step pays a fixed cost (the
Python loop and ~15 torch op dispatches, `step_overhead_s`). What must stay on chip is the score
tile that the softmax passes stream through, for the heads a core holds in one step, plus Q_i,
K_j, V_j and the accumulator. Candidates are the square power-of-two tiles whose working set fits
on chip (L2, or at most the core's share of L3); the one with the smallest predicted time wins,
from the profile's step overhead, cost per score element, and the slowdown once the working set
outgrows L2 (`spill_factor`), summed over the causal/window tile schedule.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from fa2lab.backends import AUTO_ORDER
from fa2lab.cost.roofline import cpu_seconds_per_score, cpu_tiled_forward
from fa2lab.decode.splits import num_splits
from fa2lab.hardware.profile import HardwareProfile, dtype_bytes, dtype_name

REG_BASE = 32  # registers per thread besides O_i and S: addresses, m_i, l_i, loop state (estimate)
GPU_TILE_EDGES = (128, 64, 32, 16)  # FA2's {64, 128}, extended down for small shared memories
CPU_TILE_EDGES = (16, 32, 64, 128, 256, 512, 1024, 2048)
CPU_DEFAULT_N = 4096  # sequence length a CPU config is optimised for when none is given


@dataclass(frozen=True)
class TileConfig:
    """Tiles for one (profile, head dim, dtype); `derivation` shows how they were chosen."""

    block_q: int  # Br (BLOCK_M in a kernel): query rows per tile
    block_k: int  # Bc (BLOCK_N in a kernel): key rows per tile
    num_warps: int | None  # GPU: warps per block (32 threads each); None on a CPU
    num_stages: int | None  # GPU: K/V tiles in flight (software pipelining); None on a CPU
    onchip_bytes: int  # shared memory per block (GPU) or working set per core (CPU)
    regs_per_thread: int | None  # GPU estimate: (Br*(d + Bc)) / threads + REG_BASE
    blocks_per_unit: int | None  # GPU occupancy: resident blocks per SM
    heads_per_step: int | None  # CPU: batch*heads that go through one tile step together
    derivation: tuple[str, ...]

    def describe(self) -> str:
        return "\n".join(self.derivation)

    @property
    def block_m(self) -> int:
        """Deprecated name of block_q (one tile naming in Python: block_q / block_k)."""
        warnings.warn("TileConfig.block_m is now block_q", DeprecationWarning, stacklevel=2)
        return self.block_q

    @property
    def block_n(self) -> int:
        """Deprecated name of block_k."""
        warnings.warn("TileConfig.block_n is now block_k", DeprecationWarning, stacklevel=2)
        return self.block_k


def tile_config(profile: HardwareProfile, head_dim: int, dtype="float16", causal: bool = False, *,
                batch_heads: int | None = None, seq_len: int | None = None) -> TileConfig:
    """Tiles for `profile`. `batch_heads` (B*Hq per step) and `seq_len` matter on a CPU only;
    without them a CPU config assumes one head per core and N = CPU_DEFAULT_N."""
    _check_positive(head_dim=head_dim)
    if batch_heads is not None:
        _check_positive(batch_heads=batch_heads)
    if seq_len is not None:
        _check_positive(seq_len=seq_len)
    if profile.is_gpu:
        return _gpu_tiles(profile, head_dim, dtype, causal)
    return _cpu_tiles(profile, head_dim, dtype, causal, batch_heads, seq_len)


def paper_start(m_bytes: int, elem: int, d: int) -> tuple[int, int, str]:
    """FA Algorithm 1, line 1: (Bc, Br) from an on-chip memory of m_bytes."""
    m = m_bytes // elem
    bc = math.ceil(m / (4 * d))
    br = min(bc, d)
    return bc, br, (f"FA paper, Algorithm 1 line 1: M = {m_bytes} B / {elem} B = {m} elements; "
                    f"Bc = ceil(M / 4d) = ceil({m} / {4 * d}) = {bc}; Br = min(Bc, d) = {br}")


def _gpu_tiles(p: HardwareProfile, d: int, dtype, causal: bool) -> TileConfig:
    elem = dtype_bytes(dtype)
    bc0, br0, line = paper_start(p.smem_per_block, elem, d)
    lines = [line,
             "FA2: O_i and S sit in registers; shared memory holds Q_i + stages x (K_j + V_j) = "
             f"{elem} B x (Br*d + stages*2*Bc*d); registers/thread ~ Br*(d + Bc)/threads + {REG_BASE}"]
    async_copy = p.compute_capability is not None and p.compute_capability >= (8, 0)
    stage_options = (3, 2) if async_copy else (1,)
    lines.append(f"stages: {'2-3 (cp.async, sm_80+)' if async_copy else '1 (no cp.async before sm_80)'}")
    hopper = p.compute_capability is not None and p.compute_capability >= (9, 0)

    def rank(br, bc, warps, stages):
        # Largest tile first. On sm_90+ Triton issues wgmma, whose M is 64 rows per warpgroup of
        # 4 warps: Br=128 wants 8 warps. There a key tile wider than the head dim does not pay:
        # measured on the H200 (2026-11-30, python -m fa2lab.bench.tiles_gpu), D=64 128x64 beats
        # 128x128 by 8-15% at every N while D=128 is best at 128x128. Before sm_90, FA2's own
        # kernels (e.g. A100, d=64: 128 x 128, 4 warps) are the reference: fewest warps.
        if hopper:
            return (br * min(bc, d), -bc, br, warps, stages)
        return (br * bc, 0, br, -warps, stages)

    if hopper:
        lines.append("sm_90+: Br/16 warps (wgmma: 64 rows per 4-warp group); Bc <= d preferred (measured, H200)")
    best, rejected = None, []
    for br in GPU_TILE_EDGES:
        for bc in GPU_TILE_EDGES:
            for warps in _warp_options(br):
                threads = 32 * warps
                regs = math.ceil(br * (d + bc) / threads) + REG_BASE
                for stages in stage_options:
                    smem = elem * (br * d + stages * 2 * bc * d)
                    why = _gpu_reject(p, smem, regs, threads)
                    if why:
                        rejected.append((br, bc, warps, stages, why))
                        continue
                    key = rank(br, bc, warps, stages)
                    if best is None or key > best[0]:
                        best = (key, br, bc, warps, stages, smem, regs)
    if best is None:
        raise ValueError(f"no FA2 tile of {p.name} fits head_dim={d} in {dtype_name(dtype)}: even 16x16 needs more "
                         f"than {p.smem_per_block} B of shared memory or {p.max_regs_per_thread} registers/thread; "
                         "use a smaller head dim or a 2-byte dtype")
    _, br, bc, warps, stages, smem, regs = best
    threads = 32 * warps
    occupancy = min(p.smem_per_unit // smem, p.registers_per_unit // (regs * threads),
                    p.max_threads_per_unit // threads)
    better = sorted((r for r in rejected if rank(*r[:4]) > best[0]), key=lambda r: rank(*r[:4]), reverse=True)
    for r in better[:2]:  # the closest candidates that the limits ruled out
        lines.append(f"rejected {r[0]} x {r[1]}, {r[2]} warps, {r[3]} stages: {r[4]}")
    lines += [f"chosen Br x Bc = {br} x {bc}, {warps} warps, {stages} stages: shared memory "
              f"{elem} x ({br}*{d} + {stages}*2*{bc}*{d}) = {smem} B <= {p.smem_per_block} B",
              f"registers/thread = ceil({br}*({d}+{bc})/{threads}) + {REG_BASE} = {regs} <= "
              f"{p.max_regs_per_thread}; occupancy = min({p.smem_per_unit}//{smem}, "
              f"{p.registers_per_unit}//({regs}*{threads}), {p.max_threads_per_unit}//{threads}) = {occupancy} "
              "block(s)/SM"]
    if causal:
        lines.append(f"causal: same tiles; computing the diagonal tiles whole adds about Bc/N to the work "
                     f"({bc / 4096:.1%} at N=4096)")
    return TileConfig(br, bc, warps, stages, smem, regs, occupancy, None, tuple(lines))


def _warp_options(br: int) -> tuple[int, ...]:
    # Each warp owns >= 16 query rows (one m16 MMA fragment); FA2 runs 4 warps, 8 for big tiles.
    return (4, 8) if br >= 128 else (max(1, min(4, br // 16)),)


def _gpu_reject(p: HardwareProfile, smem: int, regs: int, threads: int) -> str:
    if smem > p.smem_per_block:
        return f"shared memory {smem} B > {p.smem_per_block} B per block"
    if regs > p.max_regs_per_thread:
        return f"{regs} registers/thread > {p.max_regs_per_thread} (would spill)"
    if regs * threads > p.registers_per_unit:
        return f"{regs} x {threads} threads > {p.registers_per_unit} registers per SM"
    return ""


def _cpu_tiles(p: HardwareProfile, d: int, dtype, causal: bool, batch_heads, seq_len) -> TileConfig:
    elem = 8 if dtype_name(dtype) == "float64" else 4  # fa2lab's tiled code accumulates in fp32
    _, _, line = paper_start(p.smem_per_block, elem, d)
    heads = batch_heads or p.units
    per_core = math.ceil(heads / p.units)
    n = seq_len or CPU_DEFAULT_N
    llc_share = p.llc_bytes // p.units
    lines = [line,
             "CPU: no programmer-managed SRAM, and Br = d makes eager PyTorch overhead-bound; instead, square "
             f"tiles T, {heads} heads (B*Hq per step) over {p.units} cores = {per_core} per core, "
             f"{'float64' if elem == 8 else 'float32'} tiles",
             f"working set per core = {per_core} x {elem} B x (T^2 + 4*T*d): S, then Q_i, K_j, V_j, acc"]

    def working_set(t):
        return per_core * elem * (t * t + 4 * t * d)

    in_l2 = [t for t in CPU_TILE_EDGES if working_set(t) <= p.smem_per_block]
    on_chip = [t for t in CPU_TILE_EDGES if working_set(t) <= max(llc_share, p.smem_per_block)]
    lines.append(f"  fits L2 ({p.smem_per_block} B) up to T = {max(in_l2) if in_l2 else '-'}; fits the core's "
                 f"share of the last-level cache ({llc_share} B) up to T = {max(on_chip) if on_chip else '-'}")
    lines.append(f"predicted time at N = {n}{'' if seq_len else ' (no seq_len given)'}{', causal' if causal else ''}"
                 f" (fa2lab.cost.roofline.cpu_tiled_forward): steps x {p.step_overhead_s * 1e6:.0f} us + "
                 f"scores x {cpu_seconds_per_score(p, d) * 1e9:.2f} ns (x {p.spill_factor:.2f} beyond L2) + "
                 f"Br x d per step x {p.row_s * 1e9:.2f} ns + "
                 f"partial-tile scores x {p.mask_s * 1e9:.2f} ns + fresh-page faults of score tiles >= 32 MiB")
    best = None
    for t in on_chip or CPU_TILE_EDGES[:1]:
        if t > max(CPU_TILE_EDGES[0], 1 << (n - 1).bit_length()):
            break  # a tile larger than the sequence only adds masked work
        r = cpu_tiled_forward(p, 1, heads, n, n, d, block_q=t, block_k=t, causal=causal)
        spills = working_set(t) > p.smem_per_block and p.spill_factor > 1
        lines.append(f"  T={t:<5} {r.time * 1e3:9.2f} ms (per-step overhead {r.overhead / r.time:.0%}"
                     f"{', spills L2' if spills else ''})")
        if best is None or r.time < best[1]:
            best = (t, r.time)
    t = best[0]
    lines.append(f"chosen Br x Bc = {t} x {t} (fastest predicted); working set per core {working_set(t)} B")
    return TileConfig(t, t, None, None, working_set(t), None, None, heads, tuple(lines))


def decode_splits(profile: HardwareProfile, batch: int, heads: int, cache_len: int, *,
                  backend: str | None = None) -> int:
    """The split-K count decode runs for one token against `cache_len` cached keys (Flash-Decoding):
    fa2lab.decode.splits.num_splits, for the backend decode would choose on this profile's device
    (the Triton kernel on a GPU, the PyTorch split-K on a CPU) unless `backend` is given.

    `heads` counts the work items of one sequence: KV heads when the query heads of a GQA group are
    packed into one tile (as fa2lab does), query heads otherwise.
    """
    _check_positive(batch=batch, heads=heads, cache_len=cache_len)
    if backend is None:
        backend = AUTO_ORDER["decode"]["cuda" if profile.is_gpu else "cpu"][0]
    return num_splits(backend, batch * heads, cache_len, profile.units)


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"expected {name} to be a positive int, got {v!r}")
