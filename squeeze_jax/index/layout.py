"""Cluster-ordered KV layout of the fixed context (see ARCHITECTURE.md, "The context index layout").

Per (layer, KV head) the keys and values are permuted into one padded array:

    [0, n_fixed)                         sink tokens then the last `window` tokens (always attended)
    [n_fixed, fixed_pad)                 padding (masked), fixed_pad = n_fixed rounded up to `block_pad`
    [fixed_pad, fixed_pad + n_clustered) clustered tokens, one fine cluster after another (token order inside)
    [fixed_pad + n_clustered, n_pad)     padding (masked), n_pad a multiple of `block_pad`

Attention is invariant to key order once RoPE is applied, so this changes nothing but where a key is read
from; a selected cluster becomes one contiguous segment `[cluster_start, cluster_start + cluster_size)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LayoutSizes:
    """Static sizes of the layout for one context length."""

    context_len: int
    n_sink: int
    window: int
    block_pad: int

    def __post_init__(self) -> None:
        if self.block_pad < 1:
            raise ValueError(f"block_pad must be >= 1, got {self.block_pad}")
        if self.n_sink < 0 or self.window < 0:
            raise ValueError(f"n_sink and window must be >= 0, got {self.n_sink}, {self.window}")
        if self.n_clustered < 1:
            raise ValueError(
                f"context of {self.context_len} tokens leaves no token to cluster after "
                f"{self.n_sink} sink + {self.window} window tokens"
            )

    @property
    def n_fixed(self) -> int:
        return self.n_sink + self.window

    @property
    def fixed_pad(self) -> int:
        return _round_up(self.n_fixed, self.block_pad)

    @property
    def n_clustered(self) -> int:
        return self.context_len - self.n_fixed

    @property
    def n_pad(self) -> int:
        return _round_up(self.fixed_pad + self.n_clustered, self.block_pad)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "keys_PND",
        "values_PND",
        "positions_PN",
        "centroids_PCD",
        "cluster_start_PC",
        "cluster_size_PC",
        "radius_PC",
    ],
    meta_fields=["n_fixed", "fixed_pad", "n_clustered", "n_pad"],
)
@dataclasses.dataclass
class Layout:
    """Cluster-ordered KV of P (layer, KV head) pairs; cluster arrays are in the new (layout) order."""

    keys_PND: jax.Array
    values_PND: jax.Array
    positions_PN: jax.Array
    centroids_PCD: jax.Array
    cluster_start_PC: jax.Array
    cluster_size_PC: jax.Array
    radius_PC: jax.Array
    n_fixed: int
    fixed_pad: int
    n_clustered: int
    n_pad: int


def clustered_token_range(context_len: int, n_sink: int, window: int) -> tuple[int, int]:
    """[start, stop) of the context tokens that are clustered (everything but sinks and window)."""
    return n_sink, context_len - window


def build_layout(
    k_PSD: jax.Array,
    v_PSD: jax.Array,
    assign_PM: jax.Array,
    centroids_PCD: jax.Array,
    *,
    n_sink: int,
    window: int,
    block_pad: int = 64,
    fine_order_PC: jax.Array | None = None,
) -> Layout:
    """Permute keys/values of every problem by fine cluster.

    k_PSD / v_PSD: the full context (S tokens) per problem; assign_PM: cluster (original id) of each clustered
    token `n_sink + m`; centroids_PCD: raw centroids by original id; fine_order_PC: optional new position
    -> original id (from the coarse level); default keeps the original cluster order.
    """
    if k_PSD.ndim != 3 or v_PSD.shape != k_PSD.shape:
        raise ValueError(f"keys and values must both be [P, S, D], got {k_PSD.shape} and {v_PSD.shape}")
    P, S, D = k_PSD.shape
    sizes = LayoutSizes(S, n_sink, window, block_pad)
    if assign_PM.shape != (P, sizes.n_clustered):
        raise ValueError(f"assign_PM must be {(P, sizes.n_clustered)}, got {assign_PM.shape}")
    if centroids_PCD.ndim != 3 or centroids_PCD.shape[0] != P or centroids_PCD.shape[2] != D:
        raise ValueError(f"centroids_PCD must be [P={P}, C, D={D}], got {centroids_PCD.shape}")
    C = centroids_PCD.shape[1]
    if fine_order_PC is None:
        fine_order_PC = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (P, C))
    elif fine_order_PC.shape != (P, C):
        raise ValueError(f"fine_order_PC must be {(P, C)}, got {fine_order_PC.shape}")
    return _build_layout(
        k_PSD,
        v_PSD,
        assign_PM.astype(jnp.int32),
        centroids_PCD.astype(jnp.float32),
        fine_order_PC.astype(jnp.int32),
        sizes=sizes,
    )


@functools.partial(jax.jit, static_argnames=("sizes",))
def _build_layout(k_PSD, v_PSD, assign_PM, centroids_PCD, fine_order_PC, *, sizes: LayoutSizes) -> Layout:
    P, S, D = k_PSD.shape
    C = centroids_PCD.shape[1]
    M = sizes.n_clustered
    n_fixed, fixed_pad, n_pad = sizes.n_fixed, sizes.fixed_pad, sizes.n_pad

    def one(k_SD, v_SD, a_M, c_CD, order_C):
        new_of_old = jnp.zeros((C,), jnp.int32).at[order_C].set(jnp.arange(C, dtype=jnp.int32))
        new_M = new_of_old[a_M]
        perm_M = jnp.argsort(new_M, stable=True).astype(jnp.int32)  # by cluster, token order inside
        tok_M = sizes.n_sink + perm_M
        cid_M = new_M[perm_M]
        count_C = jnp.bincount(new_M, length=C).astype(jnp.int32)
        start_C = (fixed_pad + jnp.cumsum(count_C) - count_C).astype(jnp.int32)
        cent_CD = c_CD[order_C]
        k_clu = k_SD[tok_M]
        dist_M = jnp.sqrt(jnp.sum((k_clu.astype(jnp.float32) - cent_CD[cid_M]) ** 2, axis=-1))
        radius_C = jax.ops.segment_max(dist_M, cid_M, num_segments=C)
        radius_C = jnp.maximum(radius_C, 0.0)  # every cluster is non-empty; guards -inf of an empty segment
        fixed_tok = jnp.concatenate([jnp.arange(sizes.n_sink), jnp.arange(S - sizes.window, S)]).astype(
            jnp.int32
        )
        pos_N = jnp.concatenate(
            [
                fixed_tok,
                jnp.full((fixed_pad - n_fixed,), -1, jnp.int32),
                tok_M,
                jnp.full((n_pad - fixed_pad - M,), -1, jnp.int32),
            ]
        )
        safe = jnp.maximum(pos_N, 0)
        live = (pos_N >= 0)[:, None]
        keys = jnp.where(live, k_SD[safe], jnp.zeros((), k_SD.dtype))
        vals = jnp.where(live, v_SD[safe], jnp.zeros((), v_SD.dtype))
        return keys, vals, pos_N, cent_CD, start_C, count_C, radius_C

    keys, vals, pos, cent, start, count, radius = jax.vmap(one)(
        k_PSD, v_PSD, assign_PM, centroids_PCD, fine_order_PC
    )
    return Layout(
        keys_PND=keys,
        values_PND=vals,
        positions_PN=pos,
        centroids_PCD=cent,
        cluster_start_PC=start,
        cluster_size_PC=count,
        radius_PC=radius,
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=M,
        n_pad=n_pad,
    )
