"""Fused block selection kernel (interpret mode) vs its jnp reference and the unfused selection path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_select import (
    FROM_LOGITS_MAX_ROWS,
    block_cluster_ranges,
    select_blocks,
    select_blocks_from_logits,
    select_blocks_from_logits_ref,
    select_blocks_ref,
)
from pallas_kernels.centroid_lookup import (
    centroid_logits,
    centroid_logits_ref,
    centroid_scores,
    scores_from_logits,
)
from pallas_kernels.common import has_triton_call, lower_for_h100, next_pow2
from pallas_kernels.selection import block_scores, select_topk
from tests.test_selection import _layout


def _case(seed: int, *, ties: bool = False, dead_rows: bool = False):
    rng = np.random.default_rng(seed)
    B, H = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    C = int(rng.integers(2, 60))
    block_k = int(rng.choice([4, 16]))
    fixed = int(rng.integers(0, 3))
    starts, sizes, nb = _layout(rng, H, C, block_k, fixed, max_size=int(rng.choice([3, 40])))
    scores = rng.normal(size=(B, H, C)).astype(np.float32) * float(rng.choice([1.0, 30.0]))
    if ties:
        scores = np.round(scores)  # many equal scores: ties go to the lower block id
    scores = np.where(np.asarray(sizes)[None] > 0, scores, -np.inf)
    if dead_rows:
        scores[0] = -np.inf  # nothing but the fixed blocks (or nothing at all) to select
    capacity = int(rng.integers(1, nb + 1))
    k = jnp.asarray(rng.integers(1, capacity + 3, size=(B, H)), jnp.int32)
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    return dict(scores=jnp.asarray(scores), starts=starts, sizes=sizes, lo=lo, hi=hi, k=k,
                kw=dict(n_blocks=nb, capacity=capacity, fixed_blocks=fixed), block_k=block_k)


@pytest.mark.parametrize("seed,ties,dead", [(0, False, False), (1, True, False), (2, False, True), (3, True, True)])
def test_select_blocks_matches_reference_and_unfused_path(seed, ties, dead):
    c = _case(seed, ties=ties, dead_rows=dead)
    args = (c["scores"], c["sizes"], c["lo"], c["hi"], c["k"])
    ids, count = select_blocks(*args, interpret=True, **c["kw"])
    ids_r, count_r = select_blocks_ref(*args, **c["kw"])
    np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))
    bs = block_scores(c["scores"], c["starts"], c["sizes"], block_k=c["block_k"], **{
        k: v for k, v in c["kw"].items() if k != "capacity"})
    ids_u, count_u = select_topk(bs, c["k"], c["kw"]["capacity"])
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_u))
    np.testing.assert_array_equal(np.asarray(count), np.asarray(count_u))
    # invariants: ascending, in range, count in [1, capacity]
    ids_np, cnt = np.asarray(ids), np.asarray(count)
    assert (cnt >= 1).all() and (cnt <= c["kw"]["capacity"]).all()
    assert (np.diff(ids_np, axis=-1) >= 0).all() and (ids_np < c["kw"]["n_blocks"]).all()


@pytest.mark.parametrize("seed,chunk", [(4, 0), (5, 0), (6, 16)])
def test_padded_block_tables_select_the_same_blocks(seed, chunk):
    """Tables from block_cluster_ranges(..., pad_pow2=True) (what ContextState stores, so the kernel pads nothing
    per call) give the same selection as the unpadded ones, in the kernel and in the reference; other widths are
    refused."""
    c = _case(seed, ties=True)
    nb = c["kw"]["n_blocks"]
    lo_p, hi_p = block_cluster_ranges(c["starts"], c["sizes"], n_blocks=nb, block_k=c["block_k"], pad_pow2=True)
    assert lo_p.shape[1] == next_pow2(nb) and bool(jnp.all(lo_p[:, nb:] > hi_p[:, nb:]))
    np.testing.assert_array_equal(np.asarray(lo_p[:, :nb]), np.asarray(c["lo"]))
    want = select_blocks_ref(c["scores"], c["sizes"], c["lo"], c["hi"], c["k"], **c["kw"])
    for fn, extra in ((select_blocks, dict(interpret=True, chunk_blocks=chunk)), (select_blocks_ref, {})):
        got = fn(c["scores"], c["sizes"], lo_p, hi_p, c["k"], **extra, **c["kw"])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if next_pow2(nb) != nb + 1:  # one block wider than the block count and than its power of two
        one_more = ((0, 0), (0, 1))
        with pytest.raises(ValueError, match="lo_HB must be"):
            select_blocks(c["scores"], c["sizes"], jnp.pad(c["lo"], one_more), jnp.pad(c["hi"], one_more), c["k"],
                          interpret=True, **c["kw"])


@pytest.mark.parametrize("seed,spread", [(10, 1e-3), (11, 50.0)])
def test_select_blocks_many_blocks_close_scores(seed, spread):
    """Thousands of blocks (the packed two-count reduction near its real sizes) with scores packed closely or
    spread widely: the same blocks as the reference."""
    rng = np.random.default_rng(seed)
    H, C, block_k = 2, 1500, 4
    starts, sizes, nb = _layout(rng, H, C, block_k, 2, max_size=40)
    scores = jnp.asarray(rng.normal(size=(1, H, C)).astype(np.float32) * spread)
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    k = jnp.asarray([[nb // 8, nb // 3]], jnp.int32)
    kw = dict(n_blocks=nb, capacity=nb // 2, fixed_blocks=2)
    ids, count = select_blocks(scores, sizes, lo, hi, k, interpret=True, **kw)
    ids_r, count_r = select_blocks_ref(scores, sizes, lo, hi, k, **kw)
    assert nb > 4000
    np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))


@pytest.mark.parametrize("seed", [4, 5])
def test_select_blocks_with_prior(seed):
    """A per-block prior joins the cluster scores by max: kernel == reference == unfused scores maxed with it."""
    c = _case(seed)
    nb = c["kw"]["n_blocks"]
    B, H = c["k"].shape
    rng = np.random.default_rng(seed)
    prior = rng.normal(size=(B, H, nb)).astype(np.float32) * 3.0
    prior = jnp.asarray(np.where(rng.random(prior.shape) < 0.5, -np.inf, prior))
    args = (c["scores"], c["sizes"], c["lo"], c["hi"], c["k"])
    ids, count = select_blocks(*args, interpret=True, prior_BHB=prior, **c["kw"])
    ids_r, count_r = select_blocks_ref(*args, prior_BHB=prior, **c["kw"])
    bs = block_scores(c["scores"], c["starts"], c["sizes"], block_k=c["block_k"], n_blocks=nb,
                      fixed_blocks=c["kw"]["fixed_blocks"])
    ids_u, count_u = select_topk(jnp.maximum(bs, prior), c["k"], c["kw"]["capacity"])
    for got in ((ids, count), (ids_r, count_r)):
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(count_u))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ids_u))
    # a prior of +inf ranks a block with the fixed ones: kept wherever more than the fixed blocks are kept
    forced = jnp.full((B, H, nb), -jnp.inf).at[:, :, nb - 1].set(jnp.inf)
    ids_f, count_f = select_blocks(*args, interpret=True, prior_BHB=forced, **c["kw"])
    rows = [(b, h) for b in range(B) for h in range(H) if int(count_f[b, h]) > c["kw"]["fixed_blocks"]]
    assert rows and all(nb - 1 in np.asarray(ids_f)[b, h, : int(count_f[b, h])] for b, h in rows)
    with pytest.raises(ValueError, match="prior_BHB"):
        select_blocks(*args, interpret=True, prior_BHB=prior[:, :, :-1], **c["kw"])


def test_select_blocks_short_search():
    """search_iters < SEARCH_ITERS: still exactly k blocks; every block scoring clearly above the k-th score
    (by more than the final band, range / 3**iters) is kept; 0 steps = the first k blocks that have a score.
    Gathering 1, 2 or 4 range offsets per step changes nothing."""
    rng = np.random.default_rng(12)
    H, C, block_k = 2, 400, 4
    starts, sizes, nb = _layout(rng, H, C, block_k, 0, max_size=12)
    scores = jnp.asarray(rng.normal(size=(1, H, C)).astype(np.float32))
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    kk = nb // 5
    k = jnp.full((1, H), kk, jnp.int32)
    kw = dict(n_blocks=nb, capacity=nb // 2, fixed_blocks=0)
    bs = np.asarray(block_scores(scores, starts, sizes, n_blocks=nb, block_k=block_k, fixed_blocks=0))
    for iters, unroll in ((0, 1), (3, 2), (6, 4)):
        ids, count = select_blocks(scores, sizes, lo, hi, k, interpret=True, search_iters=iters,
                                   gather_unroll=unroll, **kw)
        for h in range(H):
            got = set(np.asarray(ids)[0, h, : int(count[0, h])].tolist())
            assert int(count[0, h]) == kk == len(got)
            s = bs[0, h]
            fin = s[np.isfinite(s)]
            kth = np.sort(fin)[::-1][kk - 1]
            band = (fin.max() - fin.min() + 2.0) / 3.0 ** iters
            assert {b for b in range(nb) if s[b] > kth + band} <= got
            if iters == 0:
                assert sorted(got) == [b for b in range(nb) if np.isfinite(s[b])][:kk]
    ids_u, count_u = select_topk(jnp.asarray(bs), k, nb // 2)
    for unroll in (2, 4):
        ids, count = select_blocks(scores, sizes, lo, hi, k, interpret=True, gather_unroll=unroll, **kw)
        np.testing.assert_array_equal(np.asarray(count), np.asarray(count_u))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_u))
    with pytest.raises(ValueError, match="search_iters"):
        select_blocks(scores, sizes, lo, hi, k, interpret=True, search_iters=99, **kw)
    with pytest.raises(ValueError, match="gather_unroll"):
        select_blocks(scores, sizes, lo, hi, k, interpret=True, gather_unroll=3, **kw)


def test_block_cluster_ranges_cover_exactly_the_overlapping_clusters():
    rng = np.random.default_rng(7)
    starts, sizes, nb = _layout(rng, 2, 30, 8, 1, max_size=20)
    lo, hi = (np.asarray(x) for x in block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=8))
    st, sz = np.asarray(starts), np.asarray(sizes)
    for h in range(2):
        for b in range(nb):
            want = [c for c in range(30) if sz[h, c] > 0 and st[h, c] < (b + 1) * 8 and st[h, c] + sz[h, c] > b * 8]
            got = [c for c in range(lo[h, b], hi[h, b] + 1) if sz[h, c] > 0]
            assert got == want, (h, b)


def test_select_blocks_bad_input():
    c = _case(0)
    args = (c["scores"], c["sizes"], c["lo"], c["hi"], c["k"])
    with pytest.raises(ValueError, match="capacity"):
        select_blocks(*args, n_blocks=c["kw"]["n_blocks"], capacity=0, fixed_blocks=0, interpret=True)
    with pytest.raises(ValueError, match="k_BH"):
        select_blocks(*args[:4], c["k"][:, :0], interpret=True, **c["kw"])
    with pytest.raises(TypeError, match="lo_HB"):
        select_blocks(c["scores"], c["sizes"], c["lo"].astype(jnp.float32), c["hi"], c["k"], interpret=True,
                      **c["kw"])
    H, nb = c["lo"].shape[0], 2**16
    big = jnp.zeros((H, nb), jnp.int32)
    with pytest.raises(ValueError, match="at most 65535 blocks"):
        select_blocks(c["scores"], c["sizes"], big, big, c["k"], n_blocks=nb, capacity=8, fixed_blocks=0,
                      interpret=True)


def test_select_blocks_lowers_for_h100():
    H, B, C, nb = 8, 1, 6554, 8192
    S = jax.ShapeDtypeStruct
    txt = lower_for_h100(select_blocks, S((B, H, C), jnp.float32), S((H, C), jnp.int32), S((H, nb), jnp.int32),
                         S((H, nb), jnp.int32), S((B, H), jnp.int32), n_blocks=nb, capacity=1024, fixed_blocks=64,
                         interpret=False)
    assert has_triton_call(txt)
    with_prior = lower_for_h100(functools.partial(select_blocks, prior_BHB=jnp.zeros((B, H, nb))),
                                S((B, H, C), jnp.float32), S((H, C), jnp.int32), S((H, nb), jnp.int32),
                                S((H, nb), jnp.int32), S((B, H), jnp.int32), n_blocks=nb, capacity=1024,
                                fixed_blocks=64, interpret=False)
    assert has_triton_call(with_prior)


@pytest.mark.parametrize("seed,R,agg,D,dtype", [(20, 1, "max", 64, jnp.float32), (21, 3, "mean", 128, jnp.bfloat16),
                                               (22, 4, "max", 128, jnp.bfloat16), (23, 8, "mean", 64, jnp.float32)])
def test_select_blocks_from_logits_matches_reference_and_two_launch_path(seed, R, agg, D, dtype):
    """The lookup's finish folded into the selection: the same blocks as its jnp reference and as
    centroid_scores + select_blocks, for any row count up to the limit, both aggregations, empty clusters and
    a prior; the logits' own reference (one partial, unpadded rows) gives the same scores."""
    rng = np.random.default_rng(seed)
    B, H, C, block_k = 2, 3, int(rng.integers(150, 400)), int(rng.choice([4, 16]))
    starts, sizes, nb = _layout(rng, H, C, block_k, 2, max_size=30)
    q = jnp.asarray(rng.normal(size=(B, H, R, D)), dtype)
    cents = jnp.asarray(rng.normal(size=(H, C, D)).astype(np.float32))
    log_n = jnp.log(jnp.maximum(sizes, 1).astype(jnp.float32))
    radius = jnp.ones((H, C), jnp.float32)
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    k = jnp.asarray(rng.integers(1, nb // 3 + 2, size=(B, H)), jnp.int32)
    prior = jnp.asarray(np.where(rng.random((B, H, nb)) < 0.05, 5.0, -np.inf).astype(np.float32))
    kw = dict(n_blocks=nb, capacity=nb // 3 + 1, fixed_blocks=2, prior_BHB=prior)
    logits = centroid_logits(q, cents, log_n, radius, interpret=True)
    ids, count = select_blocks_from_logits(logits, sizes, lo, hi, k, agg=agg, interpret=True, **kw)
    ids_two, count_two = select_blocks(centroid_scores(q, cents, log_n, radius, agg=agg, interpret=True), sizes, lo,
                                       hi, k, interpret=True, **kw)
    ids_r, count_r = select_blocks_from_logits_ref(logits, sizes, lo, hi, k, agg=agg, **kw)
    for got_ids, got_count in ((ids_two, count_two), (ids_r, count_r)):
        np.testing.assert_array_equal(np.asarray(count), np.asarray(got_count))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(got_ids))
    ref = centroid_logits_ref(q, cents, log_n, radius)
    assert ref.m_BHPR.shape == (B, H, 1, R)
    np.testing.assert_allclose(np.asarray(scores_from_logits(ref, log_n, agg)),
                               np.asarray(scores_from_logits(logits, log_n, agg)), rtol=2e-2, atol=2e-2)


def test_select_blocks_from_logits_rejects_bad_input():
    rng = np.random.default_rng(0)
    starts, sizes, nb = _layout(rng, 2, 40, 4, 0, max_size=8)
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=4)
    kw = dict(n_blocks=nb, capacity=4, fixed_blocks=0)
    k = jnp.ones((1, 2), jnp.int32)
    many = centroid_logits_ref(jnp.ones((1, 2, FROM_LOGITS_MAX_ROWS + 1, 16)), jnp.ones((2, 40, 16)),
                               jnp.zeros((2, 40)), jnp.ones((2, 40)))
    with pytest.raises(ValueError, match="at most"):
        select_blocks_from_logits(many, sizes, lo, hi, k, interpret=True, **kw)
    with pytest.raises(TypeError, match="ClusterLogits"):
        select_blocks_from_logits(jnp.zeros((1, 2, 40)), sizes, lo, hi, k, interpret=True, **kw)
    few = centroid_logits_ref(jnp.ones((1, 2, 2, 16)), jnp.ones((2, 40, 16)), jnp.zeros((2, 40)), jnp.ones((2, 40)))
    with pytest.raises(ValueError, match="agg"):
        select_blocks_from_logits(few, sizes, lo, hi, k, agg="sum", interpret=True, **kw)
    with pytest.raises(ValueError, match="cluster_size_HC"):
        select_blocks_from_logits(few, sizes[:, :-1], lo, hi, k, interpret=True, **kw)


def test_lookup_logits_and_fused_selection_lower_for_h100():
    H, B, G, C, nb, D = 8, 1, 4, 6554, 8192, 128
    S = jax.ShapeDtypeStruct
    txt = lower_for_h100(centroid_logits, S((B, H, G, D), jnp.bfloat16), S((H, C, D), jnp.bfloat16),
                         S((H, C), jnp.float32), S((H, C), jnp.float32), interpret=False)
    assert has_triton_call(txt)
    nP = -(-C // 128)
    logits = centroid_logits_ref(jnp.zeros((B, H, G, 16)), jnp.zeros((H, C, 16)), jnp.zeros((H, C)),
                                 jnp.zeros((H, C)))
    logits = type(logits)(jnp.zeros((B, H, G, C)), jnp.zeros((B, H, nP, 16)), jnp.ones((B, H, nP, 16)))
    for agg in ("max", "mean"):
        txt = lower_for_h100(lambda s, lo, hi, k, agg=agg: select_blocks_from_logits(
            logits, s, lo, hi, k, agg=agg, n_blocks=nb, capacity=1024, fixed_blocks=64, interpret=False),
            S((H, C), jnp.int32), S((H, nb), jnp.int32), S((H, nb), jnp.int32), S((B, H), jnp.int32))
        assert has_triton_call(txt)


def tiny_index():
    """A one-layer context index of 640 random keys (2 KV heads x 2 query heads each, d16), and (H, G, D)."""
    from squeeze_jax.index import IndexConfig, build_index_from_kv

    L, N, H, G, D = 1, 640, 2, 2, 16
    key = jax.random.key(0)
    k = jax.random.normal(key, (L, H, N, D))
    v = jax.random.normal(jax.random.fold_in(key, 1), (L, H, N, D))
    q = jax.random.normal(jax.random.fold_in(key, 2), (L, 28, H * G, D))
    cfg = IndexConfig(window=28, centroid_fraction=0.1, iters=3, budgets=(0.25,), progress=False)
    return build_index_from_kv(k, v, q, cfg), (H, G, D)


def test_context_attention_fused_selection_matches_unfused():
    """ContextAttention with precomputed block tables (fused kernel) == without them (block_scores + top-k)."""
    from models.kv_cache import LayerKV
    from squeeze_jax.attention.context import ContextAttention, ContextState

    index, (H, G, D) = tiny_index()
    L = 1
    key = jax.random.key(0)
    backend = ContextAttention(max_budget=0.25, use_pallas=True, interpret=True, score="mean")
    budget = jnp.full((L, 1), 0.25, jnp.float32)
    fused, plain = ContextState.create(index, budget, backend.block_k), ContextState(index, budget)
    B, T = 1, 1
    qq = jax.random.normal(jax.random.fold_in(key, 3), (B, T, H * G, D))
    kk = jax.random.normal(jax.random.fold_in(key, 4), (B, T, H, D))
    kv = LayerKV(jnp.zeros((B, 8, H, D)), jnp.zeros((B, 8, H, D)))
    args = (qq, kk, kk, kv, jnp.zeros((B,), jnp.int32), jnp.ones((B,), jnp.int32), jnp.zeros((B, T), jnp.int32))
    outs = [backend(*args, jax.tree.map(lambda a: a[0], st))[0] for st in (fused, plain)]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


def _logprob_case(seed: int, nb_target: int = 700):
    """Clusters whose scores look like the lookup's (log-probabilities, mostly inside the chunked selection's
    band edges), several thousand blocks in 4-key blocks."""
    rng = np.random.default_rng(seed)
    H, C, block_k = 2, nb_target // 2, 4
    starts, sizes, nb = _layout(rng, H, C, block_k, 3, max_size=16)
    logits = rng.normal(size=(2, H, C)) * 2.0
    scores = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scores = jnp.asarray(np.where(np.asarray(sizes)[None] > 0, scores, -np.inf).astype(np.float32))
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    return scores, sizes, lo, hi, nb


@pytest.mark.parametrize("seed,ties,dead,chunk", [(0, False, False, 16), (1, True, False, 32), (2, False, True, 16),
                                                  (3, True, True, 64), (6, False, False, 1024)])
def test_chunked_selection_matches_reference(seed, ties, dead, chunk):
    """Chunked selection (block scores and band counts over many programs, then per-chunk compaction): the same
    ids and counts as the reference, for scores outside the band edges (normal x 30), rounded ties, rows with
    nothing but fixed blocks, and one chunk larger than the row."""
    c = _case(seed, ties=ties, dead_rows=dead)
    args = (c["scores"], c["sizes"], c["lo"], c["hi"], c["k"])
    ids, count = select_blocks(*args, interpret=True, chunk_blocks=chunk, **c["kw"])
    ids_r, count_r = select_blocks_ref(*args, **c["kw"])
    np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))


