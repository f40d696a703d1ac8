"""Launch configurations of the Hopper kernels, per head dim, and when the Hopper path applies.

The tables are the ones the sm_90 hardware profiles carry (`HardwareProfile.kernel_configs`, with
the measurement that chose each row in `sources["kernel_configs"]`); they live here so that the
kernels need no profile lookup per call. `python -m fa2lab.bench.hopper_sweep` re-measures them.
"""

from __future__ import annotations

import functools
import os

import torch

# Forward: BLOCK_M x BLOCK_N tile, warps, pipeline stages; HOST_DESC: descriptors built on the host
# over (B, H, N, D) instead of per program on the device. Keys: head-dim bound -> (full, causal).
# Chosen by `python -m fa2lab.bench.hopper_sweep` on the H200, 2026-12-02 (bf16, N = 4096, B*N = 32k,
# kernel-level TFLOP/s; experiments/results/hopper-sweep-20261202-043936.json): D=64 128x64 8 warps
# 3 stages 414 (128x128: 333); D=128 128x128 3 stages 472 full / 408 causal (2 stages 439 / 372,
# 128x64 447 / 391, persistent 444 / 340, warp-specialised 437 / 370); D=256 128x64 2 stages 520
# (warp-specialised 532, 128x32 380, 64x64 4 warps 424). Those with per-program device
# descriptors; with HOST_DESC through the public call (`python -m fa2lab bench --hopper`, same day,
# gpu-20261202-045930.json): D=64 415, D=128 499 (portable kernels 486 in the same run), D=256 555.
# Second sweep (`python -m fa2lab.bench.hopper_sweep --parts fwd2`, H200, 2026-12-02 07:42 UTC,
# hopper-sweep-20261202-074333.json): D=128 kept, 501 full / 443 causal; its rivals lazy rescaling
# 500 / 446, warp-specialised 501, 128x64 476, 128x64 2 stages maxnreg=128 499, 64x64 4 warps 480 / 449,
# query-block-major order 374 (causal); SDPA cuDNN 650 / 592 in that run.
FWD = {
    64: (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, HOST_DESC=True),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, HOST_DESC=True)),
    128: (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, HOST_DESC=True),
          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, HOST_DESC=True)),
    256: (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, WARP_SPECIALIZE=True, HOST_DESC=True),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, WARP_SPECIALIZE=True, HOST_DESC=True)),
}
# With an additive bias the bias tile is a third pipelined copy: BLOCK_N = 64 keeps three stages of
# K, V and bias tiles in shared memory at D <= 128 (128 x 128 would need 288 KB for three); D = 256
# halves BLOCK_M instead, without D = 256's warp specialisation (Triton 3.6's warp-specialisation
# pass fails on the 64-row bias tile: H200, 2026-12-02). Not yet measured against the alternatives.
FWD_BIAS = {
    64: dict(BLOCK_N=64, num_stages=3),
    128: dict(BLOCK_N=64, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_N=64, num_stages=2, num_warps=4, WARP_SPECIALIZE=False),
}
# Backward: per kernel (BLOCK_M, BLOCK_N, num_warps, num_stages[, SWAP_AB]); the key-block kernel
# holds BLOCK_N keys and walks queries, the dQ kernel holds BLOCK_M queries and walks keys. Keys
# (kernels/hopper_bwd.py): "dkdv" + "dq" two passes; "dv" + "dk" + "dq" the same with one
# accumulator per kernel; "dkdvq" one pass with dQ added atomically in fp32 ("dv" + "dkq" its split);
# "dq_tma": True adds dQ through a TMA reduce-add instead of per-element atomics.
# Two passes, same sweep (2.5x flops): D=64 (32,128,4,3)/(128,32,4,3) 351 ((64,128,8,2)/(128,64,8,2)
# 290); D=128 (64,128,8,2)/(128,64,8,2) 366 full / 300 causal ((32,128,8,2) 333 / 298, (64,64,8,3)
# 238 / 209); D=256 split dv (64,128,8,2) + dk (32,128,8,2) + dq (64,64,8,2) 237 (one dkdv kernel
# (64,64,8,2), spilling: 214; the old portable tiles: 99).
BWD_TWO_PASS = {
    64: dict(dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3)),
    128: dict(dkdv=(64, 128, 8, 2), dq=(128, 64, 8, 2)),
    256: dict(dv=(64, 128, 8, 2), dk=(32, 128, 8, 2), dq=(64, 64, 8, 2)),
}
# What a call gets: the fastest exact configuration per head dim. The one pass lost everywhere
# (H200, 2026-12-02, `python -m fa2lab.bench.hopper_bwd_gpu --plan sweep`, public call, bwd TFLOP/s,
# N=4096): D=128 full 64x128 w8 289 (TMA reduce-add 304, 3 stages 288, 64x64 w4 183) against two
# passes 364; causal 266 / 280 TMA against 298; D=64 64x64 w4 273 against 351; N=1024 D=128 237
# against 263; D=256 dv + dkq 64x64 does not fit shared memory (263 KB). ptxas: the D=128 one-pass
# kernel sits at 255 registers with 56-82 B of spills (two-pass dK/dV: 2 B), D=64 spills nothing
# and still loses: the fp32 atomics cost more than the two matmuls they save. So two passes stay.
# D=128: dK / dV from the Gluon kernel (kernels/gluon_bwd.py, "gluon_dkdv": BLOCK_M, BLOCK_N, STAGES)
# beside the two-pass dQ, for the plain dense calls it takes (the "dkdv" row runs the rest). H200,
# 2026-12-03, `python -m fa2lab.bench.hopper_bwd_gpu --plan gluon` (hopper-bwd-20261203.jsonl), public
# call, bwd TFLOP/s: N=4096 full 391 (3 stages 395, 32x128 3 stages 362) against two passes 365,
# causal 341 against 300 (portable 307), N=16384 full 413 against 377, GQA 32:8 causal 339 against 307;
# D=64 stays on two passes (Gluon 338-343 against 344). cuDNN in the same run: 511 / 454 / 541 / 452.
# Then (2026-12-04 03:40 UTC, `bash experiments/fused_bwd_gpu.sh`, fused-bwd-tma-20261204/, public call,
# bwd TFLOP/s) the one pass, "gluon_dkdvq": the same kernel adding dQ by one TMA reduce-add per block and
# consumer: N=1024 full 362 against 288, N=4096 full 460 / causal 397 against 397 / 343, N=16384 full 497 /
# causal 459 against 412 / 404, GQA 32:8 causal 378 against 336, GQA 32:4 N=8192 full 446 (3 stages 483)
# against 397; cuDNN 430 / 496 / 469 / 537 / 524 / 447 / 528. Element-wise fp32 atomics instead: 220-310
# (slower than two passes). Calls the one pass does not take (varlen, variants, D <= 64) keep the rows above;
# deterministic mode keeps BWD_TWO_PASS (the reduce-adds land in a run-dependent order).
# The Gluon backwards' keys (kernels/gluon_bwd.py, kernels/gluon_bwd_wide.py): plain dense calls only.
GLUON_BWD_KEYS = ("gluon_dkdv", "gluon_dkdvq", "gluon_wide")
# D in (128, 256]: the wide one pass ("gluon_wide": kernels/gluon_bwd_wide.py, BLOCK_M, BLOCK_N, Q_STAGES,
# DO_STAGES, DQ_CHUNK). H200, 2026-12-04 18:10 UTC (`bash experiments/wide_bwd_gpu.sh`,
# experiments/results/wide-bwd-20261204/, public call, bwd TFLOP/s, the two passes' dv + dk + dq split in
# brackets, cuDNN after): N=4096 full 295 (232) 381, causal 260 (222) 353, N=16384 causal 289 (249) 378,
# N=1024 full 244 (192) 301, GQA 16:2 N=8192 full 305 (242) 358; one dO stage with two of Q beat the reverse
# (254-283) and matched 32-column dQ pieces with two dO stages (247-303). At D <= 64 the one pass
# ("gluon_dkdvq" with 32-column dQ halves, same run, fused64/) against the Triton two passes: N=1024 full
# 258 against 294, N=4096 full 344 / causal 296 against 348 / 292, N=16384 causal 354 against 336, GQA
# 32:8 causal 289 against 276: a wash, so D <= 64 keeps two passes.
# Second run (18:25 UTC, wide-bwd-20261204/keys/): the warpgroups splitting the keys instead of the columns
# (split "keys": dK / dV transposed, no tile-wide handshake): N=4096 full 298 (cols 296), causal 266 / 277
# with one Q stage and two of dO (cols 260), N=16384 causal 302 / 317 (288), N=1024 full 247 (246), GQA
# 16:2 N=8192 full 307 (305); cuDNN 383 / 346 / 381 / 309 / 361. Two dO stages win causal (where the
# blocks per program vary), two Q stages the rest: BWD_CAUSAL below.
BWD = {**BWD_TWO_PASS, 128: dict(BWD_TWO_PASS[128], gluon_dkdv=(64, 128, 2), gluon_dkdvq=(64, 128, 2)),
       256: dict(BWD_TWO_PASS[256], gluon_wide=(64, 64, 2, 1, 64, "keys"))}
