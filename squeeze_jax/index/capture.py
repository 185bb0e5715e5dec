"""Capture the fixed context: chunked dense prefill that keeps the post-RoPE K, V and the window queries.

The context is fed in chunks of `chunk_size` tokens into one KV cache (so a long context needs only one chunk
of activations at a time); every chunk attends densely to the cache so far. Queries are kept only for the last
`window` tokens (they are the calibration queries).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k_LHSD", "v_LHSD", "q_window_LTHqD"], meta_fields=[]
)
@dataclasses.dataclass
class CapturedContext:
    """Post-RoPE keys/values of all context tokens `[L, H, S, D]` and the window's queries `[L, W, Hq, D]`."""

    k_LHSD: jax.Array
    v_LHSD: jax.Array
    q_window_LTHqD: jax.Array


def validate_context_tokens(tokens, model_config) -> np.ndarray:
    """1-D int32 token ids within the vocabulary and the model's max_context, else a ValueError/TypeError."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"context tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("context tokens are empty")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"context tokens must be integers, got dtype {arr.dtype}")
    if arr.size > model_config.max_context:
        raise ValueError(
            f"context of {arr.size} tokens exceeds the model's max_context ({model_config.max_context})"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= model_config.vocab_size:
        raise ValueError(
            f"context token ids must be in [0, {model_config.vocab_size}), got range [{lo}, {hi}]"
        )
    return arr.astype(np.int32)


def _param_dtype(state) -> jnp.dtype:
    for leaf in jax.tree.leaves(state):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "keep_q"), donate_argnames=("cache",))
def _prefill_chunk(graphdef, state, tokens_BT, positions_BT, seq_lens_B, cache, *, backend, keep_q: bool):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    _, cache, aux = model(tokens_BT, positions_BT, seq_lens_B, cache, backend, None, logits_mode="none")
    if not keep_q:
        return cache, None
    if not isinstance(aux, dict) or "q" not in aux:
        raise ValueError("DenseAttention(capture_queries=True) must return aux {'q': [L, B, T, Hq, D]}")
    return cache, aux["q"][:, 0]


# Bytes the dense chunk attention may hold for its float32 logits (query heads x chunk x context); longer contexts
# get shorter chunks so that a 128K-token capture fits next to an 8B-class model.
CHUNK_LOGIT_BYTES = 2 << 30


def effective_chunk(chunk_size: int, n_heads: int, context_len: int) -> int:
    """`chunk_size`, shrunk (to a multiple of 16, at least 16) until one chunk's logits fit CHUNK_LOGIT_BYTES."""
    fit = CHUNK_LOGIT_BYTES // max(1, 4 * n_heads * context_len)
    return max(16, min(chunk_size, fit // 16 * 16)) if fit < chunk_size else chunk_size


def capture_context(model, tokens, *, chunk_size: int = 2048, window: int = 124) -> CapturedContext:
    """Run the chunked dense prefill of `tokens` (1-D) and return K, V `[L, H, S, D]` and window queries."""
    from flax import nnx

    from models.attention import DenseAttention
    from models.kv_cache import KVCache

    cfg = model.config
    tokens = validate_context_tokens(tokens, cfg)
    S = int(tokens.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= window <= S:
        raise ValueError(f"window ({window}) must be in [0, {S}]")
    chunk_size = effective_chunk(chunk_size, cfg.n_heads, S)
    graphdef, state = nnx.split(model)
    cache = KVCache.init(cfg, 1, S, _param_dtype(state))
    backend = DenseAttention(capture_queries=True)
    q_parts = []
    w0 = S - window
    for s in range(0, S, chunk_size):
        e = min(S, s + chunk_size)
        keep_q = window > 0 and e > w0
        tok = jnp.asarray(tokens[None, s:e])
        pos = jnp.arange(s, e, dtype=jnp.int32)[None, :]
        cache, q_LTHqD = _prefill_chunk(
            graphdef, state, tok, pos, jnp.asarray([e - s], jnp.int32), cache, backend=backend, keep_q=keep_q
        )
        if keep_q:
            q_parts.append(q_LTHqD[:, max(w0, s) - s :])
    k = jnp.transpose(cache.k_LBSHD[:, 0, :S], (0, 2, 1, 3))
    v = jnp.transpose(cache.v_LBSHD[:, 0, :S], (0, 2, 1, 3))
    del cache
    if q_parts:
        q = jnp.concatenate(q_parts, axis=1)
    else:
        q = jnp.zeros((k.shape[0], 0, cfg.n_heads, cfg.head_dim), k.dtype)
    return CapturedContext(k_LHSD=k, v_LHSD=v, q_window_LTHqD=q)
