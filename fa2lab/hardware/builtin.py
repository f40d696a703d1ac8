"""The built-in profiles: six GPUs the design notes and the FA papers talk about, two CPUs.

Sources, cited by short name in each profile's `sources`:
  CUDA-guide   NVIDIA CUDA C++ Programming Guide, "Compute Capabilities" (shared memory per block /
               per SM, registers, threads per SM) and "Arithmetic Instructions" (special-function
               throughput: 32 results/clock/SM on cc 5.x/6.1/6.2, 16 on cc 7.x-9.0).
  GP104-wp     NVIDIA GeForce GTX 1080 whitepaper (2016) and product page.
  T4-ds        NVIDIA T4 datasheet (2019); Turing (TU102) architecture whitepaper.
  A100-ds      NVIDIA A100 80GB datasheet (SXM4) and Ampere GA100 whitepaper (2020).
  Ada-wp       NVIDIA Ada GPU architecture whitepaper v2.1, appendix table for RTX 4090.
  H100-ds      NVIDIA H100 Tensor Core GPU datasheet (SXM5) and Hopper whitepaper (2022).
  H200-ds      NVIDIA H200 Tensor Core GPU datasheet (SXM, 2024).
  FA3          Shah et al. 2024, FlashAttention-3, section 3: "H100 SXM5 ... 989 TFLOPS of FP16
               matmul but only 3.9 TFLOPS of special functions".
  ARK          Intel ARK, Core i5-10210U (Comet Lake-U, Q3 2019).
  ANCHORS      ../shared/ANCHORS.md, figures measured on the lent H100, 2026-11-22.
Peak FLOP/s are dense (no 2:4 sparsity). Tensor-core fp32 is left out on purpose: TF32 is not
fp32, and PyTorch does not use it for fp32 matmuls by default.
"""

from __future__ import annotations

from fa2lab.hardware.profile import HardwareProfile

KiB, MiB = 1024, 1024 * 1024
# CPU step-model constants not measured on the device itself: scaled from fa2lab.hardware.calibrate on
# the workbench's 2-core Xeon (AVX-512, ~2 GHz), 2026-11-22, by cores x fp32 lanes x clock.
_SCALED = ("estimate, scaled from the workbench CPU (2 cores x 16 lanes x 2.0 GHz, fa2lab bench-tiles "
           "calibration 2026-11-22) by (4 x 8 x 1.6 GHz) = 0.8x")
_GPU_COMMON = dict(max_regs_per_thread=255, vector_width=32, registers_per_unit=65536)
_GPU_COMMON_SOURCES = dict(
    registers_per_unit="CUDA-guide: 64K 32-bit registers per SM for cc 5.0-9.0",
    max_regs_per_thread="CUDA-guide: 255 registers per thread",
    vector_width="CUDA-guide: warp size 32",
)


def _gtx1080() -> HardwareProfile:
    return HardwareProfile(
        name="gtx1080", kind="gpu", arch="Pascal GP104 (GeForce GTX 1080), no tensor cores",
        compute_capability=(6, 1), units=20, clock_hz=1.733e9,
        smem_per_block=48 * KiB, smem_per_unit=96 * KiB, l1_bytes=48 * KiB, llc_bytes=2 * MiB,
        max_threads_per_unit=2048, mem_bw=320e9,
        peak_flops={},  # no tensor cores: every dtype runs on the CUDA cores
        peak_flops_simd={"float32": 8.87e12, "float16": 0.139e12, "float64": 0.277e12},
        exp_per_s=20 * 32 * 1.733e9, step_overhead_s=5e-6,
        sources=dict(_GPU_COMMON_SOURCES,
                     compute_capability="CUDA-guide: GP104 is sm_61", units="GP104-wp: 20 SMs, 2560 CUDA cores",
                     clock_hz="GP104-wp: 1733 MHz boost",
                     smem_per_block="CUDA-guide: 48 KB per block for cc 6.x (no opt-in above it)",
                     smem_per_unit="CUDA-guide: 96 KB per SM for cc 6.1",
                     l1_bytes="GP104-wp: 48 KB L1/texture per SM", llc_bytes="GP104-wp: 2048 KB L2",
                     max_threads_per_unit="CUDA-guide: 2048 for cc 6.1",
                     mem_bw="GP104-wp: 10 Gb/s GDDR5X x 256 bit = 320 GB/s",
                     peak_flops_simd="GP104-wp: 2560 cores x 2 x 1.733 GHz = 8.87 TFLOP/s fp32; fp16 at "
                                     "1/64 and fp64 at 1/32 of it on GP104",
                     exp_per_s="CUDA-guide: 32 exp2/clock/SM on cc 6.1, x 20 SMs x 1.733 GHz",
                     step_overhead_s="estimate: ~5 us per CUDA kernel launch, typical of the CUDA driver"),
        **_GPU_COMMON)