# Causal calls (bottom-right, no window): these keys replace BWD's (same measurements).
BWD_CAUSAL = {256: dict(gluon_wide=(64, 64, 1, 2, 64, "keys"))}
# Short MHA calls (seq_len <= SHORT_BWD_UPTO, one query head per K/V head): these keys replace BWD's. The
# persistent one pass (one program per SM over the tiles) against the per-tile one, H200, 2026-12-04 18:50
# UTC (`python -m fa2lab.bench.hopper_bwd_gpu --plan persistent` and experiments/persistent_bwd_2048_gpu.py,
# experiments/results/persistent-bwd-20261204/), public call, bwd TFLOP/s: N=1024 full 384 against 360,
# causal 247 against 236; N=2048 full 442 / 432, causal 330 / 325; but N=2048 GQA 32:8 causal 289 against
# 305, N=4096 full 468-473 against 465, causal 375-383 against 389, N=16384 causal 423 against 460, GQA
# 32:8 / 32:4 at N=4096 / 8192 351 / 465-478 against 370 / 492 (cuDNN 423 / 317 / 505 / 417 / 387 / 509 /
# 456 / 523 / 447 / 533).
BWD_SHORT = {128: dict(gluon_dkdvq=(64, 128, 2, "persistent"))}
SHORT_BWD_UPTO = 2048
# Where the portable backward measured faster in the same run: none since the Gluon dK/dV kernel
# (D=128 causal was portable: 314 against the Hopper kernels' 298 on 2026-12-02, 307 against 341
# for Gluon dK/dV on 2026-12-03).
BWD_PORTABLE: set = set()
# Above 227 KB of shared memory a config does not launch; every row above fits (ptxas, sm_90a).
PERSISTENT_BELOW = 0  # persistent launches measured no faster at N = 1024 (349 against 353)


