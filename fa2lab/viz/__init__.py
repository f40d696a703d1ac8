"""Figures for the notebooks and the sweep report, one module per topic. Each figure function
returns a plotly Figure, so tests check it without a browser; nothing here changes global state
on import (`use_notebook_renderer()` does, when a notebook calls it).

    style      use_notebook_renderer, the shared template, float32 figure data
    widgets    explore(builder, **controls): ipywidgets driving a figure builder
    softmax    01 online softmax: running m, l, rescale factors; naive vs safe softmax
    tiling     02 tile schedules from the tiled forward's tracer (full, causal, window, GQA, varlen)
    scaling    03 peak memory and time against N, fitted exponents, the cost model's prediction
    decoding   04 split-K partials and their merge, latency, unified max
    kvcache    05 paged allocator, sliding-window ring, memory against error of compressed caches
    hardware   06 derived tiles, rooflines, predicted against measured
    gpu        07 GPU benchmark results against SDPA, cuDNN, FlexAttention and the peaks
    ring       08 ring attention: the schedule of a plan, the LSE merge step by step, ring and Ulysses
               communication per step
    variants   09 attention variants: a row's probabilities, soft-capping, ALiBi, mask tiles, dropout
    backward   10 Algorithm 2: what the forward saves, the order of the backward's tiles, saved memory
    numerics   11 error against float64 per backend and dtype, the 2x rule, where the error comes from
    models     12 a small Qwen3 / Qwen3-VL through transformers: backend per layer, logits, memory
    sweeps     figures of sweep results tables (fa2lab report)
    compare    figures of `fa2lab report --compare` (B / A with the measured spread)
"""

from fa2lab.viz import (backward, compare, decoding, gpu, hardware, kvcache, models, numerics, ring, scaling, softmax,
                        sweeps, tiling, variants)
from fa2lab.viz.decoding import decode_latency, decode_latency_figure, splitk_merge_figure, unified_max_figure
from fa2lab.viz.softmax import naive_vs_safe_figure, online_softmax_figure, online_softmax_trace, softmax_stability
from fa2lab.viz.style import f32, styled, use_notebook_renderer
from fa2lab.viz.tiling import (CASES, TracedBlock, running_stats_figure, tile_cases_figure, tile_map_figure,
                               tile_schedule_figure, trace_schedule)

__all__ = [
    "decoding", "gpu", "hardware", "kvcache", "ring", "scaling", "softmax", "sweeps", "tiling", "widgets",
    "backward", "numerics", "models", "compare", "variants",
    "use_notebook_renderer", "styled", "f32",
    "explore", "int_slider", "float_slider", "choice",
    "online_softmax_trace", "online_softmax_figure", "softmax_stability", "naive_vs_safe_figure",
    "CASES", "TracedBlock", "trace_schedule", "tile_map_figure", "tile_cases_figure", "tile_schedule_figure",
    "running_stats_figure",
    "splitk_merge_figure", "unified_max_figure", "decode_latency", "decode_latency_figure",
]

_WIDGETS = ("widgets", "explore", "int_slider", "float_slider", "choice")


def __getattr__(name):
    # ipywidgets (and IPython with it) load only when a notebook asks for controls: the report
    # and the sweep runner use the figures alone.
    if name in _WIDGETS:
        import importlib

        widgets = importlib.import_module("fa2lab.viz.widgets")
        return widgets if name == "widgets" else getattr(widgets, name)
    raise AttributeError(f"module 'fa2lab.viz' has no attribute {name!r}")
