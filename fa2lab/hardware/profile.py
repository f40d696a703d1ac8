"""`HardwareProfile`: the numbers of one device that decide tile sizes and predicted cost.

Every field carries its "why" (in the field's metadata, printed by `describe()`); every number of
a profile carries its source in `sources` (datasheet, paper, or measurement with date and command).
GPU and CPU share one schema; where a field means something different on the two, its "why" says
both. Sizes in bytes, rates per second.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

import torch


def _f(why: str, **kw):
    return field(metadata={"why": why}, **kw)


# Names accepted for dtypes in `peak_flops` (and as strings wherever a dtype is expected).
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


def dtype_name(dtype) -> str:
    """'float16' for torch.float16 or 'float16' or 'fp16'."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; expected one of {list(DTYPE_NAMES.values())}")
        return DTYPE_NAMES[dtype]
    aliases = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype), str(dtype).removeprefix("torch."))
    if name not in DTYPE_NAMES.values():
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(DTYPE_NAMES.values())}")
    return name


def dtype_bytes(dtype) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype_name(dtype)]


@dataclass(frozen=True)
class HardwareProfile:
    name: str = _f("key for get_profile(); free text for detected and YAML profiles")
    kind: str = _f("'gpu' or 'cpu': GPUs tile into programmer-managed shared memory, CPUs into caches")
    arch: str = _f("architecture in words, for people reading the profile")
    compute_capability: tuple[int, int] | None = _f(
        "CUDA sm_XY (GPU only): decides async copies (>= 8.0), tensor-core dtypes, Triton support")
    units: int = _f("SMs (GPU) or physical cores (CPU): the parallel workers a grid of tiles is spread over")
    clock_hz: float = _f("boost clock; peak rates below are units x per-clock rate x this")
    smem_per_block: int = _f(
        "on-chip bytes ONE tile program may use: opt-in shared memory per block (GPU), L2 per core "
        "(CPU). This is M in the FA paper's Bc = ceil(M / 4d)")
    smem_per_unit: int = _f(
        "shared memory per SM (GPU; blocks per SM = this // block's smem) or L2 per core (CPU)")
    l1_bytes: int = _f("L1 data cache per SM/core (GPU: the L1 + shared-memory pool)")
    llc_bytes: int = _f("last-level cache, whole device (GPU L2, CPU L3): K/V reuse across tiles may hit it")
    registers_per_unit: int = _f(
        "32-bit registers per SM (GPU): the O_i accumulator and S tile live here in FA2. On a CPU, "
        "architectural fp32 vector lanes (registers x lanes): tiles never fit; recorded for completeness")
    max_regs_per_thread: int = _f("GPU: registers one thread may hold before spilling (255 since sm_35); CPU: 0")
    max_threads_per_unit: int = _f("GPU: resident threads per SM (occupancy); CPU: hardware threads per core")
    vector_width: int = _f("warp size (GPU) or fp32 SIMD lanes (CPU): the natural granularity of a tile edge")
    mem_bw: float = _f("off-chip bandwidth, bytes/s (HBM/GDDR or DRAM): the roof that IO-aware tiling lowers")
    peak_flops: dict = _f(
        "dense FLOP/s per dtype name WITH tensor/matrix units where the device has them (None: dtype "
        "not supported natively); the compute roof of the matmuls", default_factory=dict)
    peak_flops_simd: dict = _f(
        "dense FLOP/s per dtype WITHOUT tensor/matrix units (CUDA cores, CPU FMA SIMD): the roof "
        "for the softmax arithmetic and for devices without tensor cores", default_factory=dict)
    exp_per_s: float | None = _f(
        "exponentials per second (GPU: special-function units; CPU: torch.exp measured): the third "
        "roof, one exp per score element", default=None)
    step_overhead_s: float = _f(
        "fixed cost per step of work: one kernel launch (GPU); one tile step of fa2lab's Python "
        "tiled loop, ~15 torch op dispatches (CPU). Makes tiny tiles overhead-bound", default=0.0)
    score_s: float | None = _f(
        "CPU: seconds per score element of a tile step at d=64 whose score tiles stay in L2 (two "
        "matmuls + the softmax passes, eager PyTorch); None: 4d/peak + 1/exp_per_s", default=None)
    row_s: float = _f(
        "CPU: seconds per accumulator element per step (acc *= alpha, plus the row max/sum updates): "
        "Br x Dv work per head and step, FA2's non-matmul cost that a wider Bc amortises", default=0.0)
    spill_factor: float = _f(
        "CPU: how much slower a score element gets when the score tiles a core holds outgrow its L2 "
        "(the softmax passes then stream from L3/DRAM)", default=1.0)
    mask_s: float = _f(
        "CPU: extra seconds per element of a partial (diagonal/window-edge) tile: building the boolean "
        "mask and masked_fill over every head", default=0.0)
    fault_s_per_byte: float = _f(
        "CPU: seconds per byte to fault in freshly mapped memory; glibc maps allocations >= 32 MiB "
        "fresh from the OS (fa2lab's timing setting), so score tiles that large pay it every step",
        default=0.0)
    kernel_configs: dict = _f(
        "GPU: launch configurations of fa2lab's Triton kernels tuned for this device ({'fwd': ..., "
        "'bwd': ...} by head-dim bound); empty where the portable defaults apply", default_factory=dict)
    sources: dict = _f("field name -> where its number comes from (datasheet, paper, measurement + date)",
                       default_factory=dict)

    def __post_init__(self):
        for f in fields(self):
            problem = field_problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"profile {self.name!r}: {f.name}: {problem}")

    def to_yaml(self) -> str:
        """This profile as YAML that `load_profile` reads back to an equal profile. Fields at their
        default are left out (a loaded file gets those defaults, and no source for them)."""
        import yaml

        data = {}
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name != "sources" and default is not MISSING and value == default:
                continue
            data[f.name] = _lists(value)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def flops(self, dtype, tensor_cores: bool = True) -> float | None:
        """Peak dense FLOP/s for `dtype`: the matrix-unit figure, else the SIMD one. 16-bit inputs
        may also be upcast and computed in float32 (as kernels do on Pascal, where fp16 runs at
        1/64 rate), so they never get less than the float32 SIMD rate."""
        name = dtype_name(dtype)
        candidates = [self.peak_flops.get(name) if tensor_cores else None, self.peak_flops_simd.get(name)]
        if name in ("float16", "bfloat16"):
            candidates.append(self.peak_flops_simd.get("float32"))
        known = [c for c in candidates if c]
        return max(known) if known else None

    def tile_config(self, head_dim: int, dtype="float16", causal: bool = False, **kw):
        """Deprecated: fa2lab.cost.tile_config(profile, ...) (tile choice is part of the cost model)."""
        return _moved("tile_config")(self, head_dim, dtype, causal, **kw)

    def decode_splits(self, batch: int, heads: int, cache_len: int, **kw) -> int:
        """Deprecated: fa2lab.cost.decode_splits(profile, ...)."""
        return _moved("decode_splits")(self, batch, heads, cache_len, **kw)

    def describe(self) -> str:
        """Every field with its value, its why and its source, one per line."""
        lines = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            lines.append(f"{f.name:<20} {_show(f.name, value)}")
            lines.append(f"{'':<20}   why: {f.metadata['why']}")
            if f.name in self.sources:
                lines.append(f"{'':<20}   source: {self.sources[f.name]}")
        return "\n".join(lines)


