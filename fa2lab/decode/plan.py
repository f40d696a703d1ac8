"""`decode_plan`: check a decode call once, run it many times with no host-device sync.

As flashinfer's plan/run: the plan checks shapes, dtypes, devices, options and (once) the cache's
current lengths and page table, chooses the backend, the split count and the kernel tiles, and
holds the kernel's workspace. `decode_attention(..., plan=plan)` then compares only host-side
metadata (shapes, dtypes) with the plan and launches: it reads nothing back from the device, so
a step runs asynchronously and can be captured in a CUDA graph. Lengths are not re-checked; they
are clamped to [0, capacity] and page numbers to the pool on the device, so any cache_seqlens is
memory-safe. The split count depends on the cache's capacity, not its lengths (each split takes
an equal share of the actual length on the device), so one plan serves every step of a
generation while the lengths grow, and every layer whose cache has the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fa2lab import _checks, masks
from fa2lab.variants.options import NONE

DECODE_BACKENDS = ("auto", "reference", "tiled", "sdpa", "triton")  # fa2lab.attention's names; "sdpa" says why not


@dataclass(frozen=True)
class DecodePlan:
    """The checked shape of a decode call and what runs it. Made by `decode_plan`."""

    backend: str  # "triton" | "tiled" | "reference": chosen once, from device, dtype, cache and options
    paged: bool
    q_shape: tuple  # (B, Hq, Nq, D)
    k_shape: tuple  # dense (B, Hkv, Nmax, D) or pages (num_pages, Hkv, page_size, D)
    v_shape: tuple
    table_shape: tuple | None  # (B, max_pages_per_seq) for a paged cache
    new_shape: tuple | None  # (B, Hkv, Nnew, D) of k_new, None without append
    dtype: torch.dtype
    device: torch.device
    capacity: int  # positions addressable per sequence
    num_splits: int  # split-K chunks per (sequence, K/V head, row tile)
    scale: float
    causal: bool
    window_size: tuple
    unified_max: float | None
    workspace: tuple = field(default=(), compare=False, repr=False)  # Triton partials and counters
    config: dict = field(default_factory=dict, compare=False)  # Triton tiles (BLOCK_M, BLOCK_N, ...)
    variants: object = field(default=None, compare=False, repr=False)  # fa2lab.variants, unplanned calls only
    launch: object = field(default=None, compare=False, repr=False)  # kernels.decode.DecodeLaunch (planned Triton)
    full_lengths: object = field(default=None, compare=False, repr=False)  # (B,) int32 = capacity, for no cache_seqlens

    @property
    def n_new(self) -> int:
        return self.new_shape[2] if self.new_shape else 0

    @property
    def window(self) -> tuple[int, int]:
        """(left, right) key bounds, -1 unbounded, as the kernels take them."""
        return masks.effective_window(self.causal, self.window_size)

    def matches(self, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table) -> bool:
        """The common case of `check_call` in a few comparisons (a planned call's whole host-side
        check): tensors of the planned shapes, dtype and device, int32 lengths of shape (B,)."""
        dt, dev = self.dtype, self.device
        try:
            ok = (q.shape == self.q_shape and k_cache.shape == self.k_shape and v_cache.shape == self.v_shape
                  and q.dtype == dt and k_cache.dtype == dt and v_cache.dtype == dt
                  and q.device == dev and k_cache.device == dev and v_cache.device == dev)
            if not ok:
                return False
            if self.new_shape is None:
                if k_new is not None or v_new is not None:
                    return False
            elif (k_new is None or v_new is None or k_new.shape != self.new_shape
                  or v_new.shape[:3] != self.new_shape[:3]):
                return False
            if cache_seqlens is None:
                return not self.paged and self.new_shape is None
            ok = (cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == self.q_shape[:1]
                  and cache_seqlens.device == dev)
            if self.paged:
                return (ok and block_table is not None and block_table.dtype == torch.int32
                        and block_table.shape == self.table_shape and block_table.device == dev)
            return ok and block_table is None
        except AttributeError:  # not a tensor: check_call names it
            return False

    def call_variants(self, softcap, alibi_slopes, sinks):
        """The variants of a planned call that passes some: the plan's, with the call's slopes and
        sinks (checked host-side: shape, dtype, device). The plan fixes which variants are on."""
        import dataclasses

        from fa2lab.variants.options import NONE, _check_sinks, _check_slopes

        var = self.variants if self.variants is not None else NONE
        b, hq = self.q_shape[:2]
        for name, given, planned in (("softcap", bool(softcap), var.softcap > 0),
                                     ("alibi_slopes", alibi_slopes is not None, var.alibi_slopes is not None),
                                     ("sinks", sinks is not None, var.sinks is not None)):
            if given and not planned:
                raise ValueError(f"this decode plan was made without {name}; make it with "
                                 f"fa2lab.decode_plan(..., {name}=...) (a plan fixes which variants are on)")
        if softcap and float(softcap) != var.softcap:
            raise ValueError(f"this decode plan was made with softcap={var.softcap}, the call asks {softcap}; "
                             f"make a new plan")
        return dataclasses.replace(
            var, alibi_slopes=var.alibi_slopes if alibi_slopes is None else _check_slopes(alibi_slopes, b, hq,
                                                                                           self.device),
            sinks=var.sinks if sinks is None else _check_sinks(sinks, hq, self.device))

    def check_call(self, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, options: dict) -> None:
        """Host-side metadata only (no device read): the call must be the one this plan was made for."""
        got = dict(q=q, k_cache=k_cache, v_cache=v_cache)
        for name, t, want in (("q", q, self.q_shape), ("k_cache", k_cache, self.k_shape),
                              ("v_cache", v_cache, self.v_shape)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise ValueError(f"this decode plan was made for {name} of shape {want}, got "
                                 f"{tuple(getattr(t, 'shape', ())) or t!r}; make a new plan with fa2lab.decode_plan")
        for name, t in got.items():
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"this decode plan was made for {self.dtype} on {self.device}, got {name} "
                                 f"{t.dtype} on {t.device}; make a new plan")
        if (block_table is None) == self.paged:
            raise ValueError(f"this decode plan was made for a {'paged' if self.paged else 'dense'} cache; "
                             f"{'pass' if self.paged else 'drop'} block_table or make a new plan")
        if self.paged and (tuple(block_table.shape) != self.table_shape or block_table.dtype != torch.int32):
            raise ValueError(f"this decode plan was made for an int32 block_table of shape {self.table_shape}, got "
                             f"{block_table.dtype} {tuple(block_table.shape)}; make a new plan")
        for name, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table)):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise ValueError(f"expected {name} on {self.device} like q, got {t.device}; move it with "
                                 f".to({str(self.device)!r})")
        if (k_new is None) != (self.new_shape is None):
            raise ValueError(f"this decode plan was made {'with' if self.new_shape else 'without'} k_new/v_new; "
                             f"make a new plan for the other kind of call")
        if k_new is not None and (tuple(k_new.shape) != self.new_shape or v_new is None
                                  or tuple(v_new.shape[:3]) != self.new_shape[:3]):
            raise ValueError(f"this decode plan was made for k_new/v_new of shape {self.new_shape}, got "
                             f"{tuple(k_new.shape)} and {tuple(getattr(v_new, 'shape', ()))}; make a new plan")
        if cache_seqlens is None and (self.paged or self.new_shape):
            raise ValueError("a planned call with a paged cache or k_new needs cache_seqlens (B,) int32")
        if cache_seqlens is not None and (not isinstance(cache_seqlens, torch.Tensor)
                                          or tuple(cache_seqlens.shape) != (self.q_shape[0],)
                                          or cache_seqlens.dtype != torch.int32):
            raise ValueError(f"expected cache_seqlens int32 of shape ({self.q_shape[0]},), got "
                             f"{getattr(cache_seqlens, 'dtype', cache_seqlens)} {tuple(getattr(cache_seqlens, 'shape', ()))}")
        planned = dict(causal=self.causal, window_size=tuple(self.window_size), unified_max=self.unified_max)
        for name, want in planned.items():
            if name in options and options[name] != want:
                raise ValueError(f"this decode plan was made with {name}={want!r}, the call asks {options[name]!r}; "
                                 f"make a new plan with fa2lab.decode_plan(..., {name}={options[name]!r})")
        if options.get("softmax_scale") is not None and float(options["softmax_scale"]) != self.scale:
            raise ValueError(f"this decode plan was made with softmax_scale={self.scale}, the call asks "
                             f"{options['softmax_scale']}; make a new plan")
        if options.get("num_splits") is not None and options["num_splits"] != self.num_splits:
            raise ValueError(f"this decode plan runs num_splits={self.num_splits}, the call asks "
                             f"{options['num_splits']}; make a new plan")
        if options.get("backend", "auto") not in ("auto", self.backend):
            raise ValueError(f"this decode plan runs backend {self.backend!r}, the call asks {options['backend']!r}; "
                             f"make a new plan")


def check_shapes(q, k_cache, v_cache, k_new, v_new, block_table, cache_seqlens, window_size):
    """Every check that needs no device read. Returns the window, normalised."""
    _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    _checks.check_floating("q", q)
    paged = block_table is not None
    layout = "(num_pages, Hkv, page_size, D)" if paged else "(B, Hkv, Nmax, D)"
    _checks.check_tensor("k_cache", k_cache, 4, layout)
    _checks.check_tensor("v_cache", v_cache, 4, layout.replace("D)", "Dv)"))
    _checks.check_same_dtype_device(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"expected k_cache and v_cache to agree except in the last dim, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _checks.check_head_dims(q.shape[-1], k_cache.shape[-1])
    _checks.check_heads(q.shape[1], k_cache.shape[1], v_cache.shape[1])
    window_size = _checks.check_window(window_size)
    batch = q.shape[0]
    if paged:
        _check_index_tensor("block_table", block_table, lambda t: t.dim() == 2 and t.shape[0] == batch,
                            f"(B={batch}, max_pages_per_seq)", q.device)
    elif k_cache.shape[0] != batch:
        raise ValueError(f"expected k_cache batch {k_cache.shape[0]} to equal q's batch {batch}")
    if cache_seqlens is not None:
        _check_index_tensor("cache_seqlens", cache_seqlens, lambda t: t.shape == (batch,), f"(B,) = ({batch},)",
                            q.device)
    if (k_new is None) != (v_new is None):
        raise ValueError("expected k_new and v_new together (both None, or both (B, Hkv, Nnew, D/Dv))")
    if k_new is not None:
        hkv, d, dv = k_cache.shape[1], k_cache.shape[-1], v_cache.shape[-1]
        for name, t, dim in (("k_new", k_new, d), ("v_new", v_new, dv)):
            _checks.check_tensor(name, t, 4, "(B, Hkv, Nnew, D)")
            if t.shape[0] != batch or t.shape[1] != hkv or t.shape[3] != dim:
                raise ValueError(f"expected {name} of shape (B={batch}, Hkv={hkv}, Nnew, {dim}), got {tuple(t.shape)}")
            if t.device != q.device or not t.dtype.is_floating_point:
                raise ValueError(f"expected {name} floating-point on {q.device}, got {t.dtype} on {t.device}")
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"expected k_new and v_new to bring as many tokens, got {k_new.shape[2]} and "
                             f"{v_new.shape[2]}")
        if cache_seqlens is None:
            raise ValueError("k_new/v_new are written at cache_seqlens[b]: pass cache_seqlens (B,) int32")
    return window_size


def check_values(seqlens, n_new: int, capacity: int, block_table, page_size: int, num_pages: int) -> None:
    """The checks that read the device: lengths in range after the append, every page a sequence
    uses inside the pool. All of them in one read-back (one host-device sync)."""
    if seqlens.numel() == 0:
        return
    stats = [seqlens.min(), seqlens.max()]
    if block_table is not None:
        pages_used = (seqlens.long() + n_new + page_size - 1).clamp(min=0) // page_size  # (B,)
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages_used[:, None]
        bad = used & ((block_table < 0) | (block_table >= num_pages))  # (B, max_pages)
        rows = bad.any(dim=1)
        stats += [rows.any(), torch.where(rows, torch.arange(len(rows), device=rows.device), len(rows)).min()]
    values = torch.stack([s.to(torch.long) for s in stats]).tolist()  # the one sync
    lo, hi = values[0], values[1]
    if lo < 0 or hi + n_new > capacity:
        extra = f" + {n_new} new tokens" if n_new else ""
        raise ValueError(f"expected 0 <= cache_seqlens{extra} <= cache capacity {capacity}, got cache_seqlens in "
                         f"[{lo}, {hi}]; allocate a larger cache or advance the lengths less")
    if block_table is not None and values[2]:
        b = values[3]
        raise ValueError(f"block_table[{b}] points outside the pool of {num_pages} pages: "
                         f"{block_table[b].tolist()} (pages in use: the first {int(pages_used[b])})")


def decode_case(q, capacity: int, heads_kv: int, head_dim_v: int, cache: str, causal, window_size, unified_max,
                variants=()):
    """The `fa2lab.backends.Case` of a decode call: Nk is the cache's capacity."""
    from fa2lab.backends import Case

    return Case(q.device.type, q.dtype, q.shape[2], capacity, q.shape[1], heads_kv, q.shape[-1], head_dim_v,
                bool(causal), tuple(window_size), True, cache=cache, unified_max=unified_max is not None,
                variants=tuple(variants))