@pytest.mark.parametrize("seed,frac", [(30, 0.125), (31, 0.02), (32, 0.7)])
def test_chunked_selection_logprob_scores(seed, frac):
    """Log-probability scores start the search between two band edges: exact top-k at 2%, 1/8 and 70% kept,
    with and without a prior, and with a truncated search still exactly k blocks."""
    scores, sizes, lo, hi, nb = _logprob_case(seed)
    B, H = scores.shape[:2]
    kk = max(2, int(frac * nb))
    k = jnp.full((B, H), kk, jnp.int32)
    kw = dict(n_blocks=nb, capacity=kk, fixed_blocks=3)
    rng = np.random.default_rng(seed)
    prior = jnp.asarray(np.where(rng.random((B, H, nb)) < 0.1, -3.0, -np.inf).astype(np.float32))
    for extra in ({}, {"prior_BHB": prior}):
        ids, count = select_blocks(scores, sizes, lo, hi, k, interpret=True, chunk_blocks=64, **kw, **extra)
        ids_r, count_r = select_blocks_ref(scores, sizes, lo, hi, k, **kw, **extra)
        np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))
    ids, count = select_blocks(scores, sizes, lo, hi, k, interpret=True, chunk_blocks=64, search_iters=1, **kw)
    assert (np.asarray(count) == kk).all()
    for b in range(B):
        for h in range(H):
            got = np.asarray(ids)[b, h]
            assert len(set(got.tolist())) == kk and (np.diff(got) > 0).all()


