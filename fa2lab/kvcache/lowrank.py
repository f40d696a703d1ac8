"""LowRankKVCache: K and V stored as rank-r coefficients on per-head bases fitted by SVD.

Keys and values of a head tend to live near a low-dimensional subspace. `fit` takes a calibration
prefix (e.g. the prompt) and, per head, the top r right singular vectors U (D, r) of its tokens;
each appended token x (D,) is then stored as c = x U (r,), and the reader rebuilds tiles as
x_hat = c U^T. The error is the token's component outside span(U): zero at r = D, and small when
the spectrum decays fast within the first r directions.

The SVD is uncentred (a projection through the origin, no mean term): x_hat = c U^T exactly as
stored, and a common offset of the keys is captured by the first direction at the cost of one
rank. Bases are kept in float32 (float64 for float64 caches): they are small (Hkv * D * r), fixed,
and shared by every token, so their rounding is not worth saving bytes on.

Memory per token and head: 2 * r coefficients against 2 * D values, a ratio of r / D, plus the
fixed bases. (Folding U into the query, q.x_hat = (q U).c, would skip rebuilding K; the reader
protocol hands decode K tiles, so this cache rebuilds them.)
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab.kvcache.base import KVCache, check_append, check_sizes


def fit_basis(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B', Hkv, n, D) calibration tokens -> basis (Hkv, D, rank) float64 with orthonormal columns
    (top right singular vectors of each head's B'*n tokens) and the fraction of the tokens' energy
    (sum of squares) it captures, (Hkv,)."""
    heads, d = x.shape[1], x.shape[3]
    tokens = x.to(torch.float64).transpose(0, 1).reshape(heads, -1, d)  # (Hkv, B'*n, D)
    _, sv, vh = torch.linalg.svd(tokens, full_matrices=False)  # sv (Hkv, m), vh (Hkv, m, D), m = min(B'n, D)
    energy = (sv[:, :rank] ** 2).sum(-1) / (sv ** 2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return vh[:, :rank].mT, energy  # (Hkv, D, r), (Hkv,)


class LowRankKVCache(KVCache):
    def __init__(self, batch: int, heads_kv: int, max_len: int, head_dim: int, rank: int, *,
                 head_dim_v: int | None = None, dtype=torch.float16, device="cpu"):
        """rank r in [1, min(D, Dv)]; dtype: the dtype of the K/V you append, of the stored
        coefficients and of the queries. Call `fit` on a calibration prefix before appending."""
        check_sizes(batch=batch, heads_kv=heads_kv, max_len=max_len, head_dim=head_dim, head_dim_v=head_dim_v,
                    rank=rank)
        head_dim_v = head_dim_v or head_dim
        if not 1 <= rank <= min(head_dim, head_dim_v):
            raise ValueError(f"expected rank in [1, min(head_dim, head_dim_v)] = [1, {min(head_dim, head_dim_v)}], "
                             f"got {rank}; rank = head_dim stores K/V exactly (and saves nothing)")
        _checks.check_float_dtype("the cache's dtype", dtype)
        self.batch, self.heads_kv, self.max_len, self.head_dim = batch, heads_kv, max_len, head_dim
        self.head_dim_v, self.rank = head_dim_v, rank
        self.dtype = dtype
        basis_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.k_coef = torch.zeros(batch, heads_kv, max_len, rank, dtype=dtype, device=device)  # (B, Hkv, N, r)
        self.device = self.k_coef.device  # "cuda" resolved to "cuda:0": compared with inputs' devices
        self.v_coef = torch.zeros(batch, heads_kv, max_len, rank, dtype=dtype, device=device)
        self.k_basis = torch.zeros(heads_kv, head_dim, rank, dtype=basis_dtype, device=device)  # (Hkv, D, r)
        self.v_basis = torch.zeros(heads_kv, head_dim_v, rank, dtype=basis_dtype, device=device)  # (Hkv, Dv, r)
        self.k_energy = torch.zeros(heads_kv, dtype=torch.float64, device=device)  # calibration energy kept
        self.v_energy = torch.zeros(heads_kv, dtype=torch.float64, device=device)
        self.fitted = False
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def fit(self, k_calib: torch.Tensor, v_calib: torch.Tensor) -> None:
        """Fit per-head rank-r bases on calibration tokens k_calib (B or 1, Hkv, n, D), v_calib
        (B or 1, Hkv, n, Dv), any float dtype; the B'*n tokens of a head are pooled. Only while the
        cache is empty: stored coefficients belong to the old bases."""
        for name, x, dim in (("k_calib", k_calib, self.head_dim), ("v_calib", v_calib, self.head_dim_v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] not in (1, self.batch) \
                    or x.shape[1] != self.heads_kv or x.shape[3] != dim:
                raise ValueError(f"expected {name} of shape (B={self.batch} or 1, Hkv={self.heads_kv}, n, {dim}), "
                                 f"got {tuple(getattr(x, 'shape', ()))}")
            if not x.dtype.is_floating_point:
                raise ValueError(f"expected {name} to be floating point, got {x.dtype}; use {name}.float()")
            if x.shape[0] * x.shape[2] < self.rank:
                raise ValueError(f"expected at least rank={self.rank} calibration tokens per head, got "
                                 f"{x.shape[0]}*{x.shape[2]} in {name}; calibrate on a longer prefix or lower the rank")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"expected finite {name}: an SVD of inf or nan gives no basis")
        if bool((self.lengths > 0).any()):
            raise ValueError(f"fit() with {int(self.lengths.sum())} tokens stored: their coefficients belong to the "
                             f"current bases; call reset() first")
        k_basis, k_energy = fit_basis(k_calib, self.rank)
        v_basis, v_energy = fit_basis(v_calib, self.rank)
        self.k_basis.copy_(k_basis)  # in place: the buffers keep their addresses
        self.v_basis.copy_(v_basis)
        self.k_energy, self.v_energy, self.fitted = k_energy, v_energy, True

    def seqlens(self) -> torch.Tensor:
        return self.lengths

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Project and write n new tokens per sequence: k (B, Hkv, n, D), v (B, Hkv, n, Dv) in the
        cache's dtype. With `lengths` (int (B,), each <= n) sequence b takes its first lengths[b]."""
        if not self.fitted:
            raise ValueError("LowRankKVCache has no bases yet: call fit(k_calib, v_calib) on a calibration "
                             "prefix (e.g. the prompt's K/V) before append")
        _, take = check_append(self, k, v, lengths, capacity=self.max_len,
                               fix="allocate a larger cache or use SlidingWindowKVCache / PagedKVCache")
        k_c = (k.to(self.k_basis.dtype) @ self.k_basis).to(self.dtype)  # (B, Hkv, n, r)
        v_c = (v.to(self.v_basis.dtype) @ self.v_basis).to(self.dtype)  # (B, Hkv, n, r)
        for b in range(self.batch):  # only after every check: an error above changes nothing
            start, t = int(self.lengths[b]), int(take[b])
            self.k_coef[b, :, start:start + t] = k_c[b, :, :t]
            self.v_coef[b, :, start:start + t] = v_c[b, :, :t]
        self.lengths += take.to(torch.int32)

    def reader(self):
        return LowRankReader(self.k_coef, self.k_basis, self.v_coef, self.v_basis)

    def reset(self) -> None:
        """Forget every sequence; buffers and bases are kept."""
        self.lengths.zero_()

    def basis_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_basis, self.v_basis))

    def memory_bytes(self) -> int:
        coef = sum(t.numel() * t.element_size() for t in (self.k_coef, self.v_coef))
        return coef + self.basis_bytes()

    def bytes_per_token(self) -> float:
        """What each token of a sequence costs (all heads, K and V coefficients): Hkv * 2 * r * bytes.
        The bases are a fixed cost on top (basis_bytes)."""
        return (self.memory_bytes() - self.basis_bytes()) / (self.batch * self.max_len)


class LowRankReader:
    """Coefficients (B, Hkv, Nmax, r) and bases (Hkv, D, r) / (Hkv, Dv, r); rebuilds one tile."""

    def __init__(self, k_coef, k_basis, v_coef, v_basis):
        self.k_coef, self.k_basis, self.v_coef, self.v_basis = k_coef, k_basis, v_coef, v_basis
        self.batch, self.heads_kv, self.capacity, _ = k_coef.shape
        self.head_dim, self.head_dim_v = k_basis.shape[1], v_basis.shape[1]

    def read(self, j0, j1, dtype):
        work = torch.float64 if dtype == torch.float64 else torch.float32
        k = self.k_coef[:, :, j0:j1].to(work) @ self.k_basis.mT.to(work)  # (B, Hkv, Bc, r) @ (Hkv, r, D)
        v = self.v_coef[:, :, j0:j1].to(work) @ self.v_basis.mT.to(work)  # -> (B, Hkv, Bc, Dv)
        return k.to(dtype), v.to(dtype)
