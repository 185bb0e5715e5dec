"""Block scores and block selection vs numpy references, plus the selection invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selection import (
    block_scores,
    block_scores_ref,
    select_blocks_ref,
    select_threshold,
    select_topk,
)


def _layout(rng, H, C, block_k, fixed_blocks, max_size=40, tail_blocks=2):
    """Random contiguous, ordered clusters after the fixed region (some of size 0), plus padding blocks."""
    sizes = rng.integers(0, max_size, size=(H, C))
    sizes[:, 0] = np.maximum(sizes[:, 0], 1)
    start0 = fixed_blocks * block_k
    starts = start0 + np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(sizes, 1)[:, :-1]], axis=1)
    n_blocks = -(-(start0 + int(sizes.sum(1).max())) // block_k) + tail_blocks
    return jnp.asarray(starts, jnp.int32), jnp.asarray(sizes, jnp.int32), n_blocks


@pytest.mark.parametrize("seed", range(6))
def test_block_scores_match_numpy(seed):
    rng = np.random.default_rng(seed)
    B, H = 2, 3
    C = int(rng.integers(1, 50))
    block_k = int(rng.choice([1, 4, 16, 64]))
    fixed = int(rng.integers(0, 3))
    starts, sizes, nb = _layout(rng, H, C, block_k, fixed, max_size=int(rng.choice([3, 40, 200])))
    scores = jnp.asarray(rng.normal(size=(B, H, C)), jnp.float32)
    kw = dict(n_blocks=nb, block_k=block_k, fixed_blocks=fixed)
    got = np.asarray(block_scores(scores, starts, sizes, **kw))
    want = block_scores_ref(scores, starts, sizes, **kw)
    np.testing.assert_array_equal(got, want)
    assert np.isposinf(got[..., :fixed]).all()
    assert np.isneginf(got[..., -1]).all()  # trailing padding blocks are touched by no cluster


def test_block_scores_spanning_and_shared_blocks():
    # block_k = 4; cluster 0 covers [4, 14) (blocks 1..3), cluster 1 [14, 15), cluster 2 [15, 24).
    starts = jnp.array([[4, 14, 15]], jnp.int32)
    sizes = jnp.array([[10, 1, 9]], jnp.int32)
    scores = jnp.array([[[-1.0, -5.0, -3.0]]])
    got = block_scores(scores, starts, sizes, n_blocks=7, block_k=4, fixed_blocks=1)
    np.testing.assert_array_equal(np.asarray(got)[0, 0], [np.inf, -1, -1, -1, -3, -3, -np.inf])


def test_block_scores_rejects_bad_args():
    scores = jnp.zeros((1, 2, 3))
    starts = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="cluster_size_HC"):
        block_scores(scores, starts, jnp.zeros((2, 4), jnp.int32), n_blocks=4, block_k=4, fixed_blocks=0)
    with pytest.raises(TypeError, match="cluster_start_HC"):
        block_scores(scores, starts.astype(jnp.float32), starts, n_blocks=4, block_k=4, fixed_blocks=0)
    with pytest.raises(ValueError, match="fixed_blocks"):
        block_scores(scores, starts, starts, n_blocks=4, block_k=4, fixed_blocks=5)


def _bscores(rng, B, H, NB, fixed=2, n_neg_inf=5, ties=True):
    """Block scores with +inf fixed blocks, some -inf (padding) blocks and runs of equal scores."""
    s = rng.normal(size=(B, H, NB)).astype(np.float32)
    if ties:
        s = np.round(s, 1)  # many equal values: exercises tie-breaking
    s[..., :fixed] = np.inf
    s[..., NB - n_neg_inf :] = -np.inf
    return s


def _check_selection(ids, count, bscores, capacity):
    ids, count = np.asarray(ids), np.asarray(count)
    assert ids.dtype == np.int32 and count.dtype == np.int32
    assert ids.shape == bscores.shape[:-1] + (capacity,)
    assert (count >= 1).all() and (count <= capacity).all()
    rows = bscores.reshape(-1, bscores.shape[-1])
    for i, c, row in zip(ids.reshape(-1, capacity), count.reshape(-1), rows):
        valid = i[:c]
        assert (np.diff(valid) > 0).all()  # strictly ascending, no duplicates
        assert (i[c:] == valid[-1]).all()  # padded with the last valid id
        if (row > -np.inf).any():
            assert (row[valid] > -np.inf).all()  # -inf never selected while something else exists


@pytest.mark.parametrize("impl", ["topk", "cutoff"])
@pytest.mark.parametrize("capacity", [1, 7, 40])
def test_select_topk_matches_ref_and_invariants(capacity, impl):
    rng = np.random.default_rng(capacity)
    B, H, NB = 2, 3, 40
    bs = _bscores(rng, B, H, NB)
    k = rng.integers(0, capacity + 3, size=(B, H)).astype(np.int32)  # includes 0 and > capacity
    ids, count = select_topk(jnp.asarray(bs), jnp.asarray(k), capacity, impl=impl)
    want_ids, want_count = select_blocks_ref(bs, capacity=capacity, k=k)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_array_equal(np.asarray(count), want_count)
    _check_selection(ids, count, bs, capacity)
    n_finite = (bs > -np.inf).sum(-1)
    np.testing.assert_array_equal(np.asarray(count), np.minimum(np.clip(k, 1, capacity), n_finite))


def test_select_topk_budget_selects_exactly_k_with_per_head_budgets():
    rng = np.random.default_rng(1)
    bs = jnp.asarray(rng.normal(size=(1, 4, 64)), jnp.float32)
    k = jnp.array([[1, 5, 16, 31]], jnp.int32)
    ids, count = jax.jit(select_topk, static_argnums=2)(bs, k, 32)
    np.testing.assert_array_equal(np.asarray(count), np.asarray(k))
    for h in range(4):
        sel = np.asarray(ids)[0, h, : int(k[0, h])]
        top = np.sort(np.argsort(-np.asarray(bs)[0, h], kind="stable")[: int(k[0, h])])
        np.testing.assert_array_equal(sel, top)


@pytest.mark.parametrize("impl", ["topk", "cutoff"])
def test_select_topk_fixed_blocks_always_first_and_ties_to_lower_index(impl):
    bs = np.array([[np.inf, np.inf, 0.5, 0.5, 0.5, 0.9, -np.inf]], np.float32)
    ids, count = select_topk(jnp.asarray(bs), 4, 6, impl=impl)
    np.testing.assert_array_equal(np.asarray(ids)[0], [0, 1, 2, 5, 5, 5])
    assert int(count[0]) == 4


@pytest.mark.parametrize("impl", ["topk", "cutoff"])
def test_selection_never_empty_when_everything_is_neg_inf(impl):
    bs = jnp.full((2, 10), -jnp.inf)
    for ids, count in (select_topk(bs, 3, 4, impl=impl), select_threshold(bs, -1.0, 4, impl=impl)):
        np.testing.assert_array_equal(np.asarray(ids), np.zeros((2, 4), np.int32))
        np.testing.assert_array_equal(np.asarray(count), [1, 1])


@pytest.mark.parametrize("impl", ["topk", "cutoff"])
@pytest.mark.parametrize("capacity", [3, 12, 30])
def test_select_threshold_matches_ref(capacity, impl):
    rng = np.random.default_rng(10 + capacity)
    B, H, NB = 2, 2, 30
    bs = _bscores(rng, B, H, NB)
    thr = np.array([[0.3, 5.0], [-0.2, 0.0]], np.float32)  # 5.0: nothing but the fixed blocks passes
    ids, count = select_threshold(jnp.asarray(bs), jnp.asarray(thr), capacity, impl=impl)
    want_ids, want_count = select_blocks_ref(bs, capacity=capacity, log_threshold=thr)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_array_equal(np.asarray(count), want_count)
    _check_selection(ids, count, bs, capacity)
    n_over = (bs > thr[..., None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(count), np.clip(n_over, 1, capacity))


def test_select_threshold_capacity_overflow_keeps_the_highest():
    bs = np.array([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8]], np.float32)
    ids, count = select_threshold(jnp.asarray(bs), 0.0, 3)  # all 6 pass, capacity 3
    np.testing.assert_array_equal(np.asarray(ids)[0], [1, 3, 5])
    assert int(count[0]) == 3


def test_select_threshold_falls_back_to_best_block():
    bs = np.array([[-3.0, -1.0, -2.0, -np.inf]], np.float32)
    ids, count = select_threshold(jnp.asarray(bs), 0.0, 2)
    np.testing.assert_array_equal(np.asarray(ids)[0], [1, 1])
    assert int(count[0]) == 1


def test_selection_rejects_bad_args():
    bs = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="capacity"):
        select_topk(bs, 2, 9)
    with pytest.raises(ValueError, match="capacity"):
        select_threshold(bs, 0.0, 0)
    with pytest.raises(TypeError, match="k must be an integer"):
        select_topk(bs, jnp.array([1.5, 2.0]), 4)
    with pytest.raises(TypeError, match="floating"):
        select_topk(jnp.zeros((2, 8), jnp.int32), 2, 4)
    with pytest.raises(ValueError, match="impl"):
        select_topk(bs, 2, 4, impl="heap")
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks_ref(np.zeros((2, 8)), capacity=2)


def test_pipeline_scores_to_blocks_is_jittable():
    rng = np.random.default_rng(4)
    B, H, C, block_k, fixed = 2, 2, 30, 16, 4
    starts, sizes, nb = _layout(rng, H, C, block_k, fixed)
    scores = jnp.asarray(rng.normal(size=(B, H, C)), jnp.float32)

    @jax.jit
    def pipeline(scores, k):
        bs = block_scores(scores, starts, sizes, n_blocks=nb, block_k=block_k, fixed_blocks=fixed)
        return select_topk(bs, k, 24)

    k = jnp.array([[8, 24], [5, 12]], jnp.int32)
    ids, count = pipeline(scores, k)
    np.testing.assert_array_equal(np.asarray(count), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(ids)[..., :4], np.broadcast_to(np.arange(4), (B, H, 4)))
