"""Key/value cache pytrees: all layers stacked (`KVCache`) and the per-layer view the scan hands a backend."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's cache: keys and values `[B, S, H, D]` (keys post-RoPE)."""

    k_BSHD: jax.Array
    v_BSHD: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Cache of every layer, `[L, B, S, H, D]`, and the number of valid tokens of each row, `lengths_B`.

    Row b holds valid keys at positions `[0, lengths_B[b])`; the model advances `lengths_B` by the chunk's
    `seq_lens_B` after each forward.
    """

    k_LBSHD: jax.Array
    v_LBSHD: jax.Array
    lengths_B: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty (zero) cache for `batch` rows of up to `max_len` tokens."""
        for name, value in (("batch", batch), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache.init: {name} must be a positive int, got {value!r}")
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        return cls(
            k_LBSHD=jnp.zeros(shape, dtype),
            v_LBSHD=jnp.zeros(shape, dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def n_layers(self) -> int:
        return self.k_LBSHD.shape[0]

    @property
    def batch(self) -> int:
        return self.k_LBSHD.shape[1]

    @property
    def max_len(self) -> int:
        return self.k_LBSHD.shape[2]

    @property
    def dtype(self) -> Any:
        return self.k_LBSHD.dtype

    def layer(self, i: int) -> LayerKV:
        """View of layer `i` (for tests and tools; the model scans over the stacked arrays)."""
        return LayerKV(self.k_LBSHD[i], self.v_LBSHD[i])