def test_chunked_selection_from_logits_and_bad_chunk():
    """The lookup's finish inside the chunked selection's first launch: the same blocks as the one-program
    kernel; chunk sizes must be powers of two >= 16."""
    rng = np.random.default_rng(40)
    B, H, R, C, D, block_k = 1, 2, 4, 300, 32, 4
    starts, sizes, nb = _layout(rng, H, C, block_k, 2, max_size=20)
    q = jnp.asarray(rng.normal(size=(B, H, R, D)), jnp.float32)
    cents = jnp.asarray(rng.normal(size=(H, C, D)).astype(np.float32))
    log_n = jnp.log(jnp.maximum(sizes, 1).astype(jnp.float32))
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    k = jnp.full((B, H), nb // 8, jnp.int32)
    kw = dict(n_blocks=nb, capacity=nb // 8, fixed_blocks=2)
    logits = centroid_logits(q, cents, log_n, jnp.ones((H, C), jnp.float32), interpret=True)
    for agg in ("max", "mean"):
        one = select_blocks_from_logits(logits, sizes, lo, hi, k, agg=agg, interpret=True, **kw)
        chunked = select_blocks_from_logits(logits, sizes, lo, hi, k, agg=agg, interpret=True, chunk_blocks=32, **kw)
        for a, b in zip(one, chunked, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for bad in (8, 48):
        with pytest.raises(ValueError, match="chunk_blocks"):
            select_blocks_from_logits(logits, sizes, lo, hi, k, interpret=True, chunk_blocks=bad, **kw)


def test_chunked_selection_lowers_for_h100():
    H, B, C, nb = 8, 1, 6554, 8192
    S = jax.ShapeDtypeStruct
    txt = lower_for_h100(functools.partial(select_blocks, prior_BHB=jnp.zeros((B, H, nb))), S((B, H, C), jnp.float32),
                         S((H, C), jnp.int32), S((H, nb), jnp.int32), S((H, nb), jnp.int32), S((B, H), jnp.int32),
                         n_blocks=nb, capacity=1024, fixed_blocks=64, chunk_blocks=512, interpret=False)
    assert txt.count("squeeze_select_chunk") >= 2 and has_triton_call(txt)


def test_selection_past_two_to_the_fifteen_blocks():
    """More than 2**15 blocks, and more than 2**15 of them kept: the packed counts pass 2**31 and still unpack
    (one-program and chunked kernels == reference)."""
    rng = np.random.default_rng(50)
    H, C, block_k = 1, 14000, 1
    starts, sizes, nb = _layout(rng, H, C, block_k, 2, max_size=6)
    assert nb > 2**15
    scores = jnp.asarray(rng.normal(size=(1, H, C)).astype(np.float32) - 9.0)
    lo, hi = block_cluster_ranges(starts, sizes, n_blocks=nb, block_k=block_k)
    k = jnp.asarray([[2**15 + 500]], jnp.int32)
    kw = dict(n_blocks=nb, capacity=2**15 + 500, fixed_blocks=2)
    ids_r, count_r = select_blocks_ref(scores, sizes, lo, hi, k, **kw)
    for chunk in (0, 4096):
        ids, count = select_blocks(scores, sizes, lo, hi, k, interpret=True, chunk_blocks=chunk, **kw)
        np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))


def test_default_chunk_blocks_fills_one_wave():
    """Chunks only where one program per (row, head) would leave most SMs idle: 16 chunks of 2048 for 8 heads at
    32K blocks, one program per head for 32 heads or short contexts; past the kernels' limit the XLA path."""
    from pallas_kernels.block_select import MAX_BLOCKS, default_chunk_blocks
    from squeeze_jax.attention.context import fused_select_chunks

    assert default_chunk_blocks(32768, 8) == 2048
    assert default_chunk_blocks(8192, 8) == 512
    assert default_chunk_blocks(32768, 16) == 4096
    assert default_chunk_blocks(32768, 32) == 0 and default_chunk_blocks(2048, 8) == 0
    assert fused_select_chunks(8192, 8) == 512 and fused_select_chunks(MAX_BLOCKS + 1, 8) is None


@pytest.mark.parametrize("seed,ties,chunk", [(40, True, 0), (41, False, 0), (42, True, 32), (43, True, 0)])
def test_tie_check_takes_the_same_blocks(seed, ties, chunk):
    """Stopping the search on a band that holds one tied value (after 0, 2 or 6 steps) takes the reference's
    blocks, in the one-program and the chunked forms, with rounded (tied) and distinct scores."""
    c = _case(seed, ties=ties)
    args = (c["scores"], c["sizes"], c["lo"], c["hi"], c["k"])
    ids_r, count_r = select_blocks_ref(*args, **c["kw"])
    for tie_check in (0, 2, 6):
        ids, count = select_blocks(*args, interpret=True, chunk_blocks=chunk, tie_check=tie_check, **c["kw"])
        np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))
    with pytest.raises(ValueError, match="tie_check"):
        select_blocks(*args, interpret=True, tie_check=-1, **c["kw"])


