"""Calibration: stable probabilities, global threshold, recall curves vs brute force, budget allocation."""

import jax.numpy as jnp
import numpy as np
import pytest

from squeeze_jax.index.calibrate import (
    allocate_budgets,
    global_log_threshold,
    kept_fraction_at_threshold,
    layer_calibration_stats,
    log_cluster_probs,
    uniform_budget_blocks,
)
from squeeze_jax.index.layout import build_layout


def test_cluster_probabilities_are_stable_and_normalised():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 50)).astype(np.float32)
    n = rng.integers(1, 30, size=(3, 50)).astype(np.float32)
    got = np.exp(np.asarray(log_cluster_probs(jnp.asarray(z), jnp.log(jnp.asarray(n)))))
    naive = np.exp(z) / (n * np.exp(z)).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, naive, rtol=1e-5)
    np.testing.assert_allclose((got * n).sum(-1), 1.0, rtol=1e-5)
    huge = np.asarray(log_cluster_probs(jnp.asarray(z * 1e4), jnp.log(jnp.asarray(n))))  # exp would overflow
    assert np.all(np.isfinite(huge)) and np.all(huge <= 0)
    np.testing.assert_allclose((np.exp(huge) * n).sum(-1), 1.0, rtol=3e-3)  # f32 ulp at |z| ~ 3e4 is 2e-3


def test_global_threshold_is_a_size_weighted_quantile():
    rng = np.random.default_rng(1)
    v = rng.uniform(1e-6, 1e-3, size=(4, 2, 500))
    w = rng.integers(1, 10, size=v.shape)
    for q in (0.5, 0.9):
        thr = global_log_threshold(v, w, q)
        kept = w[np.log(v) >= thr].sum() / w.sum()
        assert abs(kept - (1 - q)) < 0.01
        per_layer = kept_fraction_at_threshold(v, w, thr)
        np.testing.assert_allclose((per_layer * w.sum(axis=(1, 2))).sum() / w.sum(), kept)
    with pytest.raises(ValueError, match="quantile"):
        global_log_threshold(v, w, 1.0)


def _reference_stats(keys, pos, cents, start, size, q, qpos, n_fixed, fixed_pad, n_clustered, block_k):
    bk = block_k
    H, N, D = keys.shape
    T, Hq, _ = q.shape
    G = Hq // H
    NB = N // bk
    prob = np.zeros((H, size.shape[1]))
    curve = np.zeros((H, NB))
    for h in range(H):
        cid = np.full(N, -1)
        for c in range(size.shape[1]):
            cid[start[h, c] : start[h, c] + size[h, c]] = c
        for t in range(T):
            best = np.full(size.shape[1], -np.inf)
            mass = np.zeros(N)
            for g in range(G):
                qq = q[t, h * G + g].astype(np.float64)
                z = cents[h] @ qq / np.sqrt(D)
                logs = z - np.log((size[h] * np.exp(z - z.max())).sum()) - z.max()
                prob[h] += np.exp(logs)
                best = np.maximum(best, logs)
                vis = (pos[h] >= 0) & (pos[h] <= qpos[t])
                lg = np.where(vis, keys[h] @ qq / np.sqrt(D), -np.inf)
                p = np.exp(lg - lg.max())
                mass += p / p.sum() / G
            score = np.where(cid >= 0, best[np.maximum(cid, 0)], -np.inf)
            score[:n_fixed] = np.inf
            bscore = score.reshape(NB, bk).max(-1)
            order = np.argsort(-bscore, kind="stable")
            curve[h] += np.cumsum(mass.reshape(NB, bk).sum(-1)[order])
    return prob / (G * T), curve / T


