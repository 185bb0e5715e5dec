"""Cluster-ordered layout, coarse level and the whole build from K/V: contiguity, positions, attention."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeeze_jax.index.build import IndexConfig, build_index_from_kv, build_index_from_kv_report
from squeeze_jax.index.hierarchy import _cap_one, build_hierarchy, max_fine_per_coarse
from squeeze_jax.index.kmeans import kmeans
from squeeze_jax.index.layout import LayoutSizes, build_layout

P, S, D, C = 3, 300, 16, 12
N_SINK, WINDOW = 4, 20


def _random_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(P, S, D)).astype(np.float32)
    v = rng.normal(size=(P, S, D)).astype(np.float32)
    M = S - N_SINK - WINDOW
    assign = np.stack([rng.permutation(np.arange(M) % C) for _ in range(P)]).astype(np.int32)
    cents = np.stack(
        [[k[p, N_SINK : S - WINDOW][assign[p] == c].mean(0) for c in range(C)] for p in range(P)]
    )
    return k, v, assign, cents.astype(np.float32)


def _dense_attention(q_TD, k_ND, v_ND, valid_N):
    logits = q_TD @ k_ND.T / np.sqrt(q_TD.shape[-1])
    logits = np.where(valid_N[None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v_ND


@pytest.mark.parametrize("reorder", [False, True])
def test_layout_is_a_cluster_contiguous_permutation(reorder):
    k, v, assign, cents = _random_problem()
    rng = np.random.default_rng(1)
    order = np.stack([rng.permutation(C) for _ in range(P)]).astype(np.int32) if reorder else None
    lay = build_layout(
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.asarray(assign),
        jnp.asarray(cents),
        n_sink=N_SINK,
        window=WINDOW,
        block_pad=64,
        fine_order_PC=None if order is None else jnp.asarray(order),
    )
    sizes = LayoutSizes(S, N_SINK, WINDOW, 64)
    assert (lay.n_fixed, lay.fixed_pad, lay.n_clustered) == (24, 64, S - 24)
    assert lay.n_pad == sizes.n_pad == 384 and lay.keys_PND.shape == (P, 384, D)
    pos = np.asarray(lay.positions_PN)
    keys, vals = np.asarray(lay.keys_PND), np.asarray(lay.values_PND)
    start, size = np.asarray(lay.cluster_start_PC), np.asarray(lay.cluster_size_PC)
    for p in range(P):
        fixed = list(range(N_SINK)) + list(range(S - WINDOW, S))
        np.testing.assert_array_equal(pos[p, :24], fixed)
        assert np.all(pos[p, 24:64] == -1) and np.all(pos[p, 64 + S - 24 :] == -1)
        valid = pos[p] >= 0
        assert sorted(pos[p][valid].tolist()) == list(range(S))
        np.testing.assert_array_equal(keys[p][valid], k[p][pos[p][valid]])
        np.testing.assert_array_equal(vals[p][valid], v[p][pos[p][valid]])
        assert np.all(keys[p][~valid] == 0)
        old_of_new = order[p] if reorder else np.arange(C)
        assert start[p, 0] == 64 and np.all(start[p, 1:] == start[p, :-1] + size[p, :-1])
        for c in range(C):
            seg = pos[p, start[p, c] : start[p, c] + size[p, c]]
            assert np.all(assign[p][seg - N_SINK] == old_of_new[c])
            assert np.all(np.diff(seg) > 0)  # token order inside a cluster
            np.testing.assert_allclose(np.asarray(lay.centroids_PCD)[p, c], cents[p, old_of_new[c]])
            r = np.linalg.norm(k[p][seg] - cents[p, old_of_new[c]], axis=-1).max()
            np.testing.assert_allclose(np.asarray(lay.radius_PC)[p, c], r, rtol=1e-5)


def test_attention_over_reordered_kv_equals_original():
    k, v, assign, cents = _random_problem(2)
    lay = build_layout(
        jnp.asarray(k), jnp.asarray(v), jnp.asarray(assign), jnp.asarray(cents), n_sink=N_SINK, window=WINDOW
    )
    q = np.random.default_rng(3).normal(size=(P, 5, D)).astype(np.float32) * 3
    for p in range(P):
        want = _dense_attention(q[p], k[p], v[p], np.ones(S, bool))
        valid = np.asarray(lay.positions_PN[p]) >= 0
        got = _dense_attention(q[p], np.asarray(lay.keys_PND[p]), np.asarray(lay.values_PND[p]), valid)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_layout_rejects_bad_shapes():
    k, v, assign, cents = _random_problem()
    with pytest.raises(ValueError, match="assign_PM"):
        build_layout(
            jnp.asarray(k),
            jnp.asarray(v),
            jnp.asarray(assign[:, 1:]),
            jnp.asarray(cents),
            n_sink=N_SINK,
            window=WINDOW,
        )
    with pytest.raises(ValueError, match="no token to cluster"):
        LayoutSizes(10, 4, 6, 64)


def test_hierarchy_orders_fine_clusters_by_parent_and_caps_them():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 400, 8))
    fine = kmeans(x, 40, key=jax.random.PRNGKey(1), iters=10)
    n_coarse, cap_factor = 8, 1.0  # cap = average: forces re-homing into a perfectly balanced level
    h = build_hierarchy(
        fine.centroids_PCD,
        fine.sizes_PC,
        n_coarse,
        key=jax.random.PRNGKey(2),
        iters=10,
        cap_factor=cap_factor,
    )
    cap = max_fine_per_coarse(40, n_coarse, cap_factor)
    assert h.max_fine_per_coarse == cap == 5
    first, count = np.asarray(h.coarse_first_PCc), np.asarray(h.coarse_count_PCc)
    parent, order = np.asarray(h.coarse_of_fine_PC), np.asarray(h.fine_order_PC)
    fc, fs = np.asarray(fine.centroids_PCD, np.float64), np.asarray(fine.sizes_PC, np.float64)
    for p in range(2):
        assert sorted(order[p].tolist()) == list(range(40))
        assert np.all(count[p] >= 1) and np.all(count[p] <= cap) and count[p].sum() == 40
        np.testing.assert_array_equal(first[p], np.cumsum(count[p]) - count[p])
        for j in range(n_coarse):
            members = order[p, first[p, j] : first[p, j] + count[p, j]]
            assert np.all(parent[p, members] == j)
            want = (fc[p, members] * fs[p, members, None]).sum(0) / fs[p, members].sum()
            np.testing.assert_allclose(np.asarray(h.coarse_centroids_PCcD)[p, j], want, rtol=1e-4, atol=1e-5)


def test_capacity_rehoming_moves_the_farthest_members():
    rng = np.random.default_rng(0)
    near = rng.normal(size=(10, 4)) * 0.01
    near[:4] *= 0.01  # the 4 members closest to the centroid of coarse cluster 0
    pts = np.concatenate([near, rng.normal(size=(2, 4)) * 0.01 + 5.0, rng.normal(size=(1, 4)) * 0.01 - 5.0])
    assign = np.array([0] * 10 + [1, 1] + [2])
    out = _cap_one(jnp.asarray(pts, jnp.float32), jnp.ones(13), jnp.asarray(assign), n_coarse=3, cap=5)
    out = np.asarray(out)
    counts = np.bincount(out, minlength=3)
    assert counts.max() <= 5 and counts.min() >= 1 and counts.sum() == 13
    assert np.all(out[:4] == 0)  # the closest members stay
    assert np.all(out[10:12] == 1) and out[12] == 2


def test_build_from_kv_end_to_end():
    L, H, G, S_, D_ = 2, 2, 2, 1024, 16
    rng = np.random.default_rng(4)
    k = jnp.asarray(rng.normal(size=(L, H, S_, D_)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(L, H, S_, D_)), jnp.bfloat16)
    cfg = IndexConfig.load("default").replace(
        window=60, n_sink=4, hierarchical=True, layer_group=1, progress=False, iters=8, budgets=(0.25, 0.125)
    )
    q = jnp.asarray(rng.normal(size=(L, cfg.window, H * G, D_)), jnp.bfloat16)
    index, report = build_index_from_kv_report(k, v, q, cfg, model_fingerprint="m", context_token_hash="t")
    index.check()
    assert index.keys_LHND.dtype == jnp.bfloat16 and index.n_fixed == 64 and index.fixed_pad == 64
    assert index.n_clusters == round(0.05 * (S_ - 64)) and index.hierarchical
    assert len(report.group_seconds) == 2 and set(report.stage_seconds) >= {"kmeans", "layout", "calibration"}
    assert index.budgets_LHF.shape == (L, H, 2) and index.budget(0.125).shape == (L, H)
    assert json.loads(index.info.build_config_json)["window"] == 60
    sizes = np.asarray(index.cluster_size_LHC)
    assert np.all(sizes >= 1) and np.all(sizes.sum(-1) == S_ - 64)
    qq = rng.normal(size=(4, D_)).astype(np.float32)
    for layer in range(L):
        for h in range(H):
            pos = np.asarray(index.positions_LHN[layer, h])
            got = _dense_attention(
                qq,
                np.asarray(index.keys_LHND[layer, h], np.float32),
                np.asarray(index.values_LHND[layer, h], np.float32),
                pos >= 0,
            )
            want = _dense_attention(
                qq,
                np.asarray(k[layer, h], np.float32),
                np.asarray(v[layer, h], np.float32),
                np.ones(S_, bool),
            )
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # without window queries: no calibration, same clustering
    plain = build_index_from_kv(k, v, None, cfg)
    assert not plain.calibrated and plain.budget_fractions == ()
    np.testing.assert_array_equal(np.asarray(plain.positions_LHN), np.asarray(index.positions_LHN))


def test_build_validates_before_work():
    cfg = IndexConfig.load("default").replace(progress=False)
    k = jnp.zeros((1, 1, 512, 16))
    with pytest.raises(ValueError, match="max_context"):
        build_index_from_kv(k, k, None, cfg, max_context=256)
    with pytest.raises(ValueError, match="must match"):
        build_index_from_kv(k, k.astype(jnp.bfloat16), None, cfg)
    with pytest.raises(ValueError, match="q_window"):
        build_index_from_kv(k, k, jnp.zeros((1, 7, 2, 16)), cfg)
    with pytest.raises(ValueError, match="budget fraction"):
        build_index_from_kv(k, k, jnp.zeros((1, cfg.window, 2, 16)), cfg)
    with pytest.raises(TypeError, match="IndexConfig"):
        build_index_from_kv(k, k, None, {"window": 4})
    with pytest.raises(ValueError, match="unknown IndexConfig fields"):
        IndexConfig.from_dict({"windw": 3})
    with pytest.raises(ValueError, match="unknown index preset"):
        IndexConfig.load("nope")
    with pytest.raises(ValueError, match="budgets"):
        IndexConfig(budgets=(0.0,))


def test_capture_chunk_shrinks_for_long_contexts():
    from squeeze_jax.index.capture import CHUNK_LOGIT_BYTES, effective_chunk

    assert effective_chunk(2048, 9, 8192) == 2048  # small model, short context: unchanged
    c = effective_chunk(2048, 32, 130048)  # 8B-class at 127K: the chunk's float32 logits must fit
    assert c % 16 == 0 and 16 <= c < 2048 and 4 * 32 * 130048 * c <= CHUNK_LOGIT_BYTES
    assert effective_chunk(2048, 64, 10**7) == 16  # never below one 16-token tile