def _t4() -> HardwareProfile:
    return HardwareProfile(
        name="t4", kind="gpu", arch="Turing TU104 (Tesla T4), 1st-gen fp16 tensor cores",
        compute_capability=(7, 5), units=40, clock_hz=1.59e9,
        smem_per_block=64 * KiB, smem_per_unit=64 * KiB, l1_bytes=96 * KiB, llc_bytes=4 * MiB,
        max_threads_per_unit=1024, mem_bw=320e9,
        peak_flops={"float16": 65e12},
        peak_flops_simd={"float32": 8.1e12, "float16": 16.2e12, "float64": 0.25e12},
        exp_per_s=40 * 16 * 1.59e9, step_overhead_s=5e-6,
        sources=dict(_GPU_COMMON_SOURCES,
                     compute_capability="CUDA-guide: TU104 is sm_75", units="T4-ds: 40 SMs, 2560 CUDA cores, "
                     "320 tensor cores", clock_hz="T4-ds: 1590 MHz boost",
                     smem_per_block="CUDA-guide: 64 KB per block (opt-in) for cc 7.5",
                     smem_per_unit="CUDA-guide: 64 KB per SM for cc 7.5",
                     l1_bytes="Turing whitepaper: 96 KB L1 + shared per SM", llc_bytes="Turing whitepaper: "
                     "4 MB L2 on TU104", max_threads_per_unit="CUDA-guide: 1024 for cc 7.5",
                     mem_bw="T4-ds: 320 GB/s GDDR6",
                     peak_flops="T4-ds: 65 TFLOP/s fp16 mixed precision (tensor cores); no bf16",
                     peak_flops_simd="T4-ds: 8.1 TFLOP/s fp32; fp16 on CUDA cores at 2x fp32; fp64 1/32",
                     exp_per_s="CUDA-guide: 16 exp2/clock/SM on cc 7.5, x 40 SMs x 1.59 GHz",
                     step_overhead_s="estimate: ~5 us per CUDA kernel launch"),
        **_GPU_COMMON)


