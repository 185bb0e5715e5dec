"""Vertical-slash prefill kernel (interpret mode on CPU) vs its jnp reference and dense causal attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import block_sparse_prefill_ref
from pallas_kernels.common import has_triton_call, lower_for_h100
from pallas_kernels.vertical_slash import (
    full_prefix,
    vertical_slash_key_counts,
    vertical_slash_prefill,
    vertical_slash_prefill_ref,
)
from squeeze_jax.minference.patterns import (
    a_shape_index,
    block_sparse_to_vertical_slash,
    vertical_slash_index,
)
from squeeze_jax.minference.search import planted_attention_sample


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
    return np.einsum("bhtgs,bhsd->bhtgd", p / p.sum(-1, keepdims=True), v), np.log(p.sum(-1)) + m[..., 0]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _tol(dtype):
    return 2e-2 if dtype == jnp.bfloat16 else 2e-5


def _args(idx):
    return (idx.tile_start, idx.tile_end, idx.tile_count, idx.column_index, idx.column_count)


# (seed, B, H, T, G, D, dtype, n_vertical, n_slash)
CASES = [
    (0, 1, 2, 200, 4, 64, jnp.float32, 12, 40),
    (1, 2, 1, 320, 1, 128, jnp.bfloat16, 20, 24),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_estimated_index_matches_reference(case):
    """The estimator's own index on planted q/k, through the kernel and the reference."""
    seed, B, H, T, G, D, dtype, nv, ns = case
    kinds = ["vertical_slash", "local"][:H]
    q, k, _ = planted_attention_sample(
        seed, kinds, seq_len=T, batch=B, groups=G, head_dim=D, dtype=dtype, slash_offsets=[T // 3, T // 2 + 7]
    )
    q, k = q[0], k[0]
    v = jnp.asarray(np.random.default_rng(seed).standard_normal(k.shape), dtype)
    idx = vertical_slash_index(q, k, n_vertical=nv, n_slash=ns, n_sink_cols=4, n_local_diags=10)
    assert int(jnp.max(idx.tile_count)) >= 2 and int(jnp.max(idx.column_count)) >= 1  # both paths used
    out, lse = vertical_slash_prefill(q, k, v, *_args(idx), interpret=True)
    out_r, lse_r = vertical_slash_prefill_ref(q, k, v, *_args(idx))
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:4] and lse.dtype == jnp.float32
    assert _rel(out, out_r) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), atol=2e-3 if dtype == jnp.bfloat16 else 1e-5)


def test_full_budget_equals_dense():
    B, H, T, G, D = 1, 2, 200, 4, 64
    _, q, k, v = _qkv(5, B, H, T, G, D, jnp.float32)
    idx = vertical_slash_index(q, k, n_vertical=T, n_slash=T, n_sink_cols=30, n_local_diags=100)
    counts = vertical_slash_key_counts(*_args(idx), T)
    causal_blocks = (np.arange(T)[None, :] < np.minimum(np.arange(4) * 64 + 64, T)[:, None]).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(counts), np.broadcast_to(causal_blocks, counts.shape))
    out, lse = vertical_slash_prefill(q, k, v, *_args(idx), interpret=True)
    ref_out, ref_lse = dense_causal(q, k, v)
    assert _rel(out, ref_out) < 2e-5
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4)


def _hand_index():
    """Tiles (<= 64 keys, unaligned) that run into the future and past the padded end, and columns at or
    after the query rows."""
    nq = 4  # T = 200
    ts = np.zeros((1, 1, nq, 5), np.int32)
    te = np.zeros_like(ts)
    tc = np.zeros((1, 1, nq), np.int32)
    cols = np.zeros((1, 1, nq, 4), np.int32)
    cc = np.zeros((1, 1, nq), np.int32)
    spec = {  # query block: (tiles, columns)
        0: ([(0, 10), (20, 84), (84, 130)], [15, 150, 199]),
        1: ([(5, 6), (60, 124), (124, 188)], [0, 1, 2, 30]),
        2: ([(0, 64), (100, 117), (150, 200)], [70, 140, 185]),  # (0, 64): full, walked without a mask
        3: (
            [(64, 128), (0, 3), (40, 50), (130, 194), (195, 200)],
            [10, 55, 129, 194],
        ),  # (195, 200): from 192
    }
    for i, (tiles, c) in spec.items():
        tc[0, 0, i], cc[0, 0, i] = len(tiles), len(c)
        ts[0, 0, i, : len(tiles)] = [a for a, _ in tiles]
        te[0, 0, i, : len(tiles)] = [b for _, b in tiles]
        cols[0, 0, i, : len(c)] = c
    return tuple(jnp.asarray(x) for x in (ts, te, tc, cols, cc))