def choose_backend(backend: str, case, choose) -> str:
    """The decode backend, from fa2lab's one dispatch point (choose = `fa2lab.backends.choose`, as
    the caller holds it): on CUDA the Triton split-K kernel for dense and paged caches, the PyTorch
    split-K for the rest."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {list(DECODE_BACKENDS)}")
    return choose("decode", case, backend).name


def make_plan(q, k_cache, v_cache, k_new, v_new, *, block_table, num_splits, softmax_scale, causal, window_size,
              backend, unified_max, workspace: bool, num_units: int, choose, variants=None) -> DecodePlan:
    """A plan from checked shapes (no device read). workspace: allocate the kernel's workspace
    (a plan kept across calls); False leaves it to each call. num_units: SMs (GPU) or threads."""
    from fa2lab.decode import splits as split_rule

    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"expected num_splits to be a positive int or None (auto), got {num_splits!r}")
    causal = _checks.check_flag("causal", causal)
    unified_max = _checks.check_optional_number("unified_max", unified_max, "the fixed softmax reference phi")
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    name = choose_backend(backend, decode_case(q, capacity, k_cache.shape[1], v_cache.shape[-1],
                                               "paged" if paged else "dense", causal, window_size, unified_max,
                                               variants.active if variants is not None else ()),
                          choose)
    b, hq, nq, _ = q.shape
    hkv = k_cache.shape[1]
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    config, space, launch, full = {}, (), None, None
    if name == "triton":
        from fa2lab.kernels.decode import DecodeLaunch, decode_config, row_tiles

        config = decode_config((hq // hkv) * nq, max(q.shape[-1], v_cache.shape[-1]), q.dtype)
        tiles = b * hkv * row_tiles(hq, hkv, nq, config)
        # the split rule of fa2lab.decode.splits (the cost model predicts the same count)
        splits = min(num_splits or split_rule.kernel_num_splits(tiles, capacity, num_units), split_rule.MAX_SPLITS)
        if workspace:  # a kept plan: everything of the launch computed once, the workspace owned
            left, right = masks.effective_window(causal, window_size)
            var = variants if variants is not None else NONE
            launch = DecodeLaunch(tuple(q.shape), tuple(k_cache.shape), tuple(v_cache.shape), q.dtype, q.device,
                                  paged=paged, table_cols=block_table.shape[1] if paged else 0, scale=scale,
                                  left=left, right=right, num_splits=splits,
                                  n_new=k_new.shape[2] if k_new is not None else 0, config=config,
                                  softcap=var.softcap, alibi=var.alibi_slopes is not None, sinks=var.sinks is not None)
            space = launch.workspace
    else:
        splits = num_splits or (split_rule.num_splits("tiled", b * hkv, capacity, num_units)
                                if b else 1)
    if workspace:
        full = torch.full((b,), capacity, dtype=torch.int32, device=q.device)  # the lengths of a full cache
    return DecodePlan(
        backend=name, paged=paged, q_shape=tuple(q.shape), k_shape=tuple(k_cache.shape), v_shape=tuple(v_cache.shape),
        table_shape=tuple(block_table.shape) if paged else None,
        new_shape=tuple(k_new.shape) if k_new is not None else None, dtype=q.dtype, device=q.device,
        capacity=capacity, num_splits=splits, scale=scale, causal=bool(causal), window_size=tuple(window_size),
        unified_max=None if unified_max is None else float(unified_max), workspace=space, config=config,
        variants=variants if variants is not None and variants.any else None, launch=launch, full_lengths=full)


def _check_index_tensor(name: str, t, shape_ok, shape: str, device) -> None:
    """An int32 tensor of indices or lengths of the given shape on q's device (checked on the host:
    shape, dtype and device only, never its values)."""
    if not isinstance(t, torch.Tensor) or not shape_ok(t):
        raise ValueError(f"expected {name} to be an int32 tensor of shape {shape}, got {getattr(t, 'shape', t)}")
    if t.dtype != torch.int32:
        raise ValueError(f"expected {name} to be int32, got {t.dtype}; use .to(torch.int32)")
    if t.device != device:
        raise ValueError(f"expected {name} on {device}, got {t.device}; move it with .to({str(device)!r})")
