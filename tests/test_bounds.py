"""Box-bound cluster scores: boxes vs numpy, the upper-bound property, the 2D centroid-dot identity, the
lookup kernel (interpret) on the box table, ContextAttention(score="box") Pallas == jnp, lowering for an H100."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.centroid_lookup import centroid_scores, centroid_scores_ref
from pallas_kernels.common import has_triton_call, lower_for_h100
from squeeze_jax.index.bounds import box_table, cluster_boxes, index_box_table, signed_split
from tests.test_block_select import tiny_index


def _clusters(seed: int, H: int = 2, D: int = 16, n_fixed: int = 32):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 30, size=(H, 12))  # includes empty clusters
    starts = n_fixed + np.concatenate([np.zeros((H, 1), int), np.cumsum(sizes, 1)[:, :-1]], axis=1)
    N = int(-(-(n_fixed + sizes.sum(1).max() + 5) // 64) * 64)
    keys = rng.normal(size=(H, N, D)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(1, 1, D))
    cents = np.stack([[keys[h, s:s + n].mean(0) if n else np.zeros(D) for s, n in zip(starts[h], sizes[h])]
                      for h in range(H)]).astype(np.float32)
    return keys, starts, sizes, cents


@pytest.mark.parametrize("seed", [0, 1])
def test_boxes_match_numpy_and_bound_every_member_key(seed):
    keys, starts, sizes, cents = _clusters(seed)
    lo, hi = cluster_boxes(jnp.asarray(keys), jnp.asarray(starts), jnp.asarray(sizes))
    q = np.random.default_rng(seed + 10).normal(size=(1, keys.shape[0], 5, keys.shape[2])).astype(np.float32)
    bound = np.einsum("bhre,hce->bhrc", signed_split(q), box_table(jnp.asarray(cents), lo, hi, 1.0))
    for h in range(keys.shape[0]):
        for j, (s, n) in enumerate(zip(starts[h], sizes[h])):
            if n == 0:
                assert np.all(np.isinf(lo[h, j])) and np.all(np.isinf(hi[h, j]))
                continue
            np.testing.assert_allclose(lo[h, j], keys[h, s:s + n].min(0))
            np.testing.assert_allclose(hi[h, j], keys[h, s:s + n].max(0))
            best = np.einsum("rd,nd->rn", q[0, h], keys[h, s:s + n]).max(1)
            assert np.all(bound[0, h, :, j] >= best - 1e-4)  # an upper bound of every member's logit
            # ... and a tight one along each axis: the bound of a one-hot query is the member max
            e = np.zeros((1, 1, 1, keys.shape[2]), np.float32)
            e[..., 0] = 1.0
            tb = box_table(jnp.asarray(cents[h:h + 1]), lo[h:h + 1], hi[h:h + 1], 1.0)
            np.testing.assert_allclose(np.einsum("bhre,hce->bhrc", signed_split(e), tb)[0, 0, 0, j],
                                       keys[h, s:s + n, 0].max(), rtol=1e-6)


def test_weight_zero_is_the_centroid_dot_and_weights_interpolate():
    keys, starts, sizes, cents = _clusters(2)
    lo, hi = cluster_boxes(jnp.asarray(keys), jnp.asarray(starts), jnp.asarray(sizes))
    q = np.random.default_rng(3).normal(size=(2, keys.shape[0], 3, keys.shape[2])).astype(np.float32)
    ok = sizes > 0

    def logits(w):
        return np.einsum("bhre,hce->bhrc", signed_split(q), box_table(jnp.asarray(cents), lo, hi, w))

    dot = np.einsum("bhrd,hcd->bhrc", q, cents)
    np.testing.assert_allclose(np.where(ok[None, :, None], logits(0.0), 0), np.where(ok[None, :, None], dot, 0),
                               rtol=1e-5, atol=1e-4)
    mid = 0.5 * (logits(0.0) + logits(1.0))
    np.testing.assert_allclose(np.where(ok[None, :, None], logits(0.5), 0), np.where(ok[None, :, None], mid, 0),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="box_weight"):
        box_table(jnp.asarray(cents), lo, hi, 1.5)


@pytest.mark.parametrize("R,D,agg,dtype", [(4, 16, "max", jnp.float32), (16, 32, "mean", jnp.float32),
                                           (3, 64, "max", jnp.bfloat16)])
def test_lookup_kernel_on_the_box_table_matches_reference(R, D, agg, dtype):
    keys, starts, sizes, cents = _clusters(4, D=D)
    table = index_box_table(jnp.asarray(keys), jnp.asarray(cents), jnp.asarray(starts), jnp.asarray(sizes), 0.25,
                            dtype=dtype)
    q2 = signed_split(jnp.asarray(np.random.default_rng(5).normal(size=(2, keys.shape[0], R, D)), dtype))
    log_n = jnp.where(jnp.asarray(sizes) > 0, jnp.log(jnp.maximum(jnp.asarray(sizes), 1).astype(jnp.float32)),
                      -jnp.inf)
    kw = dict(agg=agg, scale=1 / math.sqrt(D))
    got = centroid_scores(q2, table, log_n, jnp.zeros_like(log_n), interpret=True, **kw)
    want = centroid_scores_ref(q2, table, log_n, jnp.zeros_like(log_n), **kw)
    fin = np.isfinite(np.asarray(want))
    assert np.array_equal(fin, np.isfinite(np.asarray(got)))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(np.asarray(got)[fin], np.asarray(want)[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [1, 5])
def test_context_attention_box_score_pallas_matches_jnp_and_precomputed_table(T):
    from models.kv_cache import LayerKV
    from squeeze_jax.attention.context import ContextAttention, ContextState

    index, (H, G, D) = tiny_index()
    budget = jnp.full((1, 2), 0.25, jnp.float32)
    key = jax.random.key(7)
    B = 2
    q = jax.random.normal(key, (B, T, H * G, D))
    k = jax.random.normal(jax.random.fold_in(key, 1), (B, T, H, D))
    kv = LayerKV(jnp.zeros((B, 8, H, D)), jnp.zeros((B, 8, H, D)))
    args = (q, k, k, kv, jnp.zeros((B,), jnp.int32), jnp.asarray([T, max(T - 2, 1)], jnp.int32),
            jnp.zeros((B, T), jnp.int32))
    outs = []
    for use_pallas in (True, False):
        backend = ContextAttention(max_budget=0.25, score="box", box_weight=0.25, use_pallas=use_pallas,
                                   interpret=True if use_pallas else None)
        states = [ContextState.for_backend(index, budget, backend)]
        if use_pallas:  # the kernel path never rebuilds the boxes per step
            with pytest.raises(ValueError, match="for_backend"):
                backend(*args, jax.tree.map(lambda a: a[0], ContextState(index, budget)))
        else:  # the jnp path builds them on the fly
            states.append(ContextState(index, budget))
        for state in states:
            out, _, aux = backend(*args, jax.tree.map(lambda a: a[0], state))
            outs.append(np.asarray(out))
            assert 0.0 < float(aux["kept_fraction"]) <= 0.3
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=2e-5, atol=2e-5)
    mean = ContextAttention(max_budget=0.25, use_pallas=False, score="mean")
    out_mean = np.asarray(mean(*args, jax.tree.map(lambda a: a[0], ContextState(index, budget)))[0])
    assert not np.allclose(out_mean, outs[0])  # the box score selects differently


def test_box_score_options_are_checked():
    from squeeze_jax.attention.context import ContextAttention

    with pytest.raises(ValueError, match="box_weight"):
        ContextAttention(score="box", box_weight=-0.1)
    with pytest.raises(ValueError, match="flat lookup"):
        ContextAttention(score="box", hierarchical=True)


@pytest.mark.parametrize("D", [64, 128])
def test_box_lookup_lowers_to_triton_for_h100(D):
    q2 = jax.ShapeDtypeStruct((1, 8, 4, 2 * D), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((8, 6547, 2 * D), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((8, 6547), jnp.float32)
    txt = lower_for_h100(centroid_scores, q2, table, vec, vec, scale=1 / math.sqrt(D), interpret=False)
    assert has_triton_call(txt)
