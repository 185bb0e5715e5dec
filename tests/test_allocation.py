"""Per-(layer, KV head) calibrated budgets: allocation objectives, the backend's use of `budgets_LHF`,
recalibration, total-mass recall, and the per-length study tables / plot."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kv_cache import LayerKV
from squeeze_jax.attention.context import (
    ContextAttention,
    ContextState,
    LayerIndex,
    calibrated_head_keys,
    total_mass_recall,
)
from squeeze_jax.eval import plots, study_table
from squeeze_jax.index import IndexConfig, build_index_from_kv
from squeeze_jax.index.build import recalibrate_index
from squeeze_jax.index.calibrate import allocate_budgets, greedy_max_mean


def test_greedy_max_mean_is_optimal_on_concave_curves():
    rng = np.random.default_rng(0)
    inc = rng.uniform(0.0, 1.0, size=(3, 8))
    R = np.concatenate([np.zeros((3, 1)), np.cumsum(np.sort(inc, axis=1)[:, ::-1], axis=1)], axis=1)
    R /= R[:, -1:]
    total = 10
    best = max(sum(R[p, b[p]] for p in range(3)) for b in itertools.product(range(9), repeat=3) if sum(b) == total)
    got = greedy_max_mean(R, np.zeros(3, np.int64), 8, total)
    assert got.sum() == total and sum(R[p, got[p]] for p in range(3)) == pytest.approx(best)


def test_greedy_crosses_a_flat_stretch_before_a_jump():
    R = np.array([[0.0, 0.0, 0.0, 0.9, 0.9], [0.0, 0.2, 0.3, 0.35, 0.4]])
    got = greedy_max_mean(R, np.zeros(2, np.int64), 4, 3)
    assert got.tolist() == [3, 0]


def test_mean_objective_beats_maxmin_on_mean_recall_and_keeps_the_total():
    rng = np.random.default_rng(1)
    L, H, NB, bk, n_fixed = 2, 3, 40, 16, 32
    steep = rng.uniform(0.5, 8.0, size=(L, H, 1))
    x = np.arange(1, NB + 1)[None, None, :]
    recall = 1.0 - np.exp(-x / steep) * rng.uniform(0.5, 1.0, size=(L, H, 1))
    kw = dict(fraction=0.125, context_len=NB * bk, n_fixed=n_fixed, n_clustered=NB * bk - n_fixed, block_k=bk)
    b_mean, rep_mean = allocate_budgets(recall, objective="mean", **kw)
    b_mm, rep_mm = allocate_budgets(recall, objective="maxmin", **kw)
    assert b_mean.sum() == b_mm.sum() == rep_mean["uniform_budget_keys"] * L * H
    assert rep_mean["recall_allocated_mean"] >= rep_mm["recall_allocated_mean"] - 1e-12
    assert rep_mean["recall_allocated_mean"] >= rep_mean["recall_uniform_mean"] - 1e-12
    assert rep_mm["recall_allocated_min"] >= rep_mean["recall_allocated_min"] - 1e-12
    with pytest.raises(ValueError, match="objective"):
        allocate_budgets(recall, objective="median", **kw)


def test_calibrated_head_keys_exact_and_interpolated():
    budgets_HF = jnp.asarray([[96, 32], [160, 96]], jnp.int32)  # fractions (0.25, 0.125); 1024 keys, 32 fixed
    got = np.asarray(calibrated_head_keys(budgets_HF, (0.25, 0.125), jnp.asarray([0.125, 0.25, 0.1875, 1.0, 0.0625]),
                                          1024, 32, 992))
    np.testing.assert_allclose(got[0], [32, 96])
    np.testing.assert_allclose(got[1], [96, 160])
    np.testing.assert_allclose(got[2], [64, 128], rtol=1e-6)  # halfway (in kept keys) between the two columns
    np.testing.assert_allclose(got[3], [992, 992])  # budget 1 keeps everything
    np.testing.assert_allclose(got[4], [32 / 3, 32], rtol=1e-6)  # a third of the way from nothing to 1/8
    with pytest.raises(ValueError, match="calibrated index"):
        calibrated_head_keys(None, (), jnp.asarray([0.125]), 1024, 32, 992)


def test_total_mass_recall_matches_a_joint_softmax():
    rng = np.random.default_rng(2)
    s_ctx, s_user = rng.normal(size=(4, 30)) * 3, rng.normal(size=(4, 5)) * 3
    kept = rng.random((4, 30)) < 0.4
    p_ctx = np.exp(s_ctx - s_ctx.max(-1, keepdims=True))
    recall = (p_ctx * kept).sum(-1) / p_ctx.sum(-1)
    lse = lambda s: np.log(np.exp(s).sum(-1))  # noqa: E731
    joint = np.exp(np.concatenate([s_ctx, s_user], -1))
    want = ((joint[:, :30] * kept).sum(-1) + joint[:, 30:].sum(-1)) / joint.sum(-1)
    got = total_mass_recall(jnp.asarray(recall), jnp.asarray(lse(s_ctx)), jnp.asarray(lse(s_user)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope="module")
def small_index():
    L, H, G, S, D, window = 2, 2, 2, 320, 16, 12
    ks = jax.random.split(jax.random.key(0), 3)
    k = jax.random.normal(ks[0], (L, H, S, D)) * jnp.linspace(0.5, 2.0, L * H).reshape(L, H, 1, 1)
    v = jax.random.normal(ks[1], (L, H, S, D))
    q = jax.random.normal(ks[2], (L, window, H * G, D)) * 2.0
    cfg = IndexConfig(centroid_fraction=0.1, iters=3, n_sink=4, window=window, budgets=(0.25, 0.125),
                      budget_objective="maxmin", progress=False)
    return build_index_from_kv(k, v, q, cfg), q, cfg


def test_backend_uses_calibrated_blocks_per_head(small_index):
    index, _, _ = small_index
    budgets = np.asarray(index.budget(0.25))  # [L, H] clustered keys
    assert len(set(budgets.ravel().tolist())) > 1  # heads differ
    uni = ContextAttention(max_budget=0.25, use_pallas=False)
    cal = ContextAttention(max_budget=0.25, use_pallas=False, allocation="calibrated")
    budget_B = jnp.full((3,), 0.25, jnp.float32)
    fixed_blocks = -(-index.n_fixed // 16)
    total_cal = total_uni = 0
    for layer in range(index.n_layers):
        idx = LayerIndex.of(jax.tree.map(lambda a, i=layer: a[i], index))
        k_cal, cap_cal = cal._k_blocks(idx, budget_B)
        k_uni, cap_uni = uni._k_blocks(idx, budget_B)
        np.testing.assert_array_equal(k_cal[0], fixed_blocks + budgets[layer] // 16)
        assert cap_cal >= int(k_cal.max()) and cap_cal >= cap_uni
        total_cal += int(k_cal[0].sum())
        total_uni += int(k_uni[0].sum())
    assert abs(total_cal - total_uni) <= index.n_layers * index.n_kv_heads  # same total up to rounding


def test_calibrated_attention_runs_with_fidelity(small_index):
    index, _, _ = small_index
    B, T, H, G, D = 1, 2, 2, 2, 16
    q = jax.random.normal(jax.random.key(5), (B, T, H * G, D))
    kk = jax.random.normal(jax.random.key(6), (B, T, H, D))
    kv = LayerKV(jnp.zeros((B, 8, H, D)), jnp.zeros((B, 8, H, D)))
    layer = jax.tree.map(lambda a: a[0], index)
    for policy in ("squeezed", "oracle_key"):
        backend = ContextAttention(policy=policy, max_budget=0.25, use_pallas=False, fidelity=True,
                                   allocation="calibrated")
        run = jax.jit(lambda st, backend=backend: backend(q, kk, kk, kv, jnp.zeros((B,), jnp.int32),
                                                          jnp.full((B,), T, jnp.int32), jnp.zeros((B, T), jnp.int32),
                                                          st))
        out, _, aux = run(ContextState(layer, jnp.full((B,), 0.125)))
        assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))
        assert 0.0 < float(aux["recall"]) <= 1.0 + 1e-6
        assert float(aux["recall"]) - 1e-6 <= float(aux["recall_total"]) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="allocation"):
        ContextAttention(allocation="per-layer")


def test_calibrated_needs_a_calibrated_index(small_index):
    index, _, _ = small_index
    bare = dataclasses.replace(index, budgets_LHF=None, log_threshold_LH=None, budget_fractions=())
    layer = jax.tree.map(lambda a: a[0], bare)
    backend = ContextAttention(max_budget=0.25, use_pallas=False, allocation="calibrated")
    q = jnp.zeros((1, 1, 4, 16))
    k = jnp.zeros((1, 1, 2, 16))
    kv = LayerKV(jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16)))
    args = (q, k, k, kv, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32),
            ContextState(layer, jnp.full((1,), 0.125)))
    with pytest.raises(ValueError, match="calibrated index"):
        backend(*args)
    # "auto" falls back to uniform without budgets and uses them when present
    auto = ContextAttention(max_budget=0.25, use_pallas=False, allocation="auto")
    assert auto(*args)[0].shape == q.shape
    assert not auto._calibrated(LayerIndex.of(layer))
    assert auto._calibrated(LayerIndex.of(jax.tree.map(lambda a: a[0], index)))


def test_recalibrate_matches_a_fresh_build(small_index):
    index, q, cfg = small_index
    re_idx, report = recalibrate_index(index, q, cfg.replace(budget_objective="mean"))
    assert report["budgets"][0]["objective"] == "mean"
    assert re_idx.budgets_LHF.shape == index.budgets_LHF.shape
    np.testing.assert_array_equal(np.asarray(re_idx.budgets_LHF).sum(axis=(0, 1)),
                                  np.asarray(index.budgets_LHF).sum(axis=(0, 1)))
    assert report["budgets"][0]["recall_allocated_mean"] >= report["budgets"][0]["recall_uniform_mean"] - 1e-9
    same, _ = recalibrate_index(index, q, cfg)
    np.testing.assert_array_equal(np.asarray(same.budgets_LHF), np.asarray(index.budgets_LHF))
    with pytest.raises(ValueError, match="q_window"):
        recalibrate_index(index, q[:, :3], cfg)


def _fake_rows():
    rows = []
    for length in (1024, 2048):
        for ctx in ("a", "b"):
            for name, policy, r in (("uniform", "squeezed", 0.8), ("ref: oracle_key", "oracle_key", 0.9)):
                pts = [{"budget": b, "recall": r + b, "recall_total": r + b + 0.05, "kept_fraction": b,
                        "bytes_fraction": b + 0.01, "recall_per_layer": [r], "out_rel_err": 0.1}
                       for b in (0.0625, 0.125)]
                rows.append({"context": f"{ctx}-{length}", "variant": name, "options": {"policy": policy},
                             "context_len": length, "modes": {"decode": pts}})
    return rows


def test_length_tables_and_recall_plot(tmp_path):
    class Cfg:
        variants = ({"name": "uniform"}, {"name": "ref: oracle_key"})
        targets = (0.125, 0.0625)
        modes = ("decode",)

    rows = _fake_rows()
    curves = study_table.length_curves(rows, "decode")
    assert sorted(curves) == [1024, 2048] and curves[1024]["uniform"][1]["recall"] == pytest.approx(0.925)
    assert study_table.recall_at_bytes(curves[1024]["uniform"], 0.1) == pytest.approx(0.8 + 0.09)
    assert study_table.recall_at_bytes(curves[1024]["uniform"], 0.5) is None
    md = study_table.length_tables_markdown(Cfg, rows)
    assert "## decode, 2048-token contexts" in md and "| uniform | 2 | 0.925 | 0.975 | 0.135 |" in md
    path = plots.plot_recall_vs_budget(rows, tmp_path / "r.png", title="t")
    assert path is not None and path.stat().st_size > 1000


def test_answer_agreement_counts_only_dense_correct_prompts():
    def rec(method, policy, budget, answers, correct):
        return {"task": "passkey", "length": 4096, "seed": 0, "method": method, "policy": policy,
                "budget": budget, "answers": answers, "correct": correct}

    records = [rec("dense", "dense", 0.125, [" 12345. Remember it.", "x", " blue.\n\nThe"], [True, False, True]),
               rec("sq", "squeezed", 0.125, [" 12345. The key", "x", " red."], [True, False, False]),
               rec("sq", "squeezed", 0.0625, [" 12345. Remember it.", "y", " blue.\n\nThe"], [True, False, True])]
    got = {e["budget"]: e for e in study_table.answer_agreement(records)}
    assert got[0.125]["dense_correct"] == 2 and got[0.125]["same_as_dense"] == 1 and got[0.125]["correct"] == 1
    assert got[0.125]["same_text"] == 0
    assert got[0.0625]["same_as_dense"] == 2 and got[0.0625]["same_text"] == 2 and got[0.0625]["prompts"] == 3
    md = study_table.answers_markdown([(0, records)])
    assert "| 0 | sq | 1/8 | 3 | 2 | 1/2 | 0/2 | 1/2 |" in md
    assert study_table.answer_span(" 76048. Remember it.") == "76048"
    rows = [{"context": "a", "variant": "v", "n": 1}, {"context": "a", "variant": "v", "n": 2}]
    assert study_table.dedupe_rows(rows) == rows[:1]
