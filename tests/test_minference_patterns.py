"""MInference index builders against numpy references, index invariants, the pattern search and its config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import block_key_counts
from pallas_kernels.vertical_slash import vertical_slash_key_counts
from squeeze_jax.minference import patterns as P
from squeeze_jax.minference.search import (
    HeadPattern,
    attend,
    build_index,
    build_layer_index,
    load_pattern_config,
    parse_pattern_config,
    planted_attention_sample,
    save_pattern_config,
    search_patterns,
)


def _vs_arrays(idx):
    return {
        f: np.asarray(getattr(idx, f))
        for f in ("tile_start", "tile_end", "tile_count", "column_index", "column_count")
    }


# ----------------------------------------------------------------------------------------------------
# Builders vs numpy references
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G,D,T,Lq", [(1, 64, 200, 200), (4, 128, 130, 80), (4, 64, 40, 40)])
def test_vertical_slash_scores_match_numpy(G, D, T, Lq):
    rng = np.random.default_rng(G * 7 + T)
    q = rng.standard_normal((2, 2, Lq, G, D)).astype(np.float32)
    k = rng.standard_normal((2, 2, T, D)).astype(np.float32)
    vert, slash = P.vertical_slash_scores(jnp.asarray(q), jnp.asarray(k), last_q=64)
    vert_np, slash_np = P.vertical_slash_scores_np(q, k, last_q=64)
    np.testing.assert_allclose(np.asarray(vert), vert_np, atol=2e-5)
    np.testing.assert_allclose(np.asarray(slash), slash_np, atol=2e-5)
    rows = min(64, Lq, T)
    np.testing.assert_allclose(vert_np.sum(-1), rows * G, rtol=1e-9)  # each (row, head) sums to one
    np.testing.assert_allclose(slash_np.sum(-1), rows * G, rtol=1e-9)


def test_selection_forces_sinks_and_local_diagonals():
    rng = np.random.default_rng(0)
    vert = rng.random((2, 3, 300)).astype(np.float32)
    slash = (rng.random((2, 3, 300)) * 0.5).astype(np.float32)
    kw = dict(n_vertical=40, n_slash=25, n_sink_cols=30, n_local_diags=20)
    cols, offs = P.select_vertical_slash(jnp.asarray(vert), jnp.asarray(slash), **kw)
    cols_np, offs_np = P.select_vertical_slash_np(vert, slash, **kw)
    np.testing.assert_array_equal(np.asarray(cols), cols_np)
    np.testing.assert_array_equal(np.asarray(offs), offs_np)
    assert np.all(np.isin(np.arange(30), cols_np)) and np.all(np.isin(np.arange(20), offs_np))
    assert np.all(np.diff(cols_np) > 0) and np.all(np.diff(offs_np) < 0)
    # a mass floor turns budget into capacity: weak picks become T (select nothing), forced ones stay
    floor = dict(kw, min_mass=0.0064)  # share of sum(vertical) ~ 150
    cols_f, offs_f = P.select_vertical_slash(jnp.asarray(vert), jnp.asarray(slash), **floor)
    cols_fnp, offs_fnp = P.select_vertical_slash_np(vert, slash, **floor)
    np.testing.assert_array_equal(np.asarray(cols_f), cols_fnp)
    np.testing.assert_array_equal(np.asarray(offs_f), offs_fnp)
    dropped = cols_fnp == 300
    assert 0 < dropped.sum() < dropped.size and np.all(np.isin(np.arange(30), cols_fnp))
    assert all(np.isin(cols_fnp[i][cols_fnp[i] < 300], cols_np[i]).all() for i in np.ndindex(2, 3))
    assert np.all(offs_fnp[..., :5] == 300) and np.all(np.isin(np.arange(20), offs_fnp))
    with pytest.raises(ValueError, match="n_vertical"):
        P.select_vertical_slash(
            jnp.asarray(vert), jnp.asarray(slash), n_vertical=10, n_slash=25, n_sink_cols=30, n_local_diags=20
        )
    with pytest.raises(ValueError, match="n_local_diags"):
        P.select_vertical_slash(
            jnp.asarray(vert), jnp.asarray(slash), n_vertical=40, n_slash=25, n_local_diags=0
        )


def _random_selection(rng, lead, T, n_cols, n_offs, near=None):
    cols = np.stack([np.sort(rng.choice(T, n_cols, replace=False)) for _ in range(int(np.prod(lead)))])
    pool = np.arange(near) if near else np.arange(T)
    offs = np.stack(
        [np.sort(rng.choice(pool, n_offs, replace=False))[::-1] for _ in range(int(np.prod(lead)))]
    )
    return cols.reshape(*lead, n_cols).astype(np.int32), offs.reshape(*lead, n_offs).astype(np.int32)


@pytest.mark.parametrize(
    "T,bq,bk,n_cols,n_offs,near",
    [
        (200, 64, 64, 12, 30, None),  # spread slashes: many separate ranges
        (333, 32, 64, 40, 20, 90),  # slashes near the diagonal merge; block_q != block_k
        (64, 64, 16, 64, 64, None),  # everything selected
    ],
)
def test_index_from_selection_matches_numpy(T, bq, bk, n_cols, n_offs, near):
    rng = np.random.default_rng(T)
    cols, offs = _random_selection(rng, (2, 3), T, n_cols, n_offs, near)
    idx = P.vertical_slash_index_from_selection(
        jnp.asarray(cols), jnp.asarray(offs), T, block_q=bq, block_k=bk
    )
    ref = P.vertical_slash_index_from_selection_np(cols, offs, T, block_q=bq, block_k=bk)
    got = _vs_arrays(idx)
    for name, want in ref.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert got["column_index"].shape[-1] % bk == 0
    # invariants: sorted disjoint tiles of <= block_k keys inside [0, q1); columns visible, outside every
    # tile, no duplicates
    nq = -(-T // bq)
    for b, h, i in np.ndindex(2, 3, nq):
        q1 = min(i * bq + bq, T)
        n = got["tile_count"][b, h, i]
        s, e = got["tile_start"][b, h, i, :n], got["tile_end"][b, h, i, :n]
        full = (e - s == bk) & (s + bk - 1 <= i * bq)
        assert np.all(full[: full.sum()]) and not np.any(full[full.sum() :])  # full tiles first
        assert np.all(np.diff(s[full]) > 0) and np.all(np.diff(s[~full]) > 0)
        order = np.argsort(s)
        s, e = s[order], e[order]
        assert np.all(s < e) and np.all(e - s <= bk) and np.all(e <= q1) and np.all(s[1:] >= e[:-1])
        c = got["column_index"][b, h, i, : got["column_count"][b, h, i]]
        assert np.all(c < q1) and np.all(np.diff(c) > 0)
        assert not np.any((c[:, None] >= s[None]) & (c[:, None] < e[None]))
    counts = np.asarray(
        vertical_slash_key_counts(
            *(
                getattr(idx, f)
                for f in ("tile_start", "tile_end", "tile_count", "column_index", "column_count")
            ),
            T,
            block_k=bk,
        )
    )
    assert counts.max() <= 1


def test_full_budget_covers_every_causal_key_once():
    T = 150
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 2, T, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 2, T, 64)), jnp.float32)
    idx = P.vertical_slash_index(q, k, n_vertical=T, n_slash=T, n_sink_cols=30, n_local_diags=100)
    counts = np.asarray(
        vertical_slash_key_counts(
            idx.tile_start, idx.tile_end, idx.tile_count, idx.column_index, idx.column_count, T
        )
    )
    q1 = np.minimum(np.arange(3) * 64 + 64, T)
    np.testing.assert_array_equal(counts, np.broadcast_to(np.arange(T)[None, :] < q1[:, None], counts.shape))
    assert int(jnp.sum(P.index_cost(P.full_causal_index(T)))) == P.dense_causal_tiles(T)


def test_estimator_finds_planted_structure_and_matches_numpy():
    T = 512
    q, k, _ = planted_attention_sample(
        3,
        ["vertical_slash"],
        seq_len=T,
        groups=4,
        head_dim=64,
        slash_offsets=[150, 301],
        n_verticals=6,
        n_sinks=2,
    )
    q, k = q[0], k[0]
    kw = dict(n_vertical=12, n_slash=24, n_sink_cols=2, n_local_diags=8)
    idx = P.vertical_slash_index(q, k, **kw)
    vert, slash = P.vertical_slash_scores_np(np.asarray(q), np.asarray(k))
    cols, offs = P.select_vertical_slash_np(vert, slash, **kw)
    ref = P.vertical_slash_index_from_selection_np(cols, offs, T)
    got = _vs_arrays(idx)
    for name, want in ref.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert np.any(np.abs(offs[0, 0] - 150) <= 2) and np.any(np.abs(offs[0, 0] - 301) <= 2)
    planted_cols = np.flatnonzero(np.asarray(k)[0, 0, :, 32] > 5)  # content direction 0 marks verticals
    assert len(planted_cols) == 8 and np.all(np.isin(planted_cols, cols[0, 0]))
    # with a mass floor the planted structure survives and the index gets cheaper
    thin = P.vertical_slash_index(q, k, min_mass=0.008, **kw)
    cols_f, offs_f = P.select_vertical_slash_np(vert, slash, min_mass=0.008, **kw)
    ref_f = P.vertical_slash_index_from_selection_np(cols_f, offs_f, T)
    for name, want in ref_f.items():
        np.testing.assert_array_equal(np.asarray(getattr(thin, name)), want, err_msg=name)
    assert np.all(np.isin(planted_cols, cols_f[0, 0]))
    assert int(jnp.sum(P.index_cost(thin))) < int(jnp.sum(P.index_cost(idx)))


@pytest.mark.parametrize("T,G,top_k", [(300, 4, 3), (128, 1, 5)])
def test_block_sparse_index_matches_numpy(T, G, top_k):
    rng = np.random.default_rng(T)
    q = rng.standard_normal((2, 2, T, G, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, T, 64)).astype(np.float32)
    idx = P.block_sparse_index(jnp.asarray(q), jnp.asarray(k), top_k_blocks=top_k)
    ids, cnt = P.block_sparse_index_np(q, k, top_k_blocks=top_k)
    np.testing.assert_array_equal(np.asarray(idx.block_ids), ids)
    np.testing.assert_array_equal(np.asarray(idx.block_count), cnt)
    nb = -(-T // 64)
    np.testing.assert_array_equal(cnt[0, 0], np.minimum(np.arange(nb) + 1, top_k))
    for b, h, i in np.ndindex(2, 2, nb):
        row = ids[b, h, i, : cnt[b, h, i]]
        assert i in row and row.max() <= i and np.all(np.diff(row) > 0)


@pytest.mark.parametrize("T,n_sink,n_local,block", [(1000, 70, 200, 64), (300, 0, 1, 16), (257, 300, 5, 32)])
def test_a_shape_matches_brute_force(T, n_sink, n_local, block):
    idx = P.a_shape_index(T, n_sink=n_sink, n_local=n_local, block=block)
    want = P.a_shape_index_np(T, n_sink=n_sink, n_local=n_local, block=block)
    ids, cnt = np.asarray(idx.block_ids), np.asarray(idx.block_count)
    for i, blocks in enumerate(want):
        assert list(ids[i, : cnt[i]]) == blocks
        assert np.all(ids[i, cnt[i] :] == blocks[-1])


def test_block_index_as_tiles_has_the_same_keys():
    idx = P.a_shape_index(700, n_sink=100, n_local=150, block=64)
    vs = P.block_sparse_to_vertical_slash(idx)
    want = block_key_counts(idx.block_ids, idx.block_count, 700, block_k=64)
    got = vertical_slash_key_counts(
        vs.tile_start, vs.tile_end, vs.tile_count, vs.column_index, vs.column_count, 700
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(vs.tile_count), np.asarray(idx.block_count))
    np.testing.assert_array_equal(np.asarray(P.index_cost(vs)), np.asarray(P.index_cost(idx)))


def test_builders_jit_and_reject_bad_input():
    q = jnp.zeros((1, 2, 128, 2, 64))
    k = jnp.zeros((1, 2, 128, 64))
    f = jax.jit(lambda q, k: P.index_cost(P.vertical_slash_index(q, k, n_vertical=40, n_slash=110)))
    assert f(q, k).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="q_last must be"):
        P.vertical_slash_index(q[0], k, n_vertical=40, n_slash=110)
    with pytest.raises(ValueError, match="k must be"):
        P.block_sparse_index(q, k[..., :32], top_k_blocks=2)
    with pytest.raises(ValueError, match="block must be a power of two"):
        P.block_sparse_index(q, k, top_k_blocks=2, block=48)
    with pytest.raises(ValueError, match="top_k_blocks"):
        P.block_sparse_index(q, k, top_k_blocks=0)
    with pytest.raises(ValueError, match="n_local"):
        P.a_shape_index(128, n_sink=4, n_local=0)


# ----------------------------------------------------------------------------------------------------
# Search and config
# ----------------------------------------------------------------------------------------------------

SEARCH_KW = dict(
    ref_len=1024,
    target_sink=32,
    target_local=128,
    vs_budgets=[(16, 32), (16, 64)],
    bs_budgets=[8],
    block=16,
    n_sink_cols=4,
    n_local_diags=16,
    use_kernels=False,
)


@pytest.fixture(scope="module")
def searched():
    q, k, v = planted_attention_sample(
        0, ["local", "vertical_slash", "block_sparse"], seq_len=1024, groups=2, block=16
    )
    return (q, k, v), search_patterns(q, k, v, model_name="toy", **SEARCH_KW)


def test_search_picks_the_planted_pattern_within_cost(searched):
    (q, k, v), config = searched
    assert config.n_layers == 1 and config.n_heads == 3 and config.sample_len == 1024
    heads = config.layers[0]
    assert heads[1].pattern == "vertical_slash"
    assert heads[2].pattern == "block_sparse"
    limit = config.target["cost"] * (1 + config.target["tolerance"])
    ashape = build_index("a_shape", 32, 128, q[0], k[0], block=16)
    dense = attend(P.full_causal_index(1024, block=16), q[0], k[0], v[0], use_kernels=False)
    a_out = attend(ashape, q[0], k[0], v[0], use_kernels=False)
    for h, p in enumerate(heads):
        assert p.cost <= limit + 1e-9
        a_err = float(jnp.linalg.norm(a_out[:, h] - dense[:, h]) / jnp.linalg.norm(dense[:, h]))
        assert p.score <= a_err + 1e-6
    assert heads[1].score < 0.5 * float(
        jnp.linalg.norm(a_out[:, 1] - dense[:, 1]) / jnp.linalg.norm(dense[:, 1])
    )


def test_layer_index_reproduces_each_head_pattern(searched):
    """One layer-wide ranges+columns index covers, per head, exactly the keys of that head's own index."""
    (q, k, _), config = searched
    T = 1024
    layer = build_layer_index(
        config.layers[0], q[0], k[0], ref_len=config.ref_len, block=16, n_sink_cols=4, n_local_diags=16
    )
    got = np.asarray(
        vertical_slash_key_counts(
            layer.tile_start,
            layer.tile_end,
            layer.tile_count,
            layer.column_index,
            layer.column_count,
            T,
            block_k=16,
        )
    )
    for h, p in enumerate(config.layers[0]):
        p1, p2 = p.budgets_at(T, config.ref_len, n_sink_cols=4, n_local_diags=16)
        idx = build_index(p.pattern, p1, p2, q[0], k[0], block=16, n_sink_cols=4, n_local_diags=16)
        if isinstance(idx, P.BlockSparseIndex):
            want = block_key_counts(
                jnp.broadcast_to(idx.block_ids, (1, 3) + idx.block_ids.shape[-2:]),
                jnp.broadcast_to(idx.block_count, (1, 3) + idx.block_count.shape[-1:]),
                T,
                block_k=16,
            )
        else:
            want = vertical_slash_key_counts(
                idx.tile_start,
                idx.tile_end,
                idx.tile_count,
                idx.column_index,
                idx.column_count,
                T,
                block_k=16,
            )
        np.testing.assert_array_equal(got[:, h], np.asarray(want)[:, h], err_msg=f"head {h} ({p.pattern})")
    assert got.max() == 1