def _bound(head_dim: int) -> int:
    for bound in (64, 128, 256):
        if head_dim <= bound:
            return bound
    raise ValueError(f"head_dim {head_dim} > 256: the Hopper kernels hold at most 256 columns")


def hopper_fwd_config(head_dim: int, *, causal: bool, seq_len: int, variants=None) -> dict:
    """variants: a kernels.variants.KernelVariants or None; a bias gets FWD_BIAS's tiles."""
    bound = _bound(head_dim)
    cfg = dict(FWD[bound][1 if causal else 0])
    if variants is not None and variants.var.attn_bias is not None:
        cfg.update(FWD_BIAS[bound])
    if variants is not None and variants.var.dropout_p > 0:
        # Interleaving the four Philox outputs of a call (tl.join + reshape) goes through a shared-memory
        # layout conversion: 128 x 128 with three stages then needs 246784 B (H200, 2026-12-02; 232448 fit).
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    if seq_len < PERSISTENT_BELOW:
        cfg.setdefault("PERSISTENT", True)
    if os.environ.get("FA2LAB_HOPPER_HOST_DESC", "1") == "0":  # per-program device descriptors instead
        cfg["HOST_DESC"] = False
    return cfg


def hopper_bwd_config(head_dim: int, *, causal: bool, seq_len: int, deterministic: bool = False,
                      variants=None, group: int = 1) -> dict:
    """The backward's kernels and tiles. deterministic (torch.use_deterministic_algorithms) and
    dropout (whose contract is bit-identical gradients under one generator state) take the two
    passes: fp32 atomics add dQ in a run-dependent order. A bias tile is a third pipelined load:
    two stages at most, to fit shared memory (as the portable kernels). group: query heads per K/V
    head (BWD_SHORT's rows are for group 1)."""
    bound = _bound(head_dim)
    exact_order = deterministic or (variants is not None and variants.var.dropout_p > 0)
    cfg = dict((BWD_TWO_PASS if exact_order else BWD)[bound])
    if causal and not exact_order:
        cfg.update(BWD_CAUSAL.get(bound, {}))
    if seq_len <= SHORT_BWD_UPTO and group == 1 and not exact_order:
        cfg.update(BWD_SHORT.get(bound, {}))
    if variants is not None:  # the Gluon backwards run plain calls only: the row's Triton kernels then
        for key in GLUON_BWD_KEYS:
            cfg.pop(key, None)
    if variants is not None and variants.var.attn_bias is not None:
        cfg = {k: (*t[:3], min(t[3], 2), *t[4:]) if isinstance(t, tuple) else t for k, t in cfg.items()}
    return cfg