def _a100() -> HardwareProfile:
    return HardwareProfile(
        name="a100", kind="gpu", arch="Ampere GA100 (A100 80GB SXM4), 3rd-gen tensor cores, cp.async",
        compute_capability=(8, 0), units=108, clock_hz=1.41e9,
        smem_per_block=163 * KiB, smem_per_unit=164 * KiB, l1_bytes=192 * KiB, llc_bytes=40 * MiB,
        max_threads_per_unit=2048, mem_bw=2039e9,
        peak_flops={"float16": 312e12, "bfloat16": 312e12, "float64": 19.5e12},
        peak_flops_simd={"float32": 19.5e12, "float16": 78e12, "bfloat16": 39e12, "float64": 9.7e12},
        exp_per_s=108 * 16 * 1.41e9, step_overhead_s=5e-6,
        sources=dict(_GPU_COMMON_SOURCES,
                     compute_capability="CUDA-guide: GA100 is sm_80", units="A100-ds: 108 SMs",
                     clock_hz="A100 whitepaper: 1410 MHz boost",
                     smem_per_block="CUDA-guide: 163 KB per block (opt-in) for cc 8.0",
                     smem_per_unit="CUDA-guide: 164 KB per SM for cc 8.0",
                     l1_bytes="A100 whitepaper: 192 KB L1 + shared per SM", llc_bytes="A100 whitepaper: 40 MB L2",
                     max_threads_per_unit="CUDA-guide: 2048 for cc 8.0",
                     mem_bw="A100-ds: 2,039 GB/s HBM2e (80GB SXM)",
                     peak_flops="A100-ds: 312 TFLOP/s fp16/bf16 tensor, 19.5 fp64 tensor (TF32 156 not used "
                                "for fp32)",
                     peak_flops_simd="A100 whitepaper: fp32 19.5, fp16 78, bf16 39, fp64 9.7 TFLOP/s non-tensor",
                     exp_per_s="CUDA-guide: 16 exp2/clock/SM on cc 8.0, x 108 SMs x 1.41 GHz",
                     step_overhead_s="estimate: ~5 us per CUDA kernel launch"),
        **_GPU_COMMON)


def _rtx4090() -> HardwareProfile:
    return HardwareProfile(
        name="rtx4090", kind="gpu", arch="Ada AD102 (GeForce RTX 4090), 4th-gen tensor cores",
        compute_capability=(8, 9), units=128, clock_hz=2.52e9,
        smem_per_block=99 * KiB, smem_per_unit=100 * KiB, l1_bytes=128 * KiB, llc_bytes=72 * MiB,
        max_threads_per_unit=1536, mem_bw=1008e9,
        peak_flops={"float16": 165.2e12, "bfloat16": 165.2e12},
        peak_flops_simd={"float32": 82.6e12, "float16": 82.6e12, "bfloat16": 82.6e12, "float64": 1.29e12},
        exp_per_s=128 * 16 * 2.52e9, step_overhead_s=5e-6,
        sources=dict(_GPU_COMMON_SOURCES,
                     compute_capability="CUDA-guide: AD102 is sm_89", units="Ada-wp: 128 SMs, 16384 CUDA cores",
                     clock_hz="Ada-wp: 2520 MHz boost",
                     smem_per_block="CUDA-guide: 99 KB per block (opt-in) for cc 8.9",
                     smem_per_unit="CUDA-guide: 100 KB per SM for cc 8.9",
                     l1_bytes="Ada-wp: 128 KB L1 + shared per SM", llc_bytes="Ada-wp: 72 MB L2",
                     max_threads_per_unit="CUDA-guide: 1536 for cc 8.9",
                     mem_bw="Ada-wp: 21 Gb/s GDDR6X x 384 bit = 1008 GB/s",
                     peak_flops="Ada-wp: 165.2 TFLOP/s fp16/bf16 tensor WITH fp32 accumulate (what FA uses; "
                                "330.3 with fp16 accumulate)",
                     peak_flops_simd="Ada-wp: 82.6 TFLOP/s fp32 and fp16/bf16 non-tensor; fp64 1/64",
                     exp_per_s="CUDA-guide: 16 exp2/clock/SM on cc 8.9, x 128 SMs x 2.52 GHz",
                     step_overhead_s="estimate: ~5 us per CUDA kernel launch"),
        **_GPU_COMMON)


