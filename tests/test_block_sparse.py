"""Block-sparse prefill kernel (interpret mode on CPU) vs its jnp reference and dense causal attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import block_sparse_prefill, block_sparse_prefill_ref
from pallas_kernels.common import has_triton_call, lower_for_h100
from squeeze_jax.minference.patterns import a_shape_index, block_sparse_index, full_causal_index


def _qkv(seed, B, H, T, G, D, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, H, T, G, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, H, T, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, H, T, D)), dtype)
    return rng, q, k, v


def dense_causal(q, k, v):
    """Plain causal softmax attention in float64 numpy: (out [B,H,T,G,D], lse [B,H,T,G])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, D = q.shape[2], q.shape[4]
    s = np.einsum("bhtgd,bhsd->bhtgs", q, k) / np.sqrt(D)
    s = np.where((np.arange(T)[None, :] <= np.arange(T)[:, None])[None, None, :, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = np.log(p.sum(-1)) + m[..., 0]
    return np.einsum("bhtgs,bhsd->bhtgd", p / p.sum(-1, keepdims=True), v), lse


def random_index(rng, B, H, T, block, capacity, *, future=False, unsorted=False):
    """Random key-block lists: causal blocks (plus future ones if asked), diagonal included."""
    nb = -(-T // block)
    ids = np.zeros((B, H, nb, capacity), np.int32)
    cnt = np.zeros((B, H, nb), np.int32)
    for b, h, i in np.ndindex(B, H, nb):
        pool = np.arange(nb if future else i + 1)
        n = rng.integers(1, min(capacity, len(pool)) + 1)
        chosen = rng.choice(pool[pool != i], n - 1, replace=False) if n > 1 else np.zeros(0, int)
        chosen = np.concatenate([chosen, [i]])
        chosen = rng.permutation(chosen) if unsorted else np.sort(chosen)
        ids[b, h, i] = np.concatenate([chosen, np.full(capacity - n, chosen[-1])])
        cnt[b, h, i] = n
    return jnp.asarray(ids), jnp.asarray(cnt)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _tol(dtype):
    return 2e-2 if dtype == jnp.bfloat16 else 2e-5


# (seed, B, H, T, G, D, dtype, capacity, unsorted)
CASES = [
    (0, 1, 2, 200, 4, 64, jnp.float32, 4, False),
    (1, 2, 1, 130, 1, 128, jnp.bfloat16, 2, False),
    (2, 1, 2, 256, 3, 64, jnp.float32, 3, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_reference(case):
    seed, B, H, T, G, D, dtype, cap, unsorted = case
    rng, q, k, v = _qkv(seed, B, H, T, G, D, dtype)
    ids, cnt = random_index(rng, B, H, T, 64, cap, unsorted=unsorted)
    out, lse = block_sparse_prefill(q, k, v, ids, cnt, interpret=True)
    out_r, lse_r = block_sparse_prefill_ref(q, k, v, ids, cnt)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, H, T, G) and lse.dtype == jnp.float32
    assert _rel(out, out_r) < _tol(dtype)
    np.testing.assert_allclose(
        np.asarray(lse), np.asarray(lse_r), atol=2e-3 if dtype == jnp.bfloat16 else 1e-5
    )


def test_full_budget_equals_dense_and_future_blocks_are_masked():
    """Top-k over all blocks, the full A-shape, and a list of *every* block (future ones too) all give
    dense causal attention; perturbing future keys/values never changes earlier rows."""
    B, H, T, G, D = 1, 2, 200, 4, 64
    rng, q, k, v = _qkv(0, B, H, T, G, D, jnp.float32)
    ref_out, ref_lse = dense_causal(q, k, v)
    nb = 4
    bs = block_sparse_index(q, k, top_k_blocks=nb)
    assert np.array_equal(np.asarray(bs.block_count)[0, 0], np.arange(1, nb + 1))
    full = full_causal_index(T)
    a_full = a_shape_index(T, n_sink=0, n_local=T)
    assert np.array_equal(np.asarray(full.block_ids), np.asarray(a_full.block_ids))
    every = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, H, nb, nb))
    every_cnt = jnp.full((B, H, nb), nb, jnp.int32)
    for ids, cnt in [
        (bs.block_ids, bs.block_count),
        (jnp.broadcast_to(full.block_ids, (B, H, nb, nb)), jnp.broadcast_to(full.block_count, (B, H, nb))),
        (every, every_cnt),
    ]:
        out, lse = block_sparse_prefill(q, k, v, ids, cnt, interpret=True)
        assert _rel(out, ref_out) < 2e-5
        np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4)

    t0 = 77  # perturb keys/values strictly after position t0
    k2 = k.at[:, :, t0 + 1 :].add(jnp.asarray(rng.standard_normal((B, H, T - t0 - 1, D)), jnp.float32) * 3)
    v2 = v.at[:, :, t0 + 1 :].set(1e3)
    ids, cnt = random_index(rng, B, H, T, 64, 4, future=True)
    out1, lse1 = block_sparse_prefill(q, k, v, ids, cnt, interpret=True)
    out2, lse2 = block_sparse_prefill(q, k2, v2, ids, cnt, interpret=True)
    np.testing.assert_array_equal(np.asarray(out1)[:, :, : t0 + 1], np.asarray(out2)[:, :, : t0 + 1])
    np.testing.assert_array_equal(np.asarray(lse1)[:, :, : t0 + 1], np.asarray(lse2)[:, :, : t0 + 1])
    assert not np.allclose(np.asarray(out1)[:, :, t0 + 1 :], np.asarray(out2)[:, :, t0 + 1 :])


def test_rows_without_visible_keys_and_non_causal():
    B, H, T, G, D = 1, 2, 200, 4, 64
    rng, q, k, v = _qkv(3, B, H, T, G, D, jnp.float32)
    ids, cnt = random_index(rng, B, H, T, 64, 4)
    ids = ids.at[:, :, 0, 0].set(2)  # query block 0 lists one future block only: nothing visible
    cnt = cnt.at[:, :, 0].set(1)
    out, lse = block_sparse_prefill(q, k, v, ids, cnt, interpret=True)
    assert np.all(np.asarray(out)[:, :, :64] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, :64]))
    assert np.isfinite(np.asarray(lse)[:, :, 64:]).all()
    out_r, lse_r = block_sparse_prefill_ref(q, k, v, ids, cnt)
    assert _rel(out, out_r) < 2e-5

    ids_nc, cnt_nc = random_index(rng, B, H, T, 64, 4, future=True)
    out_nc, lse_nc = block_sparse_prefill(q, k, v, ids_nc, cnt_nc, causal=False, interpret=True)
    out_ncr, lse_ncr = block_sparse_prefill_ref(q, k, v, ids_nc, cnt_nc, causal=False)
    assert _rel(out_nc, out_ncr) < 2e-5
    np.testing.assert_allclose(np.asarray(lse_nc), np.asarray(lse_ncr), atol=1e-5)


