"""The package logic of notebooks 10-12: fa2lab.bench.backward (what the forward saves, Algorithm 2's
order, saved memory over N), fa2lab.bench.numerics (error against float64, the 2x rule, error
sources), fa2lab.bench.model_checks (a tiny Qwen3 through transformers) and the figures of
fa2lab.viz.backward, numerics and models that draw their rows."""

import pytest
import torch

from fa2lab import masks
from fa2lab.bench import backward as bw
from fa2lab.bench import numerics
from fa2lab.viz import backward as bw_fig
from fa2lab.viz import numerics as num_fig


# --- 10 backward ---------------------------------------------------------------------------

@pytest.mark.parametrize("nq, nk, bq, bk, causal, window", [(97, 97, 32, 32, True, (-1, -1)),
                                                           (40, 97, 16, 32, True, (-1, -1)),
                                                           (97, 40, 32, 8, False, (8, 0)),
                                                           (232, 232, 64, 32, False, (-1, -1))])
def test_the_drawn_schedule_is_the_one_the_backward_runs(monkeypatch, nq, nk, bq, bk, causal, window):
    """Record the non-skipped tiles fa2lab.tiled.backward actually computes, in order."""
    from fa2lab.tiled import tiled_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, nq, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, nk, 8, generator=g, requires_grad=True) for _ in range(2))
    out = tiled_attention(q, k, v, causal=causal, window_size=window, block_q=bq, block_k=bk)
    seen, real = [], masks.tile_state

    def spy(i0, i1, j0, j1, *a):
        state = real(i0, i1, j0, j1, *a)
        if state is not masks.TileState.SKIPPED:
            seen.append((i0 // bq, j0 // bk))
        return state

    monkeypatch.setattr(masks, "tile_state", spy)
    out.sum().backward()
    monkeypatch.undo()  # backward_schedule asks masks.tile_state too
    steps = bw.backward_schedule(nq, nk, bq, bk, causal=causal, window_size=window)
    assert [(s["i"], s["j"]) for s in steps] == seen and seen
    counts = bw.accumulation_counts(steps)
    assert all(c["updates"] == c["span"] for c in counts["dkv"].values())  # one column at a time
    fig = bw_fig.schedule_figure(steps, nq, nk, bq, bk)
    assert sum(z is not None for row in fig.data[0].z for z in row) == len(steps)
    assert len(bw_fig.accumulation_figure(steps).data) == 2


def test_what_the_forward_saves():
    q, k, v = (torch.randn(1, 2, 97, 16) for _ in range(3))
    tiled = bw.saved_for_backward(bw.attention_fn("tiled", True, 32), q, k, v)
    assert sorted(r["name"] for r in tiled) == ["K", "LSE", "O", "Q", "V"]
    assert dict((r["name"], r["shape"]) for r in tiled)["LSE"] == (1, 2, 97)
    naive = bw.saved_for_backward(bw.attention_fn("naive", True, 32), q, k, v)
    assert any(r["name"] == "P or S (Nq x Nk)" and r["shape"][-2:] == (97, 97) for r in naive)
    with pytest.raises(ValueError, match="expected impl 'tiled' or 'naive'"):
        bw.attention_fn("flash", True, 32)


def test_saved_memory_grows_as_n_for_tiled_and_n_squared_for_naive():
    from fa2lab.viz.sweeps import fit_slope

    rows = bw.saved_memory([64, 128, 256], heads=1, head_dim=16, block=32)
    slope = {impl: fit_slope([r["N"] for r in rows if r["impl"] == impl], [r["saved_mib"] for r in rows
                                                                           if r["impl"] == impl])
             for impl in ("tiled", "naive")}
    assert slope["tiled"] == pytest.approx(1.0, abs=0.02) and slope["naive"] > 1.6
    # Q, K, V, O in fp32 and LSE: 4*N*D*4 + N*4 bytes per head, exactly
    assert rows[0]["saved_mib"] * 2**20 == 4 * 64 * 16 * 4 + 64 * 4 and rows[0]["nxn_mib"] == 0
    assert len(bw_fig.saved_memory_figure(rows).data) == 2


def test_one_pass_against_two_passes_figure():
    """Notebook 10's GPU section: the fastest configuration per shape and pass count, drawn as measured
    bars next to the compute roof (from the committed H200 rows)."""
    from fa2lab.bench.hopper_sweep import backward_roofline_rows, fastest_per_pass, read_rows
    from fa2lab.viz.gpu import RESULTS

    rows = fastest_per_pass(backward_roofline_rows(read_rows(RESULTS / "fused-bwd-tma-20261204/hopper-bwd.jsonl")))
    assert {r["passes"] for r in rows} == {1, 2} and len(rows) == 14  # 7 shapes x 2
    shape = lambda r: (r["N"], r["causal"], r["H"])  # noqa: E731
    for r in rows:  # the fastest of its kind: no row of the same kind and shape is faster
        assert not any(o["measured_ms"] < r["measured_ms"] for o in backward_roofline_rows(
            read_rows(RESULTS / "fused-bwd-tma-20261204/hopper-bwd.jsonl"))
            if shape(o) == shape(r) and o["passes"] == r["passes"])
    fig = bw_fig.passes_figure(rows)
    assert len(fig.data) == 4 and all(len(trace.x) == 7 for trace in fig.data)
    # the notebook's default: the D=128 rows and the wide one pass's D=256 rows (the probe left out)
    from fa2lab.bench.hopper_sweep import read_results

    both = fastest_per_pass(backward_roofline_rows(read_results(
        RESULTS, "fused-bwd-tma-20261204/hopper-bwd.jsonl, wide-bwd-20261204/keys/hopper-bwd.jsonl,missing.jsonl")))
    wide = [r for r in both if r["D"] == 256]
    assert len(both) == 24 and {(r["passes"], r["config"].split()[0]) for r in wide} == {(1, "wide"), (2, "two-pass")}
    assert read_results(RESULTS, "") == []


# --- 11 numerics ---------------------------------------------------------------------------

def test_error_rows_follow_the_rule_and_name_what_cannot_run():
    rows = numerics.error_rows([1, 97], [1.0, 8.0], ["float32", "bfloat16"], ["reference", "tiled", "sdpa"],
                               heads=2, head_dim=40)
    assert len(rows) == 2 * 2 * 2 * 3
    assert all(r["within_rule"] for r in rows), [r for r in rows if not r["within_rule"]]
    bf16 = [r["err"] for r in rows if r["dtype"] == "bfloat16" and r["logit_scale"] == 8.0 and r["N"] == 97]
    fp32 = [r["err"] for r in rows if r["dtype"] == "float32" and r["logit_scale"] == 8.0 and r["N"] == 97]
    assert min(bf16) > 100 * max(fp32)  # bf16's 8 bits of mantissa against fp32's 24
    for fig in (num_fig.error_figure(rows), num_fig.error_figure(rows, "logit_scale"), num_fig.ratio_figure(rows)):
        assert fig.data
    with pytest.raises(ValueError, match="unknown backend"):
        numerics.error_rows([8], [1.0], ["float32"], ["flash"])
    with pytest.raises(ValueError, match="unknown dtype"):
        numerics.error_rows([8], [1.0], ["float8"], ["tiled"])


def test_triton_off_cuda_is_reported_not_hidden(monkeypatch):
    from fa2lab.backends import BACKENDS, Case

    q = torch.randn(1, 1, 8, 16)
    why = BACKENDS["triton"].unsupported(Case.of(q, q, q, True, (-1, -1), False))
    rows = numerics.error_rows([8], [1.0], ["float32"], ["triton"], heads=1, head_dim=16)
    assert (rows[0]["err"] is None) == (why is not None) and rows[0]["skipped"] == why


def test_error_sources():
    rows = numerics.error_sources(128, "bfloat16", 8.0, heads=1, head_dim=32, block=32)
    err = [r["err"] for r in rows]
    assert len(rows) == 5 and rows[1]["source"] == "+ P rounded before P V"
    assert err[1] >= 0.5 * err[0]  # P's rounding adds to the inputs' (never removes much)
    assert err[2] > err[0]  # PyTorch in bf16 rounds more than the inputs alone
    assert err[3] <= 2 * err[2]  # fa2lab's fp32 accumulation: within the rule
    assert err[4] < 1e-5 < err[0]  # the order of fp32 accumulation is far below bf16 rounding
    assert num_fig.sources_figure(rows).data


# --- 12 models -----------------------------------------------------------------------------

def test_models_choices_agreement_and_memory():
    pytest.importorskip("transformers")
    from fa2lab.bench import model_checks as models
    from fa2lab.viz import models as model_figs

    model = models.tiny_model(layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16)
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    choices = models.layer_choices(model, ids)
    assert [c["layer"] for c in choices] == [0, 1] and all(c["N"] == 23 and c["reason"] for c in choices)
    from fa2lab.backends import Case
    from fa2lab.models import select_backend

    q = torch.empty(1, 2, 23, 16)
    assert choices[0]["backend"] == select_backend(Case.of(q, q[:, :1], q[:, :1], True, (-1, -1), False)).name
    agreement = {r["impl"]: r for r in models.logits_agreement(model, ids)}
    assert agreement["fa2lab"]["within_rule"] and agreement["eager"]["max_abs_err"] < 1e-4
    mem = models.prefill_memory(model, [32], ["fa2lab", "eager"])
    assert [r["impl"] for r in mem] == ["fa2lab", "eager"] and all(r["N"] == 32 for r in mem)
    assert model_figs.memory_figure(mem).data is not None and model_figs.agreement_figure(list(agreement.values())).data


def test_captured_log_collects_fa2lab_lines():
    import logging

    from fa2lab.bench.model_checks import captured_log

    with captured_log() as lines:
        logging.getLogger("fa2lab").info("fa2lab: a line")
        logging.getLogger("other").warning("not ours")
    assert lines == ["fa2lab: a line"]