# Valid values of each field: (kind, lowest, lowest allowed?) where kind is "text", "int", "float",
# "float?" (None allowed), "cc" (compute capability or None), "rates" (dtype name -> FLOP/s or None)
# or "sources" (field name -> text). Sizes of 0 mean "none / not applicable" where allowed.
FIELD_RULES = {
    "name": ("text",), "kind": ("text",), "arch": ("text",), "compute_capability": ("cc",),
    "units": ("int", 1), "clock_hz": ("float", 0, False), "smem_per_block": ("int", 1),
    "smem_per_unit": ("int", 1), "l1_bytes": ("int", 0), "llc_bytes": ("int", 0),
    "registers_per_unit": ("int", 0), "max_regs_per_thread": ("int", 0), "max_threads_per_unit": ("int", 0),
    "vector_width": ("int", 1), "mem_bw": ("float", 0, False), "peak_flops": ("rates",),
    "peak_flops_simd": ("rates",), "exp_per_s": ("float?", 0, False), "step_overhead_s": ("float", 0, True),
    "score_s": ("float?", 0, False), "row_s": ("float", 0, True), "spill_factor": ("float", 0, False),
    "mask_s": ("float", 0, True), "fault_s_per_byte": ("float", 0, True), "kernel_configs": ("table",),
    "sources": ("sources",),
}


