"""Online index pieces the backend uses: padded-row estimates, per-head traced budgets, per-head block counts,
each against its numpy reference, plus A-shape expressed as forced vertical-slash entries."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.vertical_slash import vertical_slash_key_counts
from squeeze_jax.minference import patterns as P


def test_padded_row_estimate_matches_numpy_and_unpadded():
    rng = np.random.default_rng(0)
    B, H, T, G, D = 3, 2, 150, 2, 32
    q = rng.standard_normal((B, H, T, G, D)).astype(np.float32)
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    n = np.array([150, 97, 40], np.int32)
    vert, slash = P.vertical_slash_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(n), last_q=64)
    vert_np, slash_np = P.vertical_slash_scores_np(q, k, n, last_q=64)
    np.testing.assert_allclose(np.asarray(vert), vert_np, atol=2e-5)
    np.testing.assert_allclose(np.asarray(slash), slash_np, atol=2e-5)
    assert np.all(vert_np[1, :, 97:] == 0) and np.all(slash_np[2, :, 40:] == 0)  # nothing past a row's end
    np.testing.assert_allclose(slash_np.sum(-1)[:, 0], np.minimum(n, 64) * G, rtol=1e-9)
    full_v, full_s = P.vertical_slash_scores(jnp.asarray(q[:1]), jnp.asarray(k[:1]), last_q=64)
    np.testing.assert_allclose(np.asarray(vert[:1]), np.asarray(full_v), atol=1e-5)
    np.testing.assert_allclose(np.asarray(slash[:1]), np.asarray(full_s), atol=1e-5)


def test_per_head_budgets_match_numpy_and_static_selection():
    rng = np.random.default_rng(1)
    vert = rng.random((2, 4, 300)).astype(np.float32)
    slash = rng.random((2, 4, 300)).astype(np.float32)
    n_v, n_s = np.array([40, 10, 64, 30]), np.array([25, 60, 100, 7])
    f_v, f_s = np.array([30, 10, 0, 30]), np.array([20, 60, 1, 7])  # heads 1 and 3: A-shape (all forced)
    kw = dict(cap_vertical=64, cap_slash=100)
    cols, offs = P.select_vertical_slash_budgets(jnp.asarray(vert), jnp.asarray(slash), n_v, n_s, f_v, f_s, **kw)
    cols_np, offs_np = P.select_vertical_slash_budgets_np(vert, slash, n_v, n_s, f_v, f_s, **kw)
    np.testing.assert_array_equal(np.asarray(cols), cols_np)
    np.testing.assert_array_equal(np.asarray(offs), offs_np)
    assert cols_np[0, 1, :10].tolist() == list(range(10)) and np.all(cols_np[0, 1, 10:] == 300)
    assert sorted(offs_np[1, 3][offs_np[1, 3] < 300].tolist()) == list(range(7))
    same = P.select_vertical_slash(jnp.asarray(vert), jnp.asarray(slash), n_vertical=40, n_slash=25,
                                   n_sink_cols=30, n_local_diags=20)
    uniform = P.select_vertical_slash_budgets(jnp.asarray(vert), jnp.asarray(slash), 40, 25, 30, 20,
                                              cap_vertical=40, cap_slash=25)
    for a, b in zip(same, uniform):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_per_head_block_counts_match_numpy():
    rng = np.random.default_rng(2)
    T, G = 400, 2
    q = rng.standard_normal((1, 3, T, G, 32)).astype(np.float32)
    k = rng.standard_normal((1, 3, T, 32)).astype(np.float32)
    n_b = np.array([1, 3, 5])
    idx = P.block_sparse_index(jnp.asarray(q), jnp.asarray(k), jnp.asarray(n_b)[None], top_k_blocks=5)
    ids, cnt = P.block_sparse_index_np(q, k, n_b[None], top_k_blocks=5)
    np.testing.assert_array_equal(np.asarray(idx.block_ids), ids)
    np.testing.assert_array_equal(np.asarray(idx.block_count), cnt)
    assert np.all(cnt[0, 0] == 1) and np.all(ids[0, 0, :, 0] == np.arange(-(-T // 64)))  # the diagonal only


def test_a_shape_as_forced_vertical_slash_covers_sinks_and_window():
    T, sinks, local, bq = 300, 8, 40, 64
    z = jnp.zeros((1, 1, T))
    cols, offs = P.select_vertical_slash_budgets(z, z, sinks, local, sinks, local, cap_vertical=16, cap_slash=64)
    idx = P.vertical_slash_index_from_selection(cols, offs, T, block_q=bq, block_k=bq)
    mult = np.asarray(vertical_slash_key_counts(idx.tile_start, idx.tile_end, idx.tile_count, idx.column_index,
                                                idx.column_count, T, block_k=bq))[0, 0]
    assert mult.max() == 1  # disjoint tiles and columns
    qpos, kpos = np.arange(T)[:, None], np.arange(T)[None, :]
    seen = (mult[qpos // bq, kpos] > 0) & (kpos <= qpos)
    want = (kpos <= qpos) & ((kpos < sinks) | (kpos > qpos - local))
    assert np.all(seen >= want)
    assert np.all(~(seen & ~want) | (kpos > (qpos // bq) * bq - local))  # extras only from the block's band