@pytest.mark.parametrize("seed,chunk", [(50, 0), (51, 32), (52, 0)])
def test_inactive_rows_take_every_block_with_a_range(seed, chunk):
    """A row with active 0 reads no score, prior or size: every block with a cluster range scores 0, so at k =
    all such blocks it takes them all (fixed ones included); active rows select as before. Kernel == reference,
    one-program and chunked."""
    c = _case(seed, ties=True)
    B, H = c["k"].shape
    nb = c["kw"]["n_blocks"]
    rng = np.random.default_rng(seed)
    active = jnp.asarray(rng.random((B, H)) < 0.5).at[0, 0].set(False)
    prior = jnp.asarray(rng.normal(size=(B, H, nb)).astype(np.float32))
    kw = {**c["kw"], "capacity": nb}
    k = jnp.full((B, H), nb, jnp.int32).at[-1, -1].set(max(1, nb // 3))
    args = (c["scores"], c["sizes"], c["lo"], c["hi"], k)
    ids, count = select_blocks(*args, interpret=True, chunk_blocks=chunk, active_BH=active, prior_BHB=prior, **kw)
    ids_r, count_r = select_blocks_ref(*args, active_BH=active, prior_BHB=prior, **kw)
    np.testing.assert_array_equal(np.asarray(count), np.asarray(count_r))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_r))
    lo, hi = np.asarray(c["lo"]), np.asarray(c["hi"])
    want = sorted(set(range(c["kw"]["fixed_blocks"])) | set(np.flatnonzero(lo[0] <= hi[0]).tolist()))
    assert int(count[0, 0]) == len(want) and np.asarray(ids)[0, 0, :len(want)].tolist() == want
    with pytest.raises(ValueError, match="active_BH"):
        select_blocks(*args, active_BH=active[:, :1] if H > 1 else active[:0], **kw)