def _hopper(name: str, mem_bw: float, bw_source: str, ds: str) -> HardwareProfile:
    from fa2lab.kernels.hopper_config import BWD, BWD_CAUSAL, BWD_SHORT, FWD, FWD_GLUON, GLUON_FWD, SHORT_BWD_UPTO

    return HardwareProfile(
        name=name, kind="gpu", arch=f"Hopper GH100 ({name.upper()} SXM), 4th-gen tensor cores, TMA, wgmma",
        compute_capability=(9, 0), units=132, clock_hz=1.83e9,
        smem_per_block=227 * KiB, smem_per_unit=228 * KiB, l1_bytes=256 * KiB, llc_bytes=50 * MiB,
        max_threads_per_unit=2048, mem_bw=mem_bw,
        peak_flops={"float16": 989.4e12, "bfloat16": 989.4e12, "float64": 66.9e12},
        peak_flops_simd={"float32": 66.9e12, "float16": 133.8e12, "bfloat16": 133.8e12, "float64": 33.5e12},
        exp_per_s=3.9e12, step_overhead_s=5e-6,
        kernel_configs=dict(fwd={d: dict(full=f, causal=c) for d, (f, c) in FWD.items()}, bwd=dict(BWD),
                            bwd_causal=dict(BWD_CAUSAL), bwd_short=dict(BWD_SHORT, upto=SHORT_BWD_UPTO),
                            fwd_gluon={d: dict(GLUON_FWD[d]) for d in sorted(FWD_GLUON)}),
        sources=dict(_GPU_COMMON_SOURCES,
                     kernel_configs="measured on the lent H200, 2026-12-02, python -m fa2lab.bench.hopper_sweep "
                                    "(bf16, N=4096, B*N=32k, H*D=2048; experiments/results/hopper-sweep-*.json): "
                                    "forward D=64 414, D=128 472 full / 408 causal, D=256 532 TFLOP/s; backward "
                                    "D=64 351, D=128 366 / 300, D=256 237 (old tiles 99); every row exact by the "
                                    "2x / 3x rule. fa2lab/kernels/hopper_config.py lists the rivals of each row. Forward D=128 "
                                    "re-swept 2026-12-02 07:42 UTC (hopper-sweep-20261202-074333.json): kept at "
                                    "501 full / 443 causal, no rival faster beyond 1.4%. fwd_gluon (plain dense "
                                    "calls, D in (64, 256]: the Gluon warp-specialised forward): H200, 2026-12-03, "
                                    "python -m fa2lab.bench.gluon_gpu --configs (gluon-20261203-125524.json): "
                                    "557 full / 492 causal at N=4096, 585 causal at N=16384 against the Triton "
                                    "forward's 512 / 443 / 492 in the same run; D in (128, 256]: 681 full / 549 "
                                    "causal at N=4096, 652 causal at N=16384 against 539 / 476 / 531 "
                                    "(gluon-20261203-172844.json). Since 2026-12-03 19:06 UTC the persistent kernel for D=64 (3 "
                                    "consumers), 128 and 256 (bash experiments/persistent_gpu.sh, "
                                    "persistent-20261203/): D=128 N=1024 557 full / 401 causal against 442 / 295 "
                                    "non-persistent (cuDNN 552 / 435), N=4096 598 / 533 against 564 / 508; D=64 "
                                    "470 / 387 against the Triton forward's 415 / 379; D=256 causal 572 against 552. "
                                    "bwd D=128 gluon_dkdv (Gluon dK/dV + two-pass "
                                    "dQ, python -m fa2lab.bench.hopper_bwd_gpu --plan gluon, 2026-12-03): 391 "
                                    "full / 341 causal at N=4096, 413 full at N=16384 against two passes' "
                                    "365 / 300 / 377. Since 2026-12-04 bwd D=128 gluon_dkdvq (the one pass: "
                                    "dQ by TMA reduce-adds in the same kernel, bash experiments/fused_bwd_gpu.sh, "
                                    "fused-bwd-tma-20261204/): 460 full / 397 causal at N=4096, 497 / 459 at "
                                    "N=16384, 362 full at N=1024 against 397 / 343 / 412 / 404 / 288 (cuDNN "
                                    "496 / 469 / 537 / 524 / 430). Since 2026-12-04 18:25 UTC bwd D in (128, 256] "
                                    "gluon_wide (the wide one pass, kernels/gluon_bwd_wide.py: bash "
                                    "experiments/wide_bwd_gpu.sh, wide-bwd-20261204/keys/): 298 full / 277 causal "
                                    "(bwd_causal: two dO stages) at N=4096, 317 causal at N=16384, 247 full at "
                                    "N=1024 against the two passes' 236 / 223 / 250 / 194 (cuDNN 383 / 346 / 381 / 309). "
                                    "bwd_short (MHA calls up to `upto` tokens at D=128: the persistent one pass, "
                                    "persistent-bwd-20261204/): N=1024 384 full / 247 causal, N=2048 442 / 330 "
                                    "against the per-tile one pass's 360 / 236 / 432 / 325 (cuDNN 423 / 317 / 505 / 417)",
                     compute_capability="CUDA-guide: GH100 is sm_90", units=f"{ds}: 132 SMs (SXM5)",
                     clock_hz="implied by the datasheet peaks: 989.4 TFLOP/s / (132 SMs x 4096 FLOP/clock) "
                              "= 1.83 GHz (max boost 1.98 GHz)",
                     smem_per_block="CUDA-guide: 227 KB per block (opt-in) for cc 9.0",
                     smem_per_unit="CUDA-guide: 228 KB per SM for cc 9.0",
                     l1_bytes="Hopper whitepaper: 256 KB L1 + shared per SM", llc_bytes="Hopper whitepaper: 50 MB L2",
                     max_threads_per_unit="CUDA-guide: 2048 for cc 9.0",
                     mem_bw=bw_source,
                     peak_flops=f"{ds}: 989.4 TFLOP/s fp16/bf16 tensor dense (1979 with sparsity), 66.9 fp64 "
                                "tensor; ANCHORS measured 687 TFLOP/s bf16 at 8192^3 (2026-11-22, H100)",
                     peak_flops_simd="Hopper whitepaper: fp32 66.9, fp16/bf16 133.8, fp64 33.5 TFLOP/s non-tensor",
                     exp_per_s="FA3: 3.9 TFLOP/s of special functions on H100 SXM5 (16/clock/SM x 132 x 1.83 GHz)",
                     step_overhead_s="estimate: ~5 us per CUDA kernel launch"),
        **_GPU_COMMON)