def test_future_keys_never_change_outputs():
    B, H, T, G, D = 1, 2, 200, 4, 64
    rng, q, k, v = _qkv(7, B, H, T, G, D, jnp.float32)
    index = _hand_index()
    prefix = full_prefix(index[0], index[1], index[2], block_q=64, block_k=64, t_keys=256)
    np.testing.assert_array_equal(np.asarray(prefix)[0, 0], [0, 0, 1, 1])  # both kernel loops are used
    out1, lse1 = vertical_slash_prefill(q, k, v, *index, interpret=True)
    out_r, lse_r = vertical_slash_prefill_ref(q, k, v, *index)
    assert _rel(out1, out_r) < 2e-5
    np.testing.assert_allclose(np.asarray(lse1), np.asarray(lse_r), atol=1e-5)
    for t0 in (40, 150):
        k2 = k.at[:, :, t0 + 1 :].add(jnp.asarray(rng.standard_normal((B, H, T - t0 - 1, D)), jnp.float32) * 3)
        v2 = v.at[:, :, t0 + 1 :].set(-1e3)
        out2, lse2 = vertical_slash_prefill(q, k2, v2, *index, interpret=True)
        np.testing.assert_array_equal(np.asarray(out1)[:, :, : t0 + 1], np.asarray(out2)[:, :, : t0 + 1])
        np.testing.assert_array_equal(np.asarray(lse1)[:, :, : t0 + 1], np.asarray(lse2)[:, :, : t0 + 1])


def test_block_pattern_as_tiles_matches_block_sparse():
    B, H, T, G, D = 1, 2, 200, 4, 64
    _, q, k, v = _qkv(8, B, H, T, G, D, jnp.float32)
    a = a_shape_index(T, n_sink=40, n_local=70)
    ids = jnp.broadcast_to(a.block_ids, (B, H) + a.block_ids.shape)
    cnt = jnp.broadcast_to(a.block_count, (B, H) + a.block_count.shape)
    vs = block_sparse_to_vertical_slash(a)
    out_bs, lse_bs = block_sparse_prefill_ref(q, k, v, ids, cnt)
    out_vs, lse_vs = vertical_slash_prefill(q, k, v, *_args(vs), interpret=True)
    assert _rel(out_vs, out_bs) < 2e-5
    np.testing.assert_allclose(np.asarray(lse_vs), np.asarray(lse_bs), atol=1e-5)


def test_bad_inputs_raise():
    _, q, k, v = _qkv(0, 1, 2, 128, 2, 64, jnp.float32)
    r = jnp.zeros((1, 2, 2, 3), jnp.int32)
    c = jnp.zeros((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="share a shape"):
        vertical_slash_prefill(q, k, v, r, r[..., :2], c, r, c)
    with pytest.raises(ValueError, match="column_count"):
        vertical_slash_prefill(q, k, v, r, r, c, r, c[:, :, :1])
    with pytest.raises(TypeError, match="tile_end must be an integer"):
        vertical_slash_prefill(q, k, v, r, r.astype(jnp.float32), c, r, c)
    with pytest.raises(ValueError, match="block_k"):
        vertical_slash_prefill(q, k, v, r, r, c, r, c, block_k=8)


def test_lowers_to_triton_for_h100():
    S = jax.ShapeDtypeStruct
    B, H, T, G, D = 1, 8, 1024, 4, 128
    nq = T // 64
    args = (
        S((B, H, T, G, D), jnp.bfloat16),
        S((B, H, T, D), jnp.bfloat16),
        S((B, H, T, D), jnp.bfloat16),
        S((B, H, nq, 37), jnp.int32),
        S((B, H, nq, 37), jnp.int32),
        S((B, H, nq), jnp.int32),
        S((B, H, nq, 100), jnp.int32),
        S((B, H, nq), jnp.int32),
    )
    assert has_triton_call(lower_for_h100(vertical_slash_prefill, *args, interpret=False))
    assert has_triton_call(
        lower_for_h100(vertical_slash_prefill, *args, interpret=False, block_rows=64, num_warps=4, num_stages=3)
    )
