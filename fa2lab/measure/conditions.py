"""What a measurement ran under: the share of the CPUs other processes used meanwhile, and a GPU's
clocks, power, temperature and other processes.

CPU load comes from /proc/stat: the busy time of all CPUs over a window, minus this process's own
CPU time (all its threads, and its children that ended meanwhile), over the window's CPU time. On a 2-core machine one busy neighbour is
50%, and small PyTorch ops, whose intra-op threads wait on each other, slow down by orders of
magnitude under it. Without /proc/stat (macOS, Windows) the share is unknown (None).

GPU readings come from NVML through `nvidia-ml-py` (`import pynvml`) when it is installed, else from
`nvidia-smi`; with neither, None. Both readers can be replaced (tests pass fakes).
"""

from __future__ import annotations

import os
import subprocess
import time

# NVML clock-event ("throttle") reason bits, from nvml.h (nvmlClocksEventReason*).
THROTTLE_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                    0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                    0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
# Reasons that mean the chip runs slower than it could for this work; a power cap under a heavy
# kernel is ordinary operation and shows in the SM clock instead.
SLOWDOWN_REASONS = {"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None where it is missing."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time
    total = sum(values[:8])
    return total - idle, total


def _own_cpu_s() -> float:
    """CPU seconds of this process (all threads) and of its children that have ended and been
    waited for (nvidia-smi, a measured call's subprocesses): the part of the busy time that is ours."""
    try:
        import resource
    except ImportError:  # Windows: no /proc/stat either, the share is unknown
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class LoadWindow:
    """The other processes' share of the CPUs between start() and share()."""

    def __init__(self):
        self._start = None

    def start(self) -> LoadWindow:
        self._start = (cpu_jiffies(), _own_cpu_s(), time.perf_counter())
        return self

    def share(self, min_s: float = 0.0) -> float | None:
        """Share of all CPUs (0..1) that other processes used since start(); the window is
        stretched (by sleeping) to at least `min_s`, since /proc/stat counts 1/100 s ticks."""
        jiffies0, own0, t0 = self._start
        if jiffies0 is None:
            return None
        rest = min_s - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        jiffies1, own1 = cpu_jiffies(), _own_cpu_s()
        if jiffies1 is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        span = (jiffies1[1] - jiffies0[1]) / hz
        others = (jiffies1[0] - jiffies0[0]) / hz - (own1 - own0)
        return min(1.0, max(0.0, others / span)) if span > 0 else None


def others_share(fn, min_s: float = 0.0) -> tuple[float, float]:
    """Run fn(); return (its wall seconds, the share of all CPUs OTHER processes used meanwhile,
    0.0 where unknown)."""
    window = LoadWindow().start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    share = window.share(min_s)
    return seconds, share or 0.0


def wait_for_quiet(limit: float = 0.1, max_wait_s: float = 600, progress=None) -> bool:
    """Block until other processes use < `limit` of the CPUs over a 2 s window (True), or give up."""
    import logging

    say = progress or logging.getLogger("fa2lab").warning
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        _, share = others_share(lambda: time.sleep(2.0))
        if share < limit:
            return True
        say(f"  waiting for a quiet machine: other processes use {share:.0%} of the CPUs")
        time.sleep(8)
    return False


def decode_reasons(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


def _physical_index(index: int) -> int | str:
    """The NVML index (or UUID) of CUDA device `index`, through CUDA_VISIBLE_DEVICES."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        return int(visible[index]) if visible[index].isdigit() else visible[index]
    return index


def _nvml_reading(nvml, index: int) -> dict:
    nvml.nvmlInit()
    try:
        where = _physical_index(index)
        handle = (nvml.nvmlDeviceGetHandleByIndex(where) if isinstance(where, int)
                  else nvml.nvmlDeviceGetHandleByUUID(where))
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        try:
            pids = [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except nvml.NVMLError:
            pids = None
        return dict(source="nvml",
                    sm_clock_mhz=nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                    mem_clock_mhz=nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
                    sm_clock_max_mhz=nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM),
                    power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                    temp_c=nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                    reasons=decode_reasons(int(reasons(handle))), pids=pids)
    finally:
        nvml.nvmlShutdown()


SMI_QUERY = "clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def _run_smi(args: list[str]) -> str:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10, check=True).stdout


def _number(text: str):
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _smi_reading(smi, index: int) -> dict:
    where = str(_physical_index(index))
    line = smi([f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits", "-i", where]).strip().splitlines()[0]
    sm, mem, sm_max, power, temp, reasons = [v.strip() for v in line.split(",")]
    try:
        mask = int(reasons, 16)
    except ValueError:
        mask = 0
    try:
        apps = smi(["--query-compute-apps=pid", "--format=csv,noheader", "-i", where])
        pids = [int(p) for p in apps.split() if p.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        pids = None
    return dict(source="nvidia-smi", sm_clock_mhz=_number(sm), mem_clock_mhz=_number(mem),
                sm_clock_max_mhz=_number(sm_max), power_w=_number(power), temp_c=_number(temp),
                reasons=decode_reasons(mask), pids=pids)


def _import_nvml():
    try:
        import pynvml  # nvidia-ml-py

        return pynvml
    except ImportError:
        return None


def gpu_conditions(index: int = 0, *, nvml=None, smi=None) -> dict | None:
    """Clocks (MHz), power (W), temperature (C), active clock-event reasons and the compute
    processes of CUDA device `index` now, with `other_processes`: how many of those are not this
    process. `nvml`: a pynvml-like module (default: `import pynvml` if installed); `smi`: a
    function running nvidia-smi with a list of arguments and returning its stdout (default: the
    real one, used when NVML is missing or fails). None when neither can read the device."""
    readers = []
    nvml = nvml if nvml is not None else _import_nvml()
    if nvml is not None:
        readers.append(lambda: _nvml_reading(nvml, index))
    readers.append(lambda: _smi_reading(smi or _run_smi, index))
    for read in readers:
        try:
            reading = read()
            break
        except Exception:  # noqa: BLE001 - no driver, no permission, old tool: try the next reader
            continue
    else:
        return None
    pids = reading.pop("pids")
    if pids is None:
        reading["other_processes"] = None
    else:
        # In a container the driver reports host PIDs, so this process's own entry does not carry
        # its PID: then one of the entries is taken to be ours.
        others = [p for p in pids if p != os.getpid()]
        reading["other_processes"] = len(others) - (1 if others and len(others) == len(pids) else 0)
    return reading