def _h100() -> HardwareProfile:
    return _hopper("h100", 3.35e12, "H100-ds: 3.35 TB/s HBM3 (SXM5 80GB); ANCHORS measured 3.0 TB/s "
                   "device-to-device copy, read + write (2026-11-22)", "H100-ds")


def _h200() -> HardwareProfile:
    return _hopper("h200", 4.8e12, "H200-ds: 4.8 TB/s HBM3e, 141 GB", "H200-ds")


def _i5_10210u() -> HardwareProfile:
    return HardwareProfile(
        name="i5-10210u", kind="cpu", arch="Intel Comet Lake-U (Skylake cores), 4C/8T, AVX2 + FMA, no AVX-512",
        compute_capability=None, units=4, clock_hz=1.6e9,
        smem_per_block=256 * KiB, smem_per_unit=256 * KiB, l1_bytes=32 * KiB, llc_bytes=6 * MiB,
        registers_per_unit=16 * 8, max_regs_per_thread=0, max_threads_per_unit=2, vector_width=8,
        mem_bw=45.8e9,
        peak_flops={},  # no matrix units
        peak_flops_simd={"float32": 4 * 2 * 8 * 2 * 1.6e9, "float64": 4 * 2 * 4 * 2 * 1.6e9},
        exp_per_s=3.5e9, step_overhead_s=150e-6, score_s=3.0e-9, row_s=2.0e-9, mask_s=5.5e-9, spill_factor=1.3,
        fault_s_per_byte=0.15e-9,
        sources=dict(units="ARK: 4 cores, 8 threads", clock_hz="ARK: 1.6 GHz base (guaranteed at 15 W; "
                     "turbo to 4.2 GHz is short-lived under an all-core AVX2 load)",
                     smem_per_block="ARK / Skylake core: 256 KB L2 per core", smem_per_unit="as smem_per_block",
                     l1_bytes="Skylake core: 32 KB L1d", llc_bytes="ARK: 6 MB Intel Smart Cache",
                     registers_per_unit="AVX2: 16 ymm registers x 8 fp32 lanes",
                     max_threads_per_unit="ARK: 2 hyper-threads per core", vector_width="AVX2: 8 fp32 lanes",
                     max_regs_per_thread="not applicable on a CPU (0)",
                     mem_bw="ARK: 45.8 GB/s max memory bandwidth",
                     peak_flops_simd="4 cores x 2 FMA ports x 8 lanes x 2 FLOP x 1.6 GHz = 205 GFLOP/s fp32; "
                                     "half that fp64; fp16/bf16 not native (PyTorch converts)",
                     exp_per_s=f"{_SCALED}: ~4.4 G exp/s there x 0.8",
                     score_s=f"{_SCALED}: 2.4 ns there / 0.8, rounded",
                     row_s=f"{_SCALED}: 1.6 ns there / 0.8",
                     mask_s=f"{_SCALED}: 4.5 ns there / 0.8",
                     step_overhead_s="estimate: ~2x the 70-110 us fitted on the workbench CPU (slower "
                                     "single-thread Python at a 1.6 GHz base clock)",
                     spill_factor="assumption: its 6 MB L3 is shared by 4 cores, so softmax passes that "
                                  "outgrow L2 slow down (the workbench CPU, 105 MB L3, measured ~1.0)",
                     fault_s_per_byte="assumption: ~0.6 us per 4 KiB page fault on bare metal (the "
                                      "workbench VM measured 0.34 ns/B)"))