def test_recall_curves_match_brute_force():
    rng = np.random.default_rng(2)
    H, G, S, D, C, n_sink, window = 2, 2, 200, 16, 10, 4, 12
    k = rng.normal(size=(H, S, D)).astype(np.float32)
    M = S - n_sink - window
    assign = np.stack([rng.permutation(np.arange(M) % C) for _ in range(H)]).astype(np.int32)
    cents = np.stack(
        [[k[h, n_sink : S - window][assign[h] == c].mean(0) for c in range(C)] for h in range(H)]
    )
    lay = build_layout(
        jnp.asarray(k),
        jnp.asarray(k),
        jnp.asarray(assign),
        jnp.asarray(cents, jnp.float32),
        n_sink=n_sink,
        window=window,
        block_pad=32,
    )
    q = (rng.normal(size=(window, H * G, D)) * 2).astype(np.float32)
    qpos = np.arange(S - window, S, dtype=np.int32)
    kw = dict(n_fixed=lay.n_fixed, fixed_pad=lay.fixed_pad, n_clustered=lay.n_clustered, block_k=8)
    prob, curve = layer_calibration_stats(
        lay.keys_PND,
        lay.positions_PN,
        lay.centroids_PCD,
        lay.cluster_start_PC,
        lay.cluster_size_PC,
        jnp.asarray(q),
        jnp.asarray(qpos),
        q_chunk=5,
        **kw,
    )
    ref_prob, ref_curve = _reference_stats(
        np.asarray(lay.keys_PND),
        np.asarray(lay.positions_PN),
        np.asarray(lay.centroids_PCD, np.float64),
        np.asarray(lay.cluster_start_PC),
        np.asarray(lay.cluster_size_PC),
        q,
        qpos,
        **kw,
    )
    np.testing.assert_allclose(np.asarray(prob), ref_prob, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(curve), ref_curve, rtol=1e-4, atol=1e-5)
    c = np.asarray(curve)
    assert np.all(np.diff(c, axis=-1) >= -1e-6) and np.allclose(c[:, -1], 1.0, atol=1e-5)


def test_allocation_gives_fragile_heads_more_and_keeps_the_total():
    NB, bk, n_fixed = 64, 16, 32  # 2 fixed blocks, clustered blocks after them
    x = np.arange(1, NB + 1, dtype=np.float64)
    easy = np.minimum(1.0, 0.5 + 0.5 * np.minimum(x, 10) / 10)
    fragile = np.minimum(1.0, x / NB)
    recall = np.stack([easy, easy, easy, fragile])[None]  # [L=1, H=4, NB]
    S = NB * bk
    budget, rep = allocate_budgets(
        recall,
        fraction=0.25,
        context_len=S,
        n_fixed=n_fixed,
        n_clustered=S - n_fixed,
        block_k=bk,
        min_share=0.25,
        max_share=4.0,
    )
    uni = uniform_budget_blocks(0.25, S, n_fixed, bk)
    assert budget.shape == (1, 4) and budget.dtype == np.int32 and np.all(budget % bk == 0)
    assert budget.sum() == uni * bk * 4
    assert budget[0, 3] > budget[0, :3].max()
    assert budget.min() >= max(1, int(0.25 * uni)) * bk and budget.max() <= 4 * uni * bk
    assert rep["recall_allocated_min"] > rep["recall_uniform_min"]
    assert rep["uniform_budget_keys"] == uni * bk and len(rep["budget_keys_per_layer"]) == 1


def test_equal_heads_get_equal_budgets():
    curve = np.tile(np.linspace(0.1, 1.0, 32), (2, 3, 1))
    budget, rep = allocate_budgets(
        curve, fraction=0.5, context_len=512, n_fixed=16, n_clustered=496, block_k=16
    )
    assert np.all(budget == budget.flat[0])
    assert rep["recall_allocated_mean"] == pytest.approx(rep["recall_uniform_mean"])


def test_fraction_below_the_fixed_region_is_an_error():
    with pytest.raises(ValueError, match="always-kept fixed keys"):
        uniform_budget_blocks(1 / 16, 2048, 128, 16)
    assert uniform_budget_blocks(1 / 8, 2048, 128, 16) == 8
