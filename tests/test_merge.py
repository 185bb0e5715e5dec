"""LSE merge of partial attention results and the small dense attention with LSE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.merge import combine_partials, dense_attention_lse, merge_attention


def _qkv(seed, B=2, H=2, T=5, G=3, S=24, D=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, H, T, G, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, H, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, H, S, D)), dtype)
    return q, k, v


def test_dense_matches_jax_attention_causal():
    B, H, T, G, S, D = 2, 2, 6, 3, 6, 16
    q, k, v = _qkv(0, B, H, T, G, S, D)
    causal = jnp.tril(jnp.ones((T, S), bool))
    out, lse = dense_attention_lse(q, k, v, causal)
    q_BTND = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, T, H * G, D)
    k_BSKD, v_BSKD = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    ref = jax.nn.dot_product_attention(q_BTND, k_BSKD, v_BSKD, is_causal=True, implementation="xla")
    ref = jnp.transpose(ref.reshape(B, T, H, G, D), (0, 2, 1, 3, 4))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    logits = np.einsum("bhtgd,bhsd->bhtgs", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 4.0
    logits = np.where(np.asarray(causal)[None, None, :, None, :], logits, -np.inf)
    lse_ref = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(lse), lse_ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merging_two_key_halves_equals_attention_over_all(dtype):
    q, k, v = _qkv(1, dtype=dtype)
    out_all, lse_all = dense_attention_lse(q, k, v)
    o1, l1 = dense_attention_lse(q, k[:, :, :10], v[:, :, :10])
    o2, l2 = dense_attention_lse(q, k[:, :, 10:], v[:, :, 10:])
    out, lse = merge_attention(o1, l1, o2, l2)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    atol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_all, np.float32), atol=atol)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_all), atol=1e-5)


def test_merge_with_empty_sides():
    q, k, v = _qkv(2)
    o, lse = dense_attention_lse(q, k, v)
    empty_o, empty_lse = jnp.zeros_like(o), jnp.full_like(lse, -jnp.inf)
    for args in [(o, lse, empty_o, empty_lse), (empty_o, empty_lse, o, lse)]:
        mo, ml = merge_attention(*args)
        np.testing.assert_allclose(np.asarray(mo), np.asarray(o), atol=1e-6)
        np.testing.assert_allclose(np.asarray(ml), np.asarray(lse), atol=1e-6)
    mo, ml = merge_attention(empty_o, empty_lse, empty_o, empty_lse)
    assert np.all(np.asarray(mo) == 0) and np.all(np.isneginf(np.asarray(ml)))


def test_merge_huge_lse_is_stable():
    o1 = jnp.ones((3, 8))
    o2 = -jnp.ones((3, 8))
    lse1 = jnp.asarray([1e4, 1e4, -1e4])
    lse2 = jnp.asarray([1e4, 1e4 - 50.0, 1e4])
    o, lse = merge_attention(o1, lse1, o2, lse2)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(lse)).all()
    np.testing.assert_allclose(np.asarray(o[0]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(o[1]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(o[2]), -1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse[0]), 1e4 + np.log(2.0), rtol=1e-7)


def test_combine_partials_many_splits():
    q, k, v = _qkv(3, S=32)
    out_all, lse_all = dense_attention_lse(q, k, v)
    parts = [dense_attention_lse(q, k[:, :, i : i + 8], v[:, :, i : i + 8]) for i in range(0, 32, 8)]
    empty = (jnp.zeros_like(parts[0][0]), jnp.full_like(parts[0][1], -jnp.inf))
    parts.append(empty)
    o_S = jnp.stack([p[0] for p in parts], axis=2)
    lse_S = jnp.stack([p[1] for p in parts], axis=2)
    out, lse = combine_partials(o_S, lse_S, axis=2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_all), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_all), atol=1e-5)


def test_fully_masked_rows_give_zero_and_neg_inf():
    q, k, v = _qkv(4, T=3, S=4)
    mask = jnp.asarray([[True, False, False, False], [False] * 4, [True] * 4])
    out, lse = dense_attention_lse(q, k, v, mask)
    assert np.all(np.asarray(out[:, :, 1]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :, 1])))
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse[:, :, [0, 2]])).all()
    np.testing.assert_allclose(
        np.asarray(out[:, :, 0]),
        np.broadcast_to(np.asarray(v[:, :, 0])[:, :, None], out[:, :, 0].shape),
        atol=1e-6,
    )


def test_shape_errors():
    q, k, v = _qkv(5)
    o, lse = dense_attention_lse(q, k, v)
    with pytest.raises(ValueError, match="output shapes differ"):
        merge_attention(o, lse, o[..., :8], lse)
    with pytest.raises(ValueError, match="lse shapes"):
        merge_attention(o, lse, o, lse[..., :1])
    with pytest.raises(ValueError, match="dense_attention_lse expects"):
        dense_attention_lse(q[0], k, v)
    with pytest.raises(ValueError, match="does not match"):
        dense_attention_lse(q, k[:, :1], v[:, :1])