def _lists(value):
    """YAML has lists, not tuples."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _plain_table(value) -> bool:
    """Nested mappings (str or int keys) of numbers, booleans, text and lists of them: YAML data."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and not isinstance(k, bool) and _plain_table(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_table(v) for v in value)
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


def _number_problem(kind: str, value, low, inclusive=True) -> str | None:
    bound = f">= {low}" if inclusive else f"> {low}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer {bound}, got {value!r} ({type(value).__name__})"
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number {bound}, got {value!r} ({type(value).__name__})"
    elif not math.isfinite(value):
        return f"expected a finite number {bound}, got {value!r}"
    if value < low or (value == low and not inclusive):
        return f"expected a number {bound}, got {value!r}"
    return None


def field_problem(name: str, value) -> str | None:
    """None if `value` is valid for field `name` of HardwareProfile; else what is wrong and what
    range is valid."""
    kind, *bounds = FIELD_RULES[name]
    if kind == "text":
        if not isinstance(value, str):
            return f"expected text, got {value!r} ({type(value).__name__}); in YAML, quote it: {name}: '{value}'"
        if name == "kind" and value not in ("cpu", "gpu"):
            return f"kind must be 'cpu' or 'gpu', got {value!r}"
        return None
    if kind == "cc":
        ok = value is None or (isinstance(value, tuple) and len(value) == 2
                               and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
                               and value[0] >= 1)
        return None if ok else (f"expected None or (major, minor) with integers major >= 1, minor >= 0, "
                                f"e.g. (9, 0), got {value!r}")
    if kind == "rates":
        if not isinstance(value, dict):
            return f"expected a mapping of dtype name -> FLOP/s, got {value!r} ({type(value).__name__})"
        for key, rate in value.items():
            try:
                dtype_name(key)
            except ValueError as exc:
                return f"key {key!r}: {exc}"
            problem = rate is not None and _number_problem("float", rate, 0, False)
            if problem:
                return f"{key}: {problem} (FLOP/s), or None where the dtype is not supported"
        return None
    if kind == "table":
        ok = isinstance(value, dict) and _plain_table(value)
        return None if ok else (f"expected a mapping of kernel -> head-dim bound -> launch settings (numbers, "
                                f"booleans, text), got {value!r}")
    if kind == "sources":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return f"expected a mapping of field name -> text, got {value!r}"
        return None
    if kind == "float?" and value is None:
        return None
    return _number_problem("int" if kind == "int" else "float", value, *bounds)


def _show(name: str, value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_rate(v)}" for k, v in value.items()) or "-"
    if isinstance(value, float) and name in ("mem_bw",):
        return f"{value / 1e9:.1f} GB/s"
    if isinstance(value, float) and name == "clock_hz":
        return f"{value / 1e9:.3g} GHz"
    if isinstance(value, float) and name == "exp_per_s":
        return f"{value / 1e9:.3g} G exp/s"
    if isinstance(value, float) and name in ("score_s", "mask_s", "row_s"):
        return f"{value * 1e9:.3g} ns"
    if isinstance(value, float) and name == "fault_s_per_byte":
        return f"{value * 2**30:.3g} s/GiB"
    if isinstance(value, float) and name == "step_overhead_s":
        return f"{value * 1e6:.3g} us"
    if name in ("smem_per_block", "smem_per_unit", "l1_bytes", "llc_bytes"):
        return f"{value} B ({value / 1024:.4g} KiB)"
    return str(value)


def _rate(v) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1e12:.4g} TFLOP/s" if v >= 1e12 else f"{v / 1e9:.4g} GFLOP/s"


def _moved(name: str):
    # Looked up on use (importlib, not an import statement): hardware sits below cost in the layers.
    import importlib
    import warnings

    warnings.warn(f"HardwareProfile.{name}(...) moved to fa2lab.cost.{name}(profile, ...)", DeprecationWarning,
                  stacklevel=3)
    return getattr(importlib.import_module("fa2lab.cost.tiles"), name)