def hopper_bwd_wanted(head_dim: int, causal: bool) -> bool:
    return (_bound(head_dim), causal) not in BWD_PORTABLE


def tma_ok(t: torch.Tensor, token_dim: int) -> bool:
    """TMA addresses a (tokens, head dim) slice by a 16-byte-aligned base, a 16-byte-aligned
    non-zero token stride and unit stride in the head dim; batch and head strides become base
    offsets, so they too must keep the base aligned."""
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # a tensor without storage (traced, fake): the portable kernels' rules apply
        return False
    strides, elem = t.stride(), t.element_size()
    if strides[-1] != 1 or strides[token_dim] <= 0 or ptr % 16:
        return False
    for stride in strides[:-1]:
        if (stride * elem) % 16:
            return False
    return True


_SM_MAJOR: dict = {}  # CUDA device index -> compute capability major (asked once per device)


def _sm_major(t: torch.Tensor) -> int:
    index = t.get_device()
    if index not in _SM_MAJOR:
        _SM_MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _SM_MAJOR[index]


# The Gluon forward's tiles: D (power of two) -> tile, ring depth, warps. Shared memory:
# Q + 2 x STAGES x (BLOCK_N x D).
# WS=True: the warp-specialised kernel (num_warps = 4: the default partition is one consumer
# warpgroup; the second consumer and the producer warp are added to it). Chosen on the H200,
# 2026-12-03 (`python -m fa2lab.bench.gluon_gpu --configs`, gluon-20261203-125524.json, kernel
# TFLOP/s, bf16): D=128 WS 128x128 2 stages 551-557 full / 483-492 causal at N=4096, 580-585 causal at
# N=16384 (one partition 128x128 8 warps: 470 / 415 / 484; WS 128x64 3-4 stages 517-527); D=64 WS
# 128x128 2 stages 407-409 (one partition 128x64 3 stages 395; WS 128x64 4 stages 347).
# D=256: BLOCK_N=64 keeps Q (64 KB) and two stages of K and V (128 KB) in shared memory (197 KB, no
# spills): 628-681 full at N=4096, 549-608 causal, 652 causal at N=16384 (128x32 3-4 stages 455-521;
# gluon-20261203-172844.json). The 3-consumer D=64 tile (192x128, FA3's) measured 447 full / 346 causal at
# N=4096, 448 causal at 16384, 143 causal at 1024, against the Triton forward's 418 / 381 / 416 / 285:
# not kept (causal loses at 4096 and below).
# PERSISTENT=True (kernels/gluon_fwd.py: one program per SM walks the tiles, the producer loading
# the next tile's Q and first K / V under this tile's loop). H200, 2026-12-03 19:06 UTC (`bash
# experiments/persistent_gpu.sh`, experiments/results/persistent-20261203/, kernel TFLOP/s): D=128
# 128x128 2 stages N=1024 557 full / 401 causal against the non-persistent kernel's 442 / 295 (cuDNN
# 552 / 435), N=4096 598 / 533 against 564 / 508 (cuDNN 675 / 522), N=16384 causal 586 against 584,
# GQA 32:8 causal 557 against 501 (128x64 3 stages persistent: 384-539, slower everywhere); D=64
# 3 consumers 192x128 2 stages 470 full / 387 causal at N=4096 against the Triton forward's 415 / 379
# (cuDNN 456 / 424; 2 consumers persistent 443 / 387-389); D=256 128x64 causal 572 against 552.
# At N=1024 (second run, 19:15 UTC, same script's `public` part) the 3-consumer tile lost causal: 210
# against 297 for 2 consumers 128x128 2 stages (301 with 3 stages; Triton 284, cuDNN 343), full 400
# against 405: 192-row tiles leave more of each causal diagonal masked and fewer tiles to balance.
# Hence GLUON_FWD_MASKED below for causal and window calls at D=64.
GLUON_FWD = {
    64: dict(BLOCK_M=192, BLOCK_N=128, STAGES=2, num_warps=4, WS=True, CONSUMERS=3, PERSISTENT=True),
    128: dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=4, WS=True, PERSISTENT=True),
    256: dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, num_warps=4, WS=True, PERSISTENT=True),
}
# Causal and sliding-window calls (masked diagonal tiles) at these head-dim bounds take this tile
# instead of GLUON_FWD's (measurements above).
GLUON_FWD_MASKED = {
    64: dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=4, WS=True, PERSISTENT=True),
}
# Head-dim bounds whose Gluon tiles passed tests/test_gluon_gpu.py on an sm_90 GPU (H200, 2026-12-03:
# 38 passed; later with D=200 and 256: 50 passed, gluon-candidates-20261203/tests-fwd.log): the only ones the dispatcher may
# send there, by FWD_GLUON or by FA2LAB_HOPPER_FWD=gluon.
GLUON_TESTED = {64, 128, 256}
# The one-partition kernel (two warpgroups of one program, CTA barriers around each refill): the
# first version, kept to compare against (tests run both).
GLUON_FWD_ONE_PARTITION = {
    64: dict(BLOCK_M=128, BLOCK_N=64, STAGES=3, num_warps=8),
    128: dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=8),
}


