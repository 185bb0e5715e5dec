"""Merging partial attention results by log-sum-exp, and a small dense attention that returns its LSE.

Partial results are `(out, lse)` pairs: `out` is the softmax-normalised attention output over some key
set, `lse` the natural-log log-sum-exp of the scaled logits over that set (float32, `-inf` = "saw no key").
Merging is elementwise: XLA fuses it into one pass that reads each input and writes the result once, which
is the least any kernel must move, so it stays pure jnp (benchmarks/bench_sparse_attention.py times it next
to a plain fused add of the same bytes). It also fuses into its neighbours (e.g. the split-K combine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import default_scale


def _safe_max(x: jax.Array, axis: int) -> jax.Array:
    """Max over `axis` (kept), with non-finite maxima replaced by 0 so that `x - max` never gives NaN."""
    m = jnp.max(x, axis=axis, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def merge_attention(
    o1: jax.Array, lse1: jax.Array, o2: jax.Array, lse2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Combines two partial attention results over disjoint key sets.

    `o*` have shape `lse*.shape + (D,)`; either side may have `lse = -inf` (it then contributes nothing).
    Returns `(o, lse)` with `o` in `o1`'s dtype and `lse` float32; both `-inf` gives `o = 0, lse = -inf`.
    """
    if o1.shape != o2.shape:
        raise ValueError(f"merge_attention: output shapes differ: {o1.shape} vs {o2.shape}")
    if lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"merge_attention: lse shapes {lse1.shape}, {lse2.shape} must equal out shape[:-1] "
            f"{o1.shape[:-1]}"
        )
    lse_S = jnp.stack([lse1.astype(jnp.float32), lse2.astype(jnp.float32)], axis=0)
    o_S = jnp.stack([o1.astype(jnp.float32), o2.astype(jnp.float32)], axis=0)
    o, lse = combine_partials(o_S, lse_S, axis=0)
    return o.astype(o1.dtype), lse


def combine_partials(o_S: jax.Array, lse_S: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Merges partial results stacked along `axis` of `lse_S` (and the same axis of `o_S`).

    Returns float32 `(o, lse)` with that axis removed. Entries with `lse = -inf` contribute nothing; if
    every entry is `-inf` the result is `o = 0, lse = -inf` (never NaN).
    """
    axis = axis % lse_S.ndim
    m_safe = _safe_max(lse_S, axis)
    w = jnp.exp(lse_S - m_safe)  # exp(-inf) = 0 for empty partials
    denom = jnp.sum(w, axis=axis)
    o = jnp.sum(w[..., None] * o_S.astype(jnp.float32), axis=axis)
    o = o / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.log(denom) + jnp.squeeze(m_safe, axis)  # log(0) = -inf
    return o, lse


def dense_attention_lse(
    q_BHTGD: jax.Array,
    k_BHSD: jax.Array,
    v_BHSD: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense attention of grouped queries over a small key set, returning `(out_BHTGD, lse_BHTG)`.

    Used for the user/generated-token part of the prompt. Query head `h * G + g` reads KV head `h`.
    `mask` (bool, True = attend) broadcasts to `[B, H, T, S]` (e.g. a causal `[T, S]` mask); rows with no
    visible key give `out = 0`, `lse = -inf`. Logits and softmax in float32; `out` in q's dtype.
    """
    if q_BHTGD.ndim != 5 or k_BHSD.ndim != 4 or v_BHSD.shape != k_BHSD.shape:
        raise ValueError(
            "dense_attention_lse expects q [B,H,T,G,D] and k, v [B,H,S,D] of one shape; got "
            f"{q_BHTGD.shape}, {k_BHSD.shape}, {v_BHSD.shape}"
        )
    B, H, T, G, D = q_BHTGD.shape
    if k_BHSD.shape[:2] != (B, H) or k_BHSD.shape[3] != D:
        raise ValueError(f"k shape {k_BHSD.shape} does not match q shape {q_BHTGD.shape}")
    S = k_BHSD.shape[2]
    s = default_scale(D, scale)
    logits_BHTGS = jnp.einsum(
        "bhtgd,bhsd->bhtgs", q_BHTGD, k_BHSD, preferred_element_type=jnp.float32
    ) * s
    if mask is not None:
        mask_BHTS = jnp.broadcast_to(mask, (B, H, T, S))
        logits_BHTGS = jnp.where(mask_BHTS[:, :, :, None, :], logits_BHTGS, -jnp.inf)
    m_safe = _safe_max(logits_BHTGS, -1)
    p = jnp.exp(logits_BHTGS - m_safe)
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bhtgs,bhsd->bhtgd", p, v_BHSD.astype(jnp.float32))
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.log(denom) + m_safe[..., 0]
    return out.astype(q_BHTGD.dtype), lse


def last_valid_positions(seq_lens_B: jax.Array, rows: int, T: int) -> jax.Array:
    """`[B, rows]` positions of each row's last `rows` valid tokens (`seq_len - rows .. seq_len - 1`), clipped
    to `[0, T)`: a row shorter than `rows` repeats position 0, which selects the same query twice."""
    return jnp.clip(seq_lens_B[:, None] - rows + jnp.arange(rows)[None, :], 0, T - 1)


# Keys per step of `chunked_attention_lse` (bounds its `[B, H, L, G, keys]` float32 logits).
KEY_CHUNK = 16384


def chunked_attention_lse(
    q_BHLGD: jax.Array,
    k_BHSD: jax.Array,
    v_BHSD: jax.Array,
    mask_fn,
    *,
    key_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`dense_attention_lse` over the keys `key_chunk` (default `KEY_CHUNK`) at a time, merged by LSE (bounds the
    float32 logits to `[B, H, L, G, key_chunk]`). `mask_fn(s0, s1)` gives the mask of keys `[s0, s1)`,
    broadcastable to `[B, H, L, s1 - s0]`. Returns `(out float32, lse)`."""
    S = k_BHSD.shape[2]
    key_chunk = key_chunk or KEY_CHUNK
    o = lse = None
    for s0 in range(0, S, key_chunk):
        s1 = min(s0 + key_chunk, S)
        o_c, lse_c = dense_attention_lse(q_BHLGD, k_BHSD[:, :, s0:s1], v_BHSD[:, :, s0:s1], mask_fn(s0, s1))
        o_c = o_c.astype(jnp.float32)
        o, lse = (o_c, lse_c) if o is None else merge_attention(o, lse, o_c, lse_c)
    return o, lse


def put_rows(x_BHT: jax.Array, pos_BL: jax.Array, rows_BHL: jax.Array) -> jax.Array:
    """`x[b, :, pos[b, l]] = rows[b, :, l]` (axis 2 is the token axis; trailing axes ride along)."""
    return jax.vmap(lambda x, p, y: x.at[:, p].set(y.astype(x.dtype)))(x_BHT, pos_BL, rows_BHL)