def _cpu_generic() -> HardwareProfile:
    return HardwareProfile(
        name="cpu-generic", kind="cpu", arch="a typical x86-64 laptop/desktop core of 2018-2023: AVX2 + FMA",
        compute_capability=None, units=4, clock_hz=2.5e9,
        smem_per_block=512 * KiB, smem_per_unit=512 * KiB, l1_bytes=32 * KiB, llc_bytes=8 * MiB,
        registers_per_unit=16 * 8, max_regs_per_thread=0, max_threads_per_unit=2, vector_width=8,
        mem_bw=25.6e9,
        peak_flops={},
        peak_flops_simd={"float32": 4 * 2 * 8 * 2 * 2.5e9, "float64": 4 * 2 * 4 * 2 * 2.5e9},
        exp_per_s=3e9, step_overhead_s=100e-6, score_s=2.5e-9, row_s=1.6e-9, mask_s=4.5e-9, spill_factor=1.3,
        fault_s_per_byte=0.15e-9,
        sources={f: "assumption: a conservative mid-range x86 machine; use detect() or a YAML profile for a real "
                    "one" for f in ("units", "clock_hz", "smem_per_block", "smem_per_unit", "l1_bytes",
                                    "llc_bytes", "mem_bw", "exp_per_s", "step_overhead_s", "score_s",
                                    "row_s", "mask_s", "spill_factor", "fault_s_per_byte")}
        | dict(registers_per_unit="AVX2: 16 ymm registers x 8 fp32 lanes", vector_width="AVX2: 8 fp32 lanes",
               max_threads_per_unit="assumption: 2 hyper-threads per core",
               max_regs_per_thread="not applicable on a CPU (0)",
               mem_bw="assumption: one channel of DDR4-3200 = 25.6 GB/s",
               peak_flops_simd="cores x 2 FMA ports x 8 lanes x 2 FLOP x clock"))


BUILTIN = {p.name: p for p in (_gtx1080(), _t4(), _a100(), _rtx4090(), _h100(), _h200(), _i5_10210u(),
                               _cpu_generic())}