def test_config_roundtrip_and_validation(searched, tmp_path):
    _, config = searched
    path = save_pattern_config(config, tmp_path / "toy.json")
    data = json.loads(path.read_text())
    assert data["model"] == "toy" and len(data["layers"]) == 1 and set(data["layers"][0]) == {"0", "1", "2"}
    assert len(data["layers"][0]["1"]) == 5
    loaded = load_pattern_config("toy", config_dir=tmp_path, n_layers=1, n_heads=3)
    assert loaded.layers == config.layers and loaded.ref_len == config.ref_len
    with pytest.raises(ValueError, match="heads per layer"):
        load_pattern_config("toy", config_dir=tmp_path, n_layers=1, n_heads=8)
    with pytest.raises(ValueError, match="layers"):
        load_pattern_config("toy", config_dir=tmp_path, n_layers=32, n_heads=3)
    with pytest.raises(FileNotFoundError, match="other"):
        load_pattern_config("other", config_dir=tmp_path)
    (tmp_path / "llama-3.1-8b.json").write_text(path.read_text().replace('"toy"', '"llama-3.1-8b"'))
    with pytest.raises(ValueError, match="the model has 32"):  # checked against configs/models preset
        load_pattern_config("llama-3.1-8b", config_dir=tmp_path)
    bad = dict(data, layers=[{"0": ["diagonal", 1, 2, 0.1, 0.1]}])
    with pytest.raises(ValueError, match="unknown pattern"):
        parse_pattern_config(bad)
    bad = dict(data, layers=[data["layers"][0], {"0": data["layers"][0]["0"]}])
    with pytest.raises(ValueError, match="layer 1 has 1 heads"):
        parse_pattern_config(bad)
    bad = dict(data, layers=[{"0": ["vertical_slash", 0, 2, 0.1, 0.1]}])
    with pytest.raises(ValueError, match="p1 must be"):
        parse_pattern_config(bad)
    assert HeadPattern("vertical_slash", 1000, 6096, 0.1, 0.1).budgets_at(32768, 131072) == (250, 1524)
    assert HeadPattern("block_sparse", 100, 64, 0.1, 0.1).budgets_at(65536, 131072) == (50, 64)
