"""Capturing every layer's post-RoPE q/k/v of a prompt (the input of the offline pattern search)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import DenseAttention
from models.kv_cache import KVCache, LayerKV
from models.llama import Llama, apply


@dataclasses.dataclass(frozen=True)
class CaptureQKV:
    """Dense attention that also returns the chunk's post-RoPE `{"q", "k", "v"}` (token-major) as aux."""

    def __call__(self, q_BTHqD, k_BTHD, v_BTHD, layer_kv: LayerKV, lengths_B, seq_lens_B, positions_BT,
                 layer_state: Any = None):
        out, new_kv, _ = DenseAttention()(q_BTHqD, k_BTHD, v_BTHD, layer_kv, lengths_B, seq_lens_B, positions_BT)
        return out, new_kv, {"q": q_BTHqD, "k": k_BTHD, "v": v_BTHD}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _capture(graphdef, state, tokens_BT):
    model = nnx.merge(graphdef, state)
    B, T = tokens_BT.shape
    cache = KVCache.init(model.config, B, T, model.embed_VM[...].dtype)
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seq_lens_B = jnp.full((B,), T, jnp.int32)
    _, _, aux = apply(graphdef, state, tokens_BT, positions_BT, seq_lens_B, cache, CaptureQKV(), None,
                      logits_mode="none")
    return aux


def capture_qkv(model: Llama, ids: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[L, 1, H, T, G, D]`, k/v `[L, 1, H, T, D]` (float32) of one prompt, in the search's layout."""
    if len(ids) < 2:
        raise ValueError(f"need a prompt of at least 2 tokens, got {len(ids)}")
    cfg = model.config
    if len(ids) > cfg.max_context:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's {cfg.max_context}")
    graphdef, state = nnx.split(model)
    aux = _capture(graphdef, state, jnp.asarray([list(ids)], jnp.int32))
    L, B, T, Hq, D = aux["q"].shape
    H = cfg.n_kv_heads
    q = aux["q"].astype(jnp.float32).reshape(L, B, T, H, Hq // H, D).transpose(0, 1, 3, 2, 4, 5)
    k = aux["k"].astype(jnp.float32).transpose(0, 1, 3, 2, 4)
    v = aux["v"].astype(jnp.float32).transpose(0, 1, 3, 2, 4)
    return q, k, v