# The Gluon forward (kernels/gluon_fwd.py: the next Q K^T overlapped with this tile's softmax) serves
# plain dense calls whose head-dim bound is in this set; FA2LAB_HOPPER_FWD=gluon / triton forces
# one forward for every call it can take (to compare the two in one process). D in (64, 128]: its
# warp-specialised kernel against the Triton one, kernel TFLOP/s, H200, 2026-12-03 (`python -m
# fa2lab.bench.gluon_gpu --configs`, gluon-20261203-125524.json): N=4096 full 551-557 against 512,
# causal 483-492 against 443, N=16384 causal 580-585 against 492, N=1024 causal 294 against 304. D in
# (128, 256] (gluon-20261203-172844.json): N=4096 full 681 against 539 (cuDNN 638), causal 549 against
# 476 (cuDNN 574), N=16384 causal 652 against 531 (cuDNN 618). D <= 64 stays on Triton (407-412
# against 418-429; 3 consumers above). D <= 64 since the persistent kernel (2026-12-03 evening, above):
# 470 full / 387 causal at N=4096 against the Triton forward's 415 / 379.
FWD_GLUON: set = {64, 128, 256}


@functools.cache
def _have_gluon() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ModuleNotFoundError:  # no triton.experimental at all
        return False


def gluon_kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What the Gluon kernels can run (sm_90 and TMA strides checked by hopper_eligible): Triton's Gluon
    present, fp16/bf16, Dv == D, 32 < D <= 256 (its tiles: GLUON_FWD above)."""
    d = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and d == v.shape[-1] and 32 < d <= 256
            and _have_gluon())


def gluon_shapes_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What the dispatcher may send to the Gluon forward: what it can run, at a head-dim bound tested
    on a GPU (GLUON_TESTED)."""
    return gluon_kernel_takes(q, k, v) and _bound(q.shape[-1]) in GLUON_TESTED


def gluon_fwd_wanted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a plain dense Hopper forward goes to the Gluon kernel (the caller checked hopper_eligible)."""
    choice = os.environ.get("FA2LAB_HOPPER_FWD", "auto")
    if choice == "triton" or not gluon_shapes_ok(q, k, v):
        return False
    return choice == "gluon" or _bound(q.shape[-1]) in FWD_GLUON


def hopper_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Hopper kernels run here: an sm_90 device (the capability the h100/h200 profiles
    record), fp16/bf16, head dims 8..256 and strides TMA can address. Otherwise the portable
    kernels run (they handle everything else: fp32, Ampere, the interpreter, odd strides)."""
    from fa2lab.kernels.common import interpreting

    if os.environ.get("FA2LAB_TRITON_PATH", "auto") == "portable":  # compare the two paths in one process
        return False
    if interpreting() or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if _sm_major(q) != 9:
        return False
    if not (8 <= q.shape[-1] <= 256 and 8 <= v.shape[-1] <= 256):
        return False
    token_dim = 0 if q.dim() == 3 else 2  # varlen (total, H, D) or dense (B, H, N, D)
    return all(tma_ok(t, token_dim) for t in (q, k, v))


__all__ = ["BWD", "BWD_CAUSAL", "BWD_PORTABLE", "BWD_SHORT", "SHORT_BWD_UPTO", "BWD_TWO_PASS", "FWD", "GLUON_BWD_KEYS", "FWD_GLUON", "GLUON_FWD", "GLUON_FWD_MASKED", "GLUON_FWD_ONE_PARTITION", "GLUON_TESTED", "gluon_kernel_takes", "gluon_fwd_wanted", "gluon_shapes_ok", "hopper_bwd_config", "hopper_bwd_wanted", "hopper_eligible", "hopper_fwd_config", "tma_ok"]
