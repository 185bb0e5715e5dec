"""Rotary position embeddings (RoPE): default, Llama-3 and linear frequency scaling; rotate-half and
interleaved layouts.

Frequencies are computed once per config on the host in float64 and applied in float32, so angles at long
positions (e.g. 128K) keep their precision independently of the model dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, RopeScaling


def _scaled_inverse_frequencies(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Apply the config's frequency scaling to base inverse frequencies (float64, host)."""
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between is interpolated.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    if not high_freq_wavelen < low_freq_wavelen:
        raise ValueError(
            "llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
            f"low={scaling.low_freq_factor}, high={scaling.high_freq_factor}"
        )
    wavelen = 2.0 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, interpolated, out)


@functools.lru_cache(maxsize=64)
def _inverse_frequencies_cached(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    out = _scaled_inverse_frequencies(inv_freq, scaling).astype(np.float32)
    out.flags.writeable = False
    return out


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies `[D/2]` (float32) after the config's rope scaling."""
    return _inverse_frequencies_cached(config.head_dim, float(config.rope_theta), config.rope_scaling)


def rope_angles(positions_BT: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotation angles `[B, T, D/2]` in float32 for absolute positions."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    return positions_BT.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotate queries or keys `[B, T, H, D]` by their absolute positions `[B, T]`.

    `rotate_half` (Hugging Face) pairs dimension i with i + D/2; `interleaved` (original Meta / GGUF before
    permutation) pairs 2i with 2i+1. Rotation is done in float32 and cast back to the input dtype.
    """
    if x_BTHD.ndim != 4:
        raise ValueError(f"apply_rope expects [B, T, H, D], got shape {x_BTHD.shape}")
    if x_BTHD.shape[-1] != config.head_dim:
        raise ValueError(f"last axis {x_BTHD.shape[-1]} != config.head_dim {config.head_dim}")
    if positions_BT.shape != x_BTHD.shape[:2]:
        raise ValueError(f"positions shape {positions_BT.shape} != x batch/time shape {x_BTHD.shape[:2]}")
    angles_BT1K = rope_angles(positions_BT, config)[:, :, None, :]
    cos, sin = jnp.cos(angles_BT1K), jnp.sin(angles_BT1K)
    x = x_BTHD.astype(jnp.float32)
    if config.rope_layout == "rotate_half":
        half = config.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x_pairs = x.reshape(*x.shape[:-1], config.head_dim // 2, 2)
        x1, x2 = x_pairs[..., 0], x_pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    return out.astype(x_BTHD.dtype)
