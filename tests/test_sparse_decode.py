"""Sparse decode kernel (interpret mode on CPU) against its jnp reference and dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import random_block_selection, valid_blocks
from pallas_kernels.sparse_decode import sparse_decode, sparse_decode_ref


def _inputs(seed, B, H, G, D, N, dtype, key_scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, G, D)).astype(np.float32)
    k = rng.standard_normal((H, N, D)).astype(np.float32) * key_scale
    v = rng.standard_normal((H, N, D)).astype(np.float32)
    return rng, jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _tol(dtype):
    return 2e-2 if dtype == jnp.bfloat16 else 1e-5


# (seed, B, H, G, D, N, dtype, n_fixed, n_clustered, block_k, blocks_per_step, num_splits, capacity)
CASES = [
    (0, 1, 2, 1, 64, 256, jnp.float32, 37, 150, 16, 2, 1, 12),
    (1, 2, 1, 3, 64, 512, jnp.bfloat16, 100, 300, 16, 4, 3, 20),
    (2, 2, 2, 4, 128, 512, jnp.float32, 70, 380, 16, 8, 2, 17),
    (3, 1, 2, 8, 128, 384, jnp.bfloat16, 5, 250, 64, 1, 4, 5),
    (4, 2, 1, 3, 128, 1024, jnp.float32, 130, 700, 32, 2, None, 20),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_reference(case):
    seed, B, H, G, D, N, dtype, n_fixed, n_clustered, block_k, P, S, M = case
    fixed_pad = -(-n_fixed // 64) * 64
    rng, q, k, v = _inputs(seed, B, H, G, D, N, dtype)
    cand = valid_blocks(n_fixed, fixed_pad, n_clustered, block_k)
    counts = rng.integers(1, min(M, len(cand)) + 1, size=(B, H))
    counts.flat[0] = 1  # a single selected block
    counts.flat[-1] = min(M, len(cand))  # a full selection
    ids, cnt = random_block_selection(rng, (B, H), cand, counts, M)
    kw = dict(
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=n_clustered,
        block_k=block_k,
        blocks_per_step=P,
        num_splits=S,
        interpret=True,
    )
    out, lse = sparse_decode(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    out_r, lse_r = sparse_decode_ref(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    assert out.shape == (B, H, G, D) and out.dtype == dtype
    assert lse.shape == (B, H, G) and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all()
    assert _rel_err(out, out_r) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), atol=1e-4, rtol=1e-5)


def _dense_valid(q, k, v, n_fixed, fixed_pad, n_clustered):
    """Dense attention over the valid keys only, via jax.nn.dot_product_attention, plus numpy LSE."""
    B, H, G, D = q.shape
    N = k.shape[1]
    pos = np.arange(N)
    valid = (pos < n_fixed) | ((pos >= fixed_pad) & (pos < fixed_pad + n_clustered))
    sel = np.nonzero(valid)[0]
    k_sel = jnp.transpose(k[:, sel], (1, 0, 2))[None].repeat(B, 0).astype(jnp.float32)  # [B, S, H, D]
    v_sel = jnp.transpose(v[:, sel], (1, 0, 2))[None].repeat(B, 0).astype(jnp.float32)
    q_BTND = q.reshape(B, 1, H * G, D).astype(jnp.float32)
    out = jax.nn.dot_product_attention(q_BTND, k_sel, v_sel, implementation="xla").reshape(B, H, G, D)
    logits = np.einsum("bhgd,hsd->bhgs", np.asarray(q, np.float64), np.asarray(k[:, sel], np.float64))
    logits /= np.sqrt(D)
    mx = logits.max(-1)
    lse = mx + np.log(np.exp(logits - mx[..., None]).sum(-1))
    return out, lse


@pytest.mark.parametrize("G,dtype", [(3, jnp.float32), (4, jnp.bfloat16)])
def test_all_blocks_equals_dense(G, dtype):
    B, H, D, N, n_fixed, n_clustered, block_k = 2, 2, 64, 512, 45, 400, 16
    fixed_pad = 64
    _, q, k, v = _inputs(10 + G, B, H, G, D, N, dtype)
    cand = valid_blocks(n_fixed, fixed_pad, n_clustered, block_k)
    M = len(cand) + 5  # capacity larger than the count
    ids = np.concatenate([cand, np.full(M - len(cand), cand[-1])]).astype(np.int32)
    ids = np.broadcast_to(ids, (B, H, M))
    cnt = np.full((B, H), len(cand), np.int32)
    out, lse = sparse_decode(
        q,
        k,
        v,
        jnp.asarray(ids),
        jnp.asarray(cnt),
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=n_clustered,
        block_k=block_k,
        blocks_per_step=4,
        num_splits=3,
        interpret=True,
    )
    out_d, lse_d = _dense_valid(q, k, v, n_fixed, fixed_pad, n_clustered)
    assert _rel_err(out, out_d) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), lse_d, atol=1e-3, rtol=1e-4)


def test_huge_logits_no_nan():
    B, H, G, D, N, n_fixed, n_clustered = 1, 2, 4, 64, 256, 20, 180
    _, q, k, v = _inputs(7, B, H, G, D, N, jnp.float32, key_scale=1e3)
    rng = np.random.default_rng(7)
    cand = valid_blocks(n_fixed, 64, n_clustered, 16)
    ids, cnt = random_block_selection(rng, (B, H), cand, np.array([[1, 9]]), 9)
    kw = dict(
        n_fixed=n_fixed,
        fixed_pad=64,
        n_clustered=n_clustered,
        num_splits=2,
        blocks_per_step=2,
        interpret=True,
    )
    out, lse = sparse_decode(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    out_r, lse_r = sparse_decode_ref(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    assert _rel_err(out, out_r) < 1e-4
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), rtol=1e-5)


def test_selection_of_masked_blocks_only():
    """Blocks that hold no valid key give out = 0 and lse = -inf (never NaN); a mix ignores them."""
    B, H, G, D, N = 1, 2, 4, 64, 256
    _, q, k, v = _inputs(3, B, H, G, D, N, jnp.float32)
    # n_fixed = 10, fixed_pad = 64: blocks 1..3 are pure padding; n_clustered = 100 -> blocks 14..15 too.
    kw = dict(n_fixed=10, fixed_pad=64, n_clustered=100, blocks_per_step=2, num_splits=2, interpret=True)
    ids = jnp.asarray([[[1, 2, 3, 3], [0, 2, 5, 15]]], jnp.int32)
    cnt = jnp.asarray([[3, 4]], jnp.int32)
    out, lse = sparse_decode(q, k, v, ids, cnt, **kw)
    out_r, lse_r = sparse_decode_ref(q, k, v, ids, cnt, **kw)
    assert np.all(np.asarray(out[0, 0]) == 0) and np.all(np.isneginf(np.asarray(lse[0, 0])))
    assert np.isfinite(np.asarray(lse[0, 1])).all()
    assert _rel_err(out, out_r) < 1e-5
    ids_valid = jnp.asarray([[[1, 1, 1, 1], [0, 5, 5, 5]]], jnp.int32)
    out_v, lse_v = sparse_decode(q, k, v, ids_valid, jnp.asarray([[1, 2]], jnp.int32), **kw)
    np.testing.assert_allclose(np.asarray(out_v[0, 1]), np.asarray(out[0, 1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse_v[0, 1]), np.asarray(lse[0, 1]), atol=1e-6)


def test_entries_past_count_are_ignored():
    B, H, G, D, N = 1, 1, 1, 64, 256
    _, q, k, v = _inputs(5, B, H, G, D, N, jnp.float32)
    kw = dict(n_fixed=64, fixed_pad=64, n_clustered=192, blocks_per_step=4, num_splits=1, interpret=True)
    a = sparse_decode(q, k, v, jnp.asarray([[[0, 3, 9, 9, 9, 9]]]), jnp.asarray([[3]]), **kw)
    b = sparse_decode(q, k, v, jnp.asarray([[[0, 3, 9, 11, 12, 15]]]), jnp.asarray([[3]]), **kw)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_bad_inputs_raise():
    q = jnp.zeros((1, 2, 4, 64), jnp.float32)
    k = jnp.zeros((2, 256, 64), jnp.float32)
    ids = jnp.zeros((1, 2, 4), jnp.int32)
    cnt = jnp.ones((1, 2), jnp.int32)
    kw = dict(n_fixed=10, fixed_pad=64, n_clustered=100, interpret=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        sparse_decode(q, k[:, :200], k[:, :200], ids, cnt, **kw)
    with pytest.raises(ValueError, match="head dim"):
        sparse_decode(q[..., :48], k[..., :48], k[..., :48], ids, cnt, **kw)
    with pytest.raises(ValueError, match="fixed_pad"):
        sparse_decode(q, k, k, ids, cnt, n_fixed=70, fixed_pad=64, n_clustered=10, interpret=True)
    with pytest.raises(ValueError, match="exceeds"):
        sparse_decode(q, k, k, ids, cnt, n_fixed=10, fixed_pad=64, n_clustered=300, interpret=True)
    with pytest.raises(ValueError, match="block_ids"):
        sparse_decode(q, k, k, ids[0], cnt, **kw)
    with pytest.raises(ValueError, match="block_count"):
        sparse_decode(q, k, k, ids, cnt[0], **kw)
    with pytest.raises(ValueError, match="blocks_per_step"):
        sparse_decode(q, k, k, ids, cnt, blocks_per_step=3, **kw)
    with pytest.raises(ValueError, match="block_k"):
        sparse_decode(q, k, k, ids, cnt, block_k=24, **kw)
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_decode(q, k.astype(jnp.bfloat16), k, ids, cnt, **kw)
    with pytest.raises(ValueError, match="does not match"):
        sparse_decode(q, k[:1], k[:1], ids, cnt, **kw)


# (seed, B, H, G, D, U, dtype, user_len per row, user_keys_per_split, blocks_per_step)
USER_CASES = [
    (20, 2, 2, 4, 64, 300, jnp.float32, (1, 300), 128, 8),  # one key / the whole cache; U not a tile multiple
    (21, 3, 1, 3, 128, 64, jnp.bfloat16, (17, 64, 40), 128, 8),  # cache shorter than one split
    (22, 1, 2, 8, 128, 513, jnp.bfloat16, (260,), 256, 4),  # splits past user_len do no work
]


@pytest.mark.parametrize("case", USER_CASES, ids=[f"user{c[0]}" for c in USER_CASES])
def test_user_tokens_match_reference_and_dense(case):
    """Context blocks + the row's own cache in one launch == the reference == context part merged with a
    dense attention over the valid cache entries."""
    from pallas_kernels.merge import dense_attention_lse, merge_attention

    seed, B, H, G, D, U, dtype, lens, per_split, P = case
    n_fixed, fixed_pad, n_clustered, N, M = 20, 64, 400, 512, 9
    rng, q, k, v = _inputs(seed, B, H, G, D, N, dtype)
    ku = jnp.asarray(rng.standard_normal((B, U, H, D)), dtype)
    vu = jnp.asarray(rng.standard_normal((B, U, H, D)), dtype)
    user_len = jnp.asarray(lens, jnp.int32)
    cand = valid_blocks(n_fixed, fixed_pad, n_clustered, 16)
    ids, cnt = random_block_selection(rng, (B, H), cand, rng.integers(1, M + 1, size=(B, H)), M)
    ids, cnt = jnp.asarray(ids), jnp.asarray(cnt)
    kw = dict(n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered, blocks_per_step=P, num_splits=2,
              interpret=True)
    user = dict(k_user_BUHD=ku, v_user_BUHD=vu, user_len_B=user_len, user_keys_per_split=per_split)
    out, lse = sparse_decode(q, k, v, ids, cnt, **kw, **user)
    out_r, lse_r = sparse_decode_ref(q, k, v, ids, cnt, **kw, **user)
    assert out.shape == (B, H, G, D) and out.dtype == dtype and lse.shape == (B, H, G)
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all()
    assert _rel_err(out, out_r) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), atol=1e-4, rtol=1e-5)
    # the same as the two-part computation it replaces
    o_c, lse_c = sparse_decode_ref(q, k, v, ids, cnt, **kw)
    mask_BU = jnp.arange(U)[None] < user_len[:, None]
    o_u, lse_u = dense_attention_lse(q[:, :, None].astype(jnp.float32), ku.transpose(0, 2, 1, 3).astype(jnp.float32),
                                     vu.transpose(0, 2, 1, 3).astype(jnp.float32), mask_BU[:, None, None, :])
    o_m, lse_m = merge_attention(o_c[:, :, None].astype(jnp.float32), lse_c[:, :, None], o_u, lse_u)
    assert _rel_err(out, o_m[:, :, 0]) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_m[:, :, 0]), atol=1e-3, rtol=1e-4)


def test_user_tokens_ignore_entries_past_length():
    B, H, G, D, U = 1, 1, 2, 64, 200
    rng, q, k, v = _inputs(30, B, H, G, D, 256, jnp.float32)
    ku = jnp.asarray(rng.standard_normal((B, U, H, D)), jnp.float32)
    vu = jnp.asarray(rng.standard_normal((B, U, H, D)), jnp.float32)
    kw = dict(n_fixed=64, fixed_pad=64, n_clustered=192, num_splits=1, interpret=True)
    ids, cnt = jnp.asarray([[[0, 3, 5]]]), jnp.asarray([[3]])
    a = sparse_decode(q, k, v, ids, cnt, k_user_BUHD=ku, v_user_BUHD=vu, user_len_B=jnp.asarray([70]), **kw)
    b = sparse_decode(q, k, v, ids, cnt, k_user_BUHD=ku.at[:, 70:].set(1e4), v_user_BUHD=vu.at[:, 70:].set(jnp.nan),
                      user_len_B=jnp.asarray([70]), **kw)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_user_token_bad_inputs_raise():
    q = jnp.zeros((2, 2, 4, 64), jnp.float32)
    k = jnp.zeros((2, 256, 64), jnp.float32)
    ids, cnt = jnp.zeros((2, 2, 4), jnp.int32), jnp.ones((2, 2), jnp.int32)
    ku = jnp.zeros((2, 100, 2, 64), jnp.float32)
    kw = dict(n_fixed=10, fixed_pad=64, n_clustered=100, interpret=True)
    lens = jnp.asarray([3, 4], jnp.int32)
    with pytest.raises(ValueError, match="go together"):
        sparse_decode(q, k, k, ids, cnt, k_user_BUHD=ku, v_user_BUHD=ku, **kw)
    with pytest.raises(ValueError, match="does not match"):
        sparse_decode(q, k, k, ids, cnt, k_user_BUHD=ku[:, :, :1], v_user_BUHD=ku[:, :, :1], user_len_B=lens, **kw)
    with pytest.raises(TypeError, match="dtype"):
        bf = ku.astype(jnp.bfloat16)
        sparse_decode(q, k, k, ids, cnt, k_user_BUHD=bf, v_user_BUHD=bf, user_len_B=lens, **kw)
    with pytest.raises(ValueError, match="user_len_B"):
        sparse_decode(q, k, k, ids, cnt, k_user_BUHD=ku, v_user_BUHD=ku, user_len_B=lens[:1], **kw)
    with pytest.raises(ValueError, match="user_keys_per_split"):
        sparse_decode(q, k, k, ids, cnt, k_user_BUHD=ku, v_user_BUHD=ku, user_len_B=lens, user_keys_per_split=100,
                      **kw)


@pytest.mark.parametrize("R,rows_per_program,dtype", [(37, 16, jnp.float32), (12, 128, jnp.bfloat16)])
def test_all_keys_attention_equals_dense(R, rows_per_program, dtype):
    """Many query rows over every valid key (rows folded into several tiles when R > rows_per_program)."""
    from pallas_kernels.sparse_decode import all_keys_attention

    B, H, D, N, n_fixed, n_clustered = 2, 2, 64, 512, 45, 400
    _, q, k, v = _inputs(40 + R, B, H, R, D, N, dtype)
    lay = dict(n_fixed=n_fixed, fixed_pad=64, n_clustered=n_clustered)
    out, lse = all_keys_attention(q, k, v, rows_per_program=rows_per_program, interpret=True, **lay)
    out_r, lse_r = all_keys_attention(q, k, v, reference=True, **lay)
    out_d, lse_d = _dense_valid(q, k, v, **lay)
    assert out.shape == (B, H, R, D) and lse.shape == (B, H, R)
    assert _rel_err(out, out_r) < _tol(dtype) and _rel_err(out, out_d) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), lse_d, atol=1e-3, rtol=1e-4)


# (seed, B, H, G, D, N, dtype, n_fixed, n_clustered, block_k, blocks_per_step, num_splits, user entries)
DENSE_CASES = [
    (20, 1, 2, 4, 64, 256, jnp.float32, 5, 150, 16, 8, None, 0),
    (21, 2, 1, 3, 128, 192, jnp.bfloat16, 3, 120, 16, 8, 2, 40),  # 192 keys: the last step's slice pulled back
    (22, 1, 2, 1, 64, 64, jnp.float32, 0, 64, 16, 8, 3, 0),  # shorter than one step: the step shrinks to 64 keys
    (23, 1, 1, 8, 128, 384, jnp.float32, 16, 300, 32, 4, 5, 300),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[f"case{c[0]}" for c in DENSE_CASES])
def test_dense_decode_matches_reference(case):
    """`dense_decode` (contiguous slices) equals the reference over every block, with and without user tokens,
    at lengths that are not a multiple of a step and splits that do not divide the blocks."""
    from pallas_kernels.sparse_decode import dense_decode

    seed, B, H, G, D, N, dtype, n_fixed, n_clustered, block_k, P, S, U = case
    fixed_pad = -(-n_fixed // 64) * 64 if n_fixed else 0
    rng, q, k, v = _inputs(seed, B, H, G, D, N, dtype)
    kw = dict(n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered, block_k=block_k, blocks_per_step=P,
              num_splits=S)
    if U:
        ku = jnp.asarray(rng.standard_normal((B, U, H, D)), dtype)
        kw.update(k_user_BUHD=ku, v_user_BUHD=ku * 0.5, user_len_B=jnp.asarray(rng.integers(1, U + 1, size=B)))
    out, lse = dense_decode(q, k, v, interpret=True, **kw)
    ref_out, ref_lse = dense_decode(q, k, v, reference=True, **kw)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _rel_err(out, ref_out) < _tol(dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-3 if dtype == jnp.bfloat16 else 1e-5)
    # the same as the gather kernel over every block id
    nb = N // block_k
    ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, H, nb))
    g_out, _ = sparse_decode(q, k, v, ids, jnp.full((B, H), nb, jnp.int32), interpret=True, **kw)
    assert _rel_err(out, g_out) < _tol(dtype)


def test_selection_of_every_block_matches_reference():
    """capacity == blocks: a row whose count is every block and a row one short both equal the reference."""
    B, H, G, D, N, bk = 2, 2, 4, 64, 320, 16
    rng, q, k, v = _inputs(30, B, H, G, D, N, jnp.float32)
    nb = N // bk
    ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, H, nb))
    cnt = jnp.asarray([[nb, nb - 1], [nb - 1, nb]], jnp.int32)
    kw = dict(n_fixed=20, fixed_pad=64, n_clustered=250, block_k=bk, blocks_per_step=4, num_splits=3)
    out, lse = sparse_decode(q, k, v, ids, cnt, interpret=True, **kw)
    ref_out, ref_lse = sparse_decode_ref(q, k, v, ids, cnt, **kw)
    assert _rel_err(out, ref_out) < 1e-5
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5)
