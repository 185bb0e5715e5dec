"""Sparse prefill kernel (interpret mode on CPU) against its jnp reference and dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import random_block_selection, valid_blocks
from pallas_kernels.sparse_prefill import sparse_prefill, sparse_prefill_ref


def _inputs(seed, B, H, T, G, D, N, dtype, key_scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, T, G, D)).astype(np.float32)
    k = rng.standard_normal((H, N, D)).astype(np.float32) * key_scale
    v = rng.standard_normal((H, N, D)).astype(np.float32)
    return rng, jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _tol(dtype):
    return 2e-2 if dtype == jnp.bfloat16 else 1e-5


# (seed, B, H, T, G, D, N, dtype, n_fixed, n_clustered, block_q, block_k, blocks_per_step, block_rows, M)
CASES = [
    (0, 1, 2, 21, 1, 64, 256, jnp.float32, 37, 150, 8, 16, 2, None, 10),
    (1, 2, 1, 19, 3, 64, 512, jnp.bfloat16, 100, 300, 8, 16, 4, 16, 20),
    (2, 1, 2, 16, 4, 128, 384, jnp.float32, 70, 250, 8, 32, 1, None, 8),
    (3, 2, 1, 13, 8, 128, 256, jnp.bfloat16, 5, 180, 4, 16, 4, 16, 12),
    (4, 1, 1, 5, 3, 64, 320, jnp.float32, 64, 200, 3, 16, 2, None, 9),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_reference(case):
    seed, B, H, T, G, D, N, dtype, n_fixed, n_clustered, block_q, block_k, P, rows, M = case
    fixed_pad = -(-n_fixed // 64) * 64
    nQ = -(-T // block_q)
    rng, q, k, v = _inputs(seed, B, H, T, G, D, N, dtype)
    cand = valid_blocks(n_fixed, fixed_pad, n_clustered, block_k)
    counts = rng.integers(1, min(M, len(cand)) + 1, size=(B, H, nQ))
    counts.flat[0] = 1
    counts.flat[-1] = min(M, len(cand))
    ids, cnt = random_block_selection(rng, (B, H, nQ), cand, counts, M)
    kw = dict(
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=n_clustered,
        block_q=block_q,
        block_k=block_k,
        blocks_per_step=P,
        block_rows=rows,
        interpret=True,
    )
    out, lse = sparse_prefill(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    out_r, lse_r = sparse_prefill_ref(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    assert out.shape == (B, H, T, G, D) and out.dtype == dtype
    assert lse.shape == (B, H, T, G) and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all()
    assert _rel_err(out, out_r) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("G,dtype", [(3, jnp.float32), (4, jnp.bfloat16)])
def test_all_blocks_equals_dense(G, dtype):
    B, H, T, D, N, n_fixed, n_clustered, block_q = 2, 2, 11, 64, 384, 45, 300, 4
    fixed_pad = 64
    _, q, k, v = _inputs(20 + G, B, H, T, G, D, N, dtype)
    cand = valid_blocks(n_fixed, fixed_pad, n_clustered, 16)
    nQ, M = -(-T // block_q), len(cand) + 3
    ids = np.concatenate([cand, np.full(M - len(cand), cand[-1])]).astype(np.int32)
    ids = np.broadcast_to(ids, (B, H, nQ, M))
    cnt = np.full((B, H, nQ), len(cand), np.int32)
    out, lse = sparse_prefill(
        q,
        k,
        v,
        jnp.asarray(ids),
        jnp.asarray(cnt),
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=n_clustered,
        block_q=block_q,
        blocks_per_step=4,
        interpret=True,
    )
    pos = np.arange(N)
    sel = np.nonzero((pos < n_fixed) | ((pos >= fixed_pad) & (pos < fixed_pad + n_clustered)))[0]
    k_BSHD = jnp.transpose(k[:, sel], (1, 0, 2))[None].repeat(B, 0).astype(jnp.float32)
    v_BSHD = jnp.transpose(v[:, sel], (1, 0, 2))[None].repeat(B, 0).astype(jnp.float32)
    q_BTND = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, T, H * G, D).astype(jnp.float32)
    out_d = jax.nn.dot_product_attention(q_BTND, k_BSHD, v_BSHD, implementation="xla")
    out_d = jnp.transpose(out_d.reshape(B, T, H, G, D), (0, 2, 1, 3, 4))
    logits = np.einsum("bhtgd,hsd->bhtgs", np.asarray(q, np.float64), np.asarray(k[:, sel], np.float64))
    logits /= np.sqrt(D)
    mx = logits.max(-1)
    lse_d = mx + np.log(np.exp(logits - mx[..., None]).sum(-1))
    assert _rel_err(out, out_d) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), lse_d, atol=1e-3, rtol=1e-4)


def test_huge_logits_and_single_block():
    B, H, T, G, D, N, n_fixed, n_clustered, block_q = 1, 2, 9, 4, 64, 256, 20, 180, 4
    rng, q, k, v = _inputs(9, B, H, T, G, D, N, jnp.float32, key_scale=1e3)
    cand = valid_blocks(n_fixed, 64, n_clustered, 16)
    ids, cnt = random_block_selection(rng, (B, H, 3), cand, np.array([[[1, 6, 1], [8, 1, 3]]]), 8)
    kw = dict(
        n_fixed=n_fixed,
        fixed_pad=64,
        n_clustered=n_clustered,
        block_q=block_q,
        blocks_per_step=2,
        interpret=True,
    )
    out, lse = sparse_prefill(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    out_r, lse_r = sparse_prefill_ref(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    assert _rel_err(out, out_r) < 1e-4
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), rtol=1e-5)


def test_query_blocks_use_their_own_selection():
    """Changing one query block's selection changes only that block's rows."""
    B, H, T, G, D, N, block_q = 1, 1, 8, 1, 64, 256, 4
    _, q, k, v = _inputs(4, B, H, T, G, D, N, jnp.float32)
    kw = dict(n_fixed=64, fixed_pad=64, n_clustered=192, block_q=block_q, blocks_per_step=2, interpret=True)
    cnt = jnp.asarray([[[2, 2]]], jnp.int32)
    a = sparse_prefill(q, k, v, jnp.asarray([[[[0, 5], [1, 7]]]], jnp.int32), cnt, **kw)
    b = sparse_prefill(q, k, v, jnp.asarray([[[[0, 5], [2, 9]]]], jnp.int32), cnt, **kw)
    np.testing.assert_array_equal(np.asarray(a[0][:, :, :4]), np.asarray(b[0][:, :, :4]))
    assert np.abs(np.asarray(a[0][:, :, 4:]) - np.asarray(b[0][:, :, 4:])).max() > 1e-3


def test_bad_inputs_raise():
    q = jnp.zeros((1, 2, 10, 4, 64), jnp.float32)
    k = jnp.zeros((2, 256, 64), jnp.float32)
    ids = jnp.zeros((1, 2, 3, 4), jnp.int32)
    cnt = jnp.ones((1, 2, 3), jnp.int32)
    kw = dict(n_fixed=10, fixed_pad=64, n_clustered=100, interpret=True)
    with pytest.raises(ValueError, match="nQ"):
        sparse_prefill(q, k, k, ids, cnt, block_q=8, **kw)
    with pytest.raises(ValueError, match="block_count"):
        sparse_prefill(q, k, k, ids, cnt[..., :2], block_q=4, **kw)
    with pytest.raises(ValueError, match="block_rows"):
        sparse_prefill(q, k, k, ids, cnt, block_q=4, block_rows=48, **kw)
    with pytest.raises(ValueError, match="block_q"):
        sparse_prefill(q, k, k, ids, cnt, block_q=0, **kw)
    with pytest.raises(ValueError, match=r"\[B, H, T, G, D\]"):
        sparse_prefill(q[0], k, k, ids, cnt, block_q=4, **kw)
    with pytest.raises(ValueError, match="multiple of block_k"):
        sparse_prefill(q, k, k, ids, cnt, block_q=4, block_k=512, **kw)
