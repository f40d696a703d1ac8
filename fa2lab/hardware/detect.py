"""`detect()`: a profile of the machine this runs on, from what the OS and CUDA report.

GPU: torch.cuda device properties (SMs, shared memory, registers, L2) and, for a known compute
capability, the matching built-in profile's rates (peak FLOP/s and bandwidth are not queryable).
CPU: cores from os.cpu_count() (threads torch will use), caches from
/sys/devices/system/cpu/cpu0/cache; rates start from cpu-generic and can be measured on the spot
with `calibrate=True` (fa2lab.hardware.calibrate, ~5 s).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from fa2lab.hardware.builtin import BUILTIN
from fa2lab.hardware.profile import HardwareProfile

SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
_BY_CC = {(6, 1): "gtx1080", (7, 5): "t4", (8, 0): "a100", (8, 9): "rtx4090", (9, 0): "h100"}


def detect(device: int | None = None, *, calibrate: bool = False, heads: int | None = None) -> HardwareProfile:
    """The current machine's profile: CUDA device `device` (default: current) if present, else the
    CPU; `calibrate` measures the CPU's rates, with tiled runs of `heads` heads (B*Hq)."""
    if torch.cuda.is_available():
        return _detect_gpu(torch.cuda.current_device() if device is None else device)
    profile = _detect_cpu()
    if calibrate:
        from fa2lab.hardware.calibrate import calibrate_cpu

        profile = calibrate_cpu(profile, heads)
    return profile


def _detect_gpu(index: int) -> HardwareProfile:
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    base = BUILTIN["h200" if "H200" in props.name else _BY_CC.get(cc, "a100")]
    stamp = f"torch.cuda.get_device_properties({index}), {time.strftime('%Y-%m-%d')}"

    def prop(name, default):
        return getattr(props, name, None) or default

    values = dict(
        name=props.name, arch=f"{props.name} (sm_{props.major}{props.minor})", compute_capability=cc,
        units=props.multi_processor_count,
        smem_per_block=prop("shared_memory_per_block_optin", base.smem_per_block),
        smem_per_unit=prop("shared_memory_per_multiprocessor", base.smem_per_unit),
        llc_bytes=prop("L2_cache_size", base.llc_bytes),
        registers_per_unit=prop("regs_per_multiprocessor", base.registers_per_unit),
        max_threads_per_unit=prop("max_threads_per_multi_processor", base.max_threads_per_unit),
        vector_width=prop("warp_size", 32),
    )
    scale = values["units"] / base.units  # rates scale with SM count within one architecture
    sources = {k: stamp for k in values if k not in ("name", "arch")}
    for k in ("peak_flops", "peak_flops_simd", "mem_bw", "exp_per_s", "clock_hz", "l1_bytes"):
        sources[k] = f"built-in profile {base.name!r} (not queryable from CUDA)" + (
            f", scaled by SMs {values['units']}/{base.units}" if k in ("peak_flops", "peak_flops_simd", "exp_per_s")
            and scale != 1 else "")
    return dataclasses.replace(
        base, **values,
        peak_flops={k: v * scale for k, v in base.peak_flops.items()},
        peak_flops_simd={k: v * scale for k, v in base.peak_flops_simd.items()},
        exp_per_s=base.exp_per_s * scale if base.exp_per_s else None,
        sources=dict(base.sources, **sources))


def cpu_caches(root: Path = SYS_CACHE) -> dict[int, dict]:
    """{level: {"size": bytes, "shared_cpus": n}} for data/unified caches, from sysfs."""
    out = {}
    if not root.exists():
        return out
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text().strip())
            shared = (index / "shared_cpu_list").read_text().strip() if (index / "shared_cpu_list").exists() else "0"
        except (OSError, ValueError):
            continue
        out[level] = {"size": size, "shared_cpus": _count_cpus(shared)}
    return out


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _count_cpus(cpu_list: str) -> int:
    n = 0
    for part in cpu_list.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def _detect_cpu() -> HardwareProfile:
    base = BUILTIN["cpu-generic"]
    caches = cpu_caches()
    cores = os.cpu_count() or base.units
    stamp = f"{SYS_CACHE} read {time.strftime('%Y-%m-%d')}"
    l1 = caches.get(1, {}).get("size", base.l1_bytes)
    l2 = caches.get(2, {}).get("size", base.smem_per_block)
    if 2 in caches and caches[2]["shared_cpus"] > 1:  # L2 shared by a cluster: a core's share
        l2 //= caches[2]["shared_cpus"]
    llc = caches.get(3, caches.get(2, {})).get("size", base.llc_bytes)
    flags = _cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2  # FMA ports per core on every x86 core since Haswell (an assumption for others)
    clock = base.clock_hz
    sources = dict(base.sources)
    sources.update(units=f"os.cpu_count() = {cores}, {time.strftime('%Y-%m-%d')}",
                   l1_bytes=stamp, smem_per_block=stamp + " (L2 per core)", smem_per_unit=stamp,
                   llc_bytes=stamp, vector_width=f"/proc/cpuinfo flags: {lanes} fp32 lanes",
                   peak_flops_simd=f"cores x {fma} FMA ports x {lanes} lanes x 2 x {clock / 1e9:.2g} GHz "
                                   "(assumed clock; calibrate=True measures a GEMM instead)")
    return dataclasses.replace(
        base, name=f"detected-cpu ({platform.processor() or platform.machine()})",
        arch=f"{_cpu_model() or platform.machine()}, {lanes}-lane fp32 SIMD", units=cores,
        smem_per_block=l2, smem_per_unit=l2, l1_bytes=l1, llc_bytes=llc, vector_width=lanes,
        registers_per_unit=(32 if lanes == 16 else 16) * lanes,
        peak_flops_simd={"float32": cores * fma * lanes * 2 * clock, "float64": cores * fma * lanes * clock},
        sources=sources)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""