def test_bad_inputs_raise():
    _, q, k, v = _qkv(0, 1, 2, 128, 2, 64, jnp.float32)
    ids = jnp.zeros((1, 2, 2, 2), jnp.int32)
    cnt = jnp.ones((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="q must be"):
        block_sparse_prefill(q[0], k, v, ids, cnt)
    with pytest.raises(ValueError, match="k and v"):
        block_sparse_prefill(q, k[:, :1], v, ids, cnt)
    with pytest.raises(TypeError, match="share a dtype"):
        block_sparse_prefill(q, k.astype(jnp.bfloat16), v, ids, cnt)
    with pytest.raises(ValueError, match="block_q"):
        block_sparse_prefill(q, k, v, ids, cnt, block_q=48)
    with pytest.raises(ValueError, match="nQ = 2"):
        block_sparse_prefill(q, k, v, ids[:, :, :1], cnt)
    with pytest.raises(TypeError, match="integer"):
        block_sparse_prefill(q, k, v, ids.astype(jnp.float32), cnt)
    with pytest.raises(ValueError, match="head dim"):
        block_sparse_prefill(q[..., :48], k[..., :48], v[..., :48], ids, cnt)
    with pytest.raises(ValueError, match="block_rows"):
        block_sparse_prefill(q, k, v, ids, cnt, block_rows=96)


def test_lowers_to_triton_for_h100():
    S = jax.ShapeDtypeStruct
    B, H, T, G, D = 1, 8, 1024, 4, 128
    args = (
        S((B, H, T, G, D), jnp.bfloat16),
        S((B, H, T, D), jnp.bfloat16),
        S((B, H, T, D), jnp.bfloat16),
        S((B, H, T // 64, 8), jnp.int32),
        S((B, H, T // 64), jnp.int32),
    )
    assert has_triton_call(lower_for_h100(block_sparse_prefill, *args, interpret=False))
    assert has_triton_call(
        lower_for_h100(
            block_sparse_prefill,
            *args,
            interpret=False,
            causal=False,
            block_rows=64,
            num_warps=4,
            num_stages=3,
        )
    )
