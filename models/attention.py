"""The attention interface every layer calls, the dense backend, and shared helpers.

A backend is a frozen (hashable) dataclass, so it can be a static argument of `jax.jit`. Per layer it gets the
new post-RoPE queries/keys/values of a chunk, the layer's cache and the per-row lengths; it writes the chunk
into the cache and returns the attention output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from models.kv_cache import LayerKV

_IMPLEMENTATIONS = (None, "xla", "cudnn")


class AttentionBackend(Protocol):
    """Per-layer attention. `layer_state` is the backend state with its leading L axis removed (or None).

    Must write `k_BTHD`/`v_BTHD` into `layer_kv` at row b, positions `[lengths_B[b], lengths_B[b] + T)`, then
    let query t of row b attend to cache positions `< lengths_B[b] + t + 1`. Returns
    `(out_BTHqD, new_layer_kv, aux)`; `aux` is a pytree (stacked over layers by the model) or None.
    """

    def __call__(
        self,
        q_BTHqD: jax.Array,
        k_BTHD: jax.Array,
        v_BTHD: jax.Array,
        layer_kv: LayerKV,
        lengths_B: jax.Array,
        seq_lens_B: jax.Array,
        positions_BT: jax.Array,
        layer_state: Any,
    ) -> tuple[jax.Array, LayerKV, Any]: ...


def write_kv(
    layer_kv: LayerKV,
    k_BTHD: jax.Array,
    v_BTHD: jax.Array,
    lengths_B: jax.Array,
    seq_lens_B: jax.Array | None = None,
) -> LayerKV:
    """Write a chunk into the cache at row b, positions `[lengths_B[b], lengths_B[b] + T)`.

    With `seq_lens_B`, only the first `seq_lens_B[b]` tokens of row b are written (padding stays out of the
    cache). Writes past the cache end are dropped, never clamped onto valid entries.
    """
    B, T = k_BTHD.shape[:2]
    S = layer_kv.k_BSHD.shape[1]
    t_T = jnp.arange(T, dtype=jnp.int32)
    pos_BT = lengths_B.astype(jnp.int32)[:, None] + t_T[None, :]
    if seq_lens_B is not None:
        # Padding goes to distinct out-of-range slots (S + t), which `mode="drop"` discards.
        pos_BT = jnp.where(t_T[None, :] < seq_lens_B[:, None], pos_BT, S + t_T[None, :])
    b_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))

    def put(cache_BSHD: jax.Array, new_BTHD: jax.Array) -> jax.Array:
        return cache_BSHD.at[b_BT, pos_BT].set(new_BTHD.astype(cache_BSHD.dtype), mode="drop",
                                              unique_indices=True)

    return LayerKV(put(layer_kv.k_BSHD, k_BTHD), put(layer_kv.v_BSHD, v_BTHD))


def causal_cache_mask(lengths_B: jax.Array, T: int, S: int) -> jax.Array:
    """`[B, T, S]` bool: query t of row b sees cache positions `s <= lengths_B[b] + t`."""
    t_T = jnp.arange(T, dtype=jnp.int32)
    s_S = jnp.arange(S, dtype=jnp.int32)
    return s_S[None, None, :] <= (lengths_B.astype(jnp.int32)[:, None, None] + t_T[None, :, None])


def reference_attention(
    q_BTHqD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, mask: jax.Array
) -> jax.Array:
    """Plain-jnp GQA attention for tests: softmax(q k^T / sqrt(D)) v in float32.

    `mask` is boolean, `[B, T, S]` or broadcastable to `[B, Hq, T, S]`; query head `h * G + g` uses KV head h.
    Rows with no visible key return zeros.
    """
    B, T, Hq, D = q_BTHqD.shape
    H = k_BSHD.shape[2]
    G = Hq // H
    k_BSHqD = jnp.repeat(k_BSHD.astype(jnp.float32), G, axis=2)
    v_BSHqD = jnp.repeat(v_BSHD.astype(jnp.float32), G, axis=2)
    scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHqD.astype(jnp.float32), k_BSHqD)
    scores_BHTS = scores_BHTS / jnp.sqrt(jnp.float32(D))
    mask_BHTS = mask[:, None] if mask.ndim == 3 else mask
    scores_BHTS = jnp.where(mask_BHTS, scores_BHTS, -jnp.inf)
    row_max = jnp.max(scores_BHTS, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p_BHTS = jnp.where(mask_BHTS, jnp.exp(scores_BHTS - row_max), 0.0)
    denom = jnp.sum(p_BHTS, axis=-1, keepdims=True)
    p_BHTS = p_BHTS / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p_BHTS, v_BSHqD).astype(q_BTHqD.dtype)


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """Full attention over the cache with `jax.nn.dot_product_attention`.

    Decode (T == 1) passes only `key_value_seq_lengths` (no mask), a form cuDNN runs natively; longer chunks
    pass an explicit causal mask offset by each row's cache length. `implementation` is forwarded
    (None/"xla"/"cudnn"; cuDNN needs bf16/f16). With `capture_queries`, aux is `{"q": q_BTHqD}`.
    """

    implementation: str | None = None
    capture_queries: bool = False

    def __post_init__(self) -> None:
        if self.implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention implementation {self.implementation!r}; "
                f"expected one of {_IMPLEMENTATIONS}"
            )

    def __call__(
        self,
        q_BTHqD: jax.Array,
        k_BTHD: jax.Array,
        v_BTHD: jax.Array,
        layer_kv: LayerKV,
        lengths_B: jax.Array,
        seq_lens_B: jax.Array,
        positions_BT: jax.Array,
        layer_state: Any = None,
    ) -> tuple[jax.Array, LayerKV, Any]:
        del positions_BT, layer_state  # dense attention needs neither
        new_kv = write_kv(layer_kv, k_BTHD, v_BTHD, lengths_B, seq_lens_B)
        B, T = q_BTHqD.shape[:2]
        S = new_kv.k_BSHD.shape[1]
        q = q_BTHqD.astype(new_kv.k_BSHD.dtype)
        if T == 1:
            kv_len_B = (lengths_B + 1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(
                q, new_kv.k_BSHD, new_kv.v_BSHD, key_value_seq_lengths=kv_len_B,
                implementation=self.implementation,
            )
        else:
            mask_B1TS = causal_cache_mask(lengths_B, T, S)[:, None]
            out = jax.nn.dot_product_attention(
                q, new_kv.k_BSHD, new_kv.v_BSHD, mask=mask_B1TS, implementation=self.implementation
            )
        aux = {"q": q_BTHqD} if self.capture_queries else None
        return out.astype(q_BTHqD.dtype), new_kv, aux
