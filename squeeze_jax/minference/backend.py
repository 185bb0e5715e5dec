"""MInference as an attention backend: sparse prefill with per-head patterns built online, dense decode.

`MInferenceAttention` is called by the model like `DenseAttention`. For a chunk of T > 1 tokens it builds,
per KV head, the index of that head's pattern from the chunk itself (vertical-slash from the last 64
valid queries, block-sparse from mean-pooled blocks, A-shape static), writes every head in the
vertical-slash index format and runs one `vertical_slash_prefill` call (the Pallas kernel on a GPU, its
jnp reference elsewhere). For T == 1 it attends densely over the cache.

Per-(layer, KV head) patterns come through the backend state `MInferenceState` (`[L, H]` int arrays: the
pattern code and its two budgets at `ref_len` tokens), so one traced layer body serves every layer; the
static capacities (the largest budget of each kind) live in the backend. `MInferenceAttention.from_config`
builds both from a searched `PatternConfig`. With no state, every head uses the backend's default pattern.

A chunk that continues a cache (`lengths_B > 0`) attends the cached prefix densely and merges it with the
sparse part by log-sum-exp. `ContextMInference` composes a `ContextAttention` (the fixed, pre-indexed
context) with MInference prefill for the user prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models.attention import DenseAttention, write_kv
from models.kv_cache import LayerKV
from pallas_kernels.block_sparse import masked_attention_ref
from pallas_kernels.common import has_gpu
from pallas_kernels.merge import (
    chunked_attention_lse,
    dense_attention_lse,
    last_valid_positions,
    merge_attention,
    put_rows,
)
from pallas_kernels.vertical_slash import vertical_slash_key_counts, vertical_slash_prefill
from squeeze_jax.minference.patterns import (
    VerticalSlashIndex,
    block_sparse_index,
    block_sparse_to_vertical_slash,
    dense_causal_tiles,
    index_cost,
    select_vertical_slash_budgets,
    vertical_slash_index_from_selection,
    vertical_slash_scores,
)
from squeeze_jax.minference.search import PATTERNS, PatternConfig, load_pattern_config

A_SHAPE, VERTICAL_SLASH, BLOCK_SPARSE = (PATTERNS.index(p) for p in ("a_shape", "vertical_slash", "block_sparse"))
# Query rows per chunk of the CPU reference path (bounds its `[rows, T]` score memory).
REF_CHUNK_ROWS = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MInferenceState:
    """Per-(layer, KV head) patterns: code (index into `search.PATTERNS`) and budgets at `ref_len`."""

    kind_LH: jax.Array
    p1_LH: jax.Array
    p2_LH: jax.Array


def _scaled(x: jax.Array | int, T: int, ref_len: int, floor: int) -> jax.Array:
    """Budget at ref_len -> at T tokens (linear, round half to even as Python's round), at least `floor`."""
    return jnp.maximum(jnp.round(jnp.asarray(x, jnp.float32) * (T / ref_len)).astype(jnp.int32), floor)


@dataclasses.dataclass(frozen=True)
class MInferenceAttention:
    """MInference sparse prefill (T > 1) and dense decode (T == 1) over the model's KV cache.

    Static: `ref_len` (tokens the budgets refer to), capacities at ref_len `max_vertical`/`max_slash`
    (vertical-slash and A-shape heads) and `max_blocks` (block-sparse heads; 0 = none), the default
    pattern used without a state, estimation/forcing constants, `block` (kernel tile), `min_len` (chunks
    shorter than this run dense: sparse does not pay there), `use_pallas` (None: Pallas on a GPU, or in
    interpret mode when `interpret`), `implementation` (dense parts, as `DenseAttention`), and the kernel's
    `block_rows` / `num_warps` / `num_stages`. `dense_tail` (default 64, 0 = off): the last `dense_tail` valid
    queries of every row attend all their keys exactly (a `[dense_tail, T]` pass, about one decode step's reads per
    64 rows) and replace the sparse rows; these are the rows the next token is read from, and the queries
    the vertical-slash estimate already pays for. `attend_prefix=False` drops the dense pass over a cached
    prefix: only for prefills that start at an empty cache (as `generate` does), where it saves compiling a
    `[T, S]` branch that long prompts cannot hold in memory.
    """

    ref_len: int = 131072
    max_vertical: int = 1000
    max_slash: int = 6096
    max_blocks: int = 0
    default_pattern: tuple[str, int, int] = ("vertical_slash", 1000, 6096)
    last_q: int = 64
    n_sink_cols: int = 30
    n_local_diags: int = 100
    block: int = 64
    min_len: int = 128
    use_pallas: bool | None = None
    interpret: bool | None = None
    implementation: str | None = None
    block_rows: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    attend_prefix: bool = True
    dense_tail: int = 64

    def __post_init__(self) -> None:
        for name in ("ref_len", "max_vertical", "max_slash", "last_q", "block", "min_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.dense_tail, int) or isinstance(self.dense_tail, bool) or self.dense_tail < 0:
            raise ValueError(f"dense_tail must be an int >= 0, got {self.dense_tail!r}")
        if not isinstance(self.max_blocks, int) or self.max_blocks < 0:
            raise ValueError(f"max_blocks must be an int >= 0, got {self.max_blocks!r}")
        if self.block & (self.block - 1) or self.block < 16:
            raise ValueError(f"block must be a power of two >= 16, got {self.block}")
        if self.n_sink_cols < 0 or self.n_local_diags < 1:
            raise ValueError(f"need n_sink_cols >= 0 and n_local_diags >= 1 (the main diagonal), got "
                             f"{self.n_sink_cols}, {self.n_local_diags}")
        kind, p1, p2 = self.default_pattern
        if kind not in PATTERNS:
            raise ValueError(f"default_pattern kind must be one of {PATTERNS}, got {kind!r}")
        if kind == "block_sparse" and not 1 <= p1 <= self.max_blocks:
            raise ValueError(f"default block-sparse budget {p1} needs 1 <= p1 <= max_blocks ({self.max_blocks})")
        if kind != "block_sparse" and (p1 > self.max_vertical or p2 > self.max_slash or p1 < 0 or p2 < 1):
            raise ValueError(f"default pattern {self.default_pattern} exceeds the capacities "
                             f"({self.max_vertical}, {self.max_slash}) or has a budget < 1")
        DenseAttention(self.implementation)  # validates the implementation name

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: PatternConfig, **kwargs: Any) -> tuple[MInferenceAttention, MInferenceState]:
        """Backend (capacities from the config's largest budgets) and its `[L, H]` state."""
        heads = [p for layer in config.layers for p in layer]
        vs = [(p.p1, p.p2) for p in heads if p.pattern != "block_sparse"]
        bs = [p.p1 for p in heads if p.pattern == "block_sparse"]
        if any(p.p2 != config.block for p in heads if p.pattern == "block_sparse"):
            raise ValueError(f"block-sparse heads must use the config block {config.block}")
        caps = dict(
            ref_len=config.ref_len,
            block=config.block,
            max_vertical=max([v for v, _ in vs], default=1) or 1,
            max_slash=max([s for _, s in vs], default=1),
            max_blocks=max(bs, default=0),
        )
        first = heads[0]
        caps["default_pattern"] = (first.pattern, first.p1, first.p2)
        backend = cls(**{**caps, **kwargs})
        code = {p: i for i, p in enumerate(PATTERNS)}
        arr = lambda f: jnp.asarray([[f(p) for p in layer] for layer in config.layers], jnp.int32)
        state = MInferenceState(arr(lambda p: code[p.pattern]), arr(lambda p: p.p1), arr(lambda p: p.p2))
        return backend, state

    @classmethod
    def load(cls, model_name: str, **kwargs: Any) -> tuple[MInferenceAttention, MInferenceState]:
        """`from_config` of `configs/minference/<model_name>.json`."""
        return cls.from_config(load_pattern_config(model_name), **kwargs)

    def _pallas(self) -> bool:
        if self.use_pallas is None:
            return has_gpu() or bool(self.interpret)
        return self.use_pallas

    # ------------------------------------------------------------------ the interface
    def __call__(
        self,
        q_BTHqD: jax.Array,
        k_BTHD: jax.Array,
        v_BTHD: jax.Array,
        layer_kv: LayerKV,
        lengths_B: jax.Array,
        seq_lens_B: jax.Array,
        positions_BT: jax.Array,
        layer_state: MInferenceState | None = None,
    ) -> tuple[jax.Array, LayerKV, Any]:
        T = q_BTHqD.shape[1]
        if T < self.min_len:
            return DenseAttention(self.implementation)(
                q_BTHqD, k_BTHD, v_BTHD, layer_kv, lengths_B, seq_lens_B, positions_BT
            )
        new_kv = write_kv(layer_kv, k_BTHD, v_BTHD, lengths_B, seq_lens_B)
        o_BHTGD, _, aux = self.prefill_lse(q_BTHqD, k_BTHD, v_BTHD, new_kv, lengths_B, seq_lens_B, layer_state)
        B, H, _, G, D = o_BHTGD.shape
        out = o_BHTGD.transpose(0, 2, 1, 3, 4).reshape(B, T, H * G, D)
        return out.astype(q_BTHqD.dtype), new_kv, aux

    def prefill_lse(
        self,
        q_BTHqD: jax.Array,
        k_BTHD: jax.Array,
        v_BTHD: jax.Array,
        new_kv: LayerKV,
        lengths_B: jax.Array,
        seq_lens_B: jax.Array,
        layer_state: MInferenceState | None,
    ) -> tuple[jax.Array, jax.Array, dict]:
        """Sparse causal attention of the chunk over itself, merged with a dense pass over the cached prefix
        (cache positions `< lengths_B`, skipped when every row starts at 0). `new_kv` already holds the chunk.
        Returns `o_BHTGD` (float32), `lse_BHTG` and aux `{"kept_fraction"}` (key tiles vs dense causal)."""
        B, T, Hq, D = q_BTHqD.shape
        H = k_BTHD.shape[2]
        G = Hq // H
        dtype = new_kv.k_BSHD.dtype
        q_BHTGD = q_BTHqD.astype(dtype).reshape(B, T, H, G, D).transpose(0, 2, 1, 3, 4)
        k_BHTD = k_BTHD.astype(dtype).transpose(0, 2, 1, 3)
        v_BHTD = v_BTHD.astype(dtype).transpose(0, 2, 1, 3)
        index = self.build_index(q_BHTGD, k_BHTD, seq_lens_B, layer_state)
        o, lse = self.attend(q_BHTGD, k_BHTD, v_BHTD, index)
        o = o.astype(jnp.float32)
        if self.dense_tail:
            o, lse = dense_tail_rows(q_BHTGD, k_BHTD, v_BHTD, seq_lens_B, o, lse, min(self.dense_tail, T))

        def with_prefix(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
            S = new_kv.k_BSHD.shape[1]
            mask_B11S = (jnp.arange(S)[None, :] < lengths_B[:, None])[:, None, None, :]
            o_p, lse_p = dense_attention_lse(q_BHTGD, new_kv.k_BSHD.transpose(0, 2, 1, 3),
                                             new_kv.v_BSHD.transpose(0, 2, 1, 3), mask_B11S)
            return merge_attention(o, lse, o_p.astype(jnp.float32), lse_p)

        if self.attend_prefix:
            o, lse = jax.lax.cond(jnp.any(lengths_B > 0), with_prefix, lambda o, lse: (o, lse), o, lse)
        dense = dense_causal_tiles(T, block_q=self.block, block_k=self.block) * B * H
        aux = {"kept_fraction": jnp.sum(self._tiles(index, seq_lens_B, T)).astype(jnp.float32) / dense}
        return o, lse, aux

    def _tiles(self, index: VerticalSlashIndex, seq_lens_B: jax.Array, T: int) -> jax.Array:
        """Key tiles per `[B, H, nQ]` query block that the result depends on: the index's, and every causal
        tile for the query blocks the exact tail touches."""
        cost_BHQ = index_cost(index)
        if not self.dense_tail:
            return cost_BHQ
        nq = cost_BHQ.shape[-1]
        q_Q = jnp.arange(nq)
        full_Q = -(-jnp.minimum((q_Q + 1) * self.block, T) // self.block)
        first_B = jnp.maximum(seq_lens_B - min(self.dense_tail, T), 0) // self.block
        last_B = jnp.maximum(seq_lens_B - 1, 0) // self.block
        touched_B1Q = ((q_Q[None] >= first_B[:, None]) & (q_Q[None] <= last_B[:, None]))[:, None]
        return jnp.where(touched_B1Q, full_Q, cost_BHQ)

    # ------------------------------------------------------------------ index and kernel
    def head_budgets(self, layer_state: MInferenceState | None, H: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(kind_H, p1_H, p2_H) of one layer: from the state, else the default pattern on every head."""
        if layer_state is None:
            kind, p1, p2 = self.default_pattern
            full = lambda x: jnp.full((H,), x, jnp.int32)
            return full(PATTERNS.index(kind)), full(p1), full(p2)
        if layer_state.kind_LH.shape != (H,):
            raise ValueError(f"MInferenceState per layer must be [H={H}], got {layer_state.kind_LH.shape} "
                             "(the layer axis is removed by the model's scan)")
        return layer_state.kind_LH, layer_state.p1_LH, layer_state.p2_LH

    def capacities(self, T: int) -> tuple[int, int, int]:
        """Static (verticals, slashes, key blocks) capacities at T tokens."""
        cap_v = min(max(self.n_sink_cols, round(self.max_vertical * T / self.ref_len), 1), T)
        cap_s = min(max(self.n_local_diags, round(self.max_slash * T / self.ref_len)), T)
        cap_b = min(max(1, round(self.max_blocks * T / self.ref_len)), -(-T // self.block)) if self.max_blocks else 0
        return cap_v, cap_s, cap_b

    def build_index(
        self, q_BHTGD: jax.Array, k_BHTD: jax.Array, seq_lens_B: jax.Array, layer_state: MInferenceState | None
    ) -> VerticalSlashIndex:
        """One vertical-slash-format index for all KV heads, each with its own pattern (jit-able)."""
        B, H, T = k_BHTD.shape[:3]
        kind, p1, p2 = self.head_budgets(layer_state, H)
        cap_v, cap_s, cap_b = self.capacities(T)
        ashape = kind == A_SHAPE
        sinks = _scaled(p1, T, self.ref_len, 0)
        local = _scaled(p2, T, self.ref_len, 1)
        n_v = jnp.where(ashape, sinks, jnp.maximum(_scaled(p1, T, self.ref_len, 1), self.n_sink_cols))
        n_s = jnp.where(ashape, local, jnp.maximum(_scaled(p2, T, self.ref_len, 1), self.n_local_diags))
        n_v, n_s = jnp.minimum(n_v, cap_v), jnp.minimum(n_s, cap_s)
        f_v = jnp.where(ashape, n_v, self.n_sink_cols)
        f_s = jnp.where(ashape, n_s, self.n_local_diags)
        vertical, slash = vertical_slash_scores(q_BHTGD, k_BHTD, seq_lens_B, last_q=self.last_q)
        cols, offs = select_vertical_slash_budgets(
            vertical, slash, n_v[None], n_s[None], f_v[None], f_s[None], cap_vertical=cap_v, cap_slash=cap_s
        )
        index = vertical_slash_index_from_selection(cols, offs, T, block_q=self.block, block_k=self.block)
        if cap_b:
            n_b = jnp.clip(_scaled(p1, T, self.ref_len, 1), 1, cap_b)
            bs = block_sparse_to_vertical_slash(
                block_sparse_index(q_BHTGD, k_BHTD, n_b[None], top_k_blocks=cap_b, block=self.block)
            )
            index = _select_heads(kind == BLOCK_SPARSE, bs, index)
        return index

    def attend(
        self, q_BHTGD: jax.Array, k_BHTD: jax.Array, v_BHTD: jax.Array, index: VerticalSlashIndex
    ) -> tuple[jax.Array, jax.Array]:
        """The vertical-slash kernel (Pallas) or its reference, chunked over query rows."""
        arrays = (index.tile_start, index.tile_end, index.tile_count, index.column_index, index.column_count)
        if self._pallas():
            return vertical_slash_prefill(q_BHTGD, k_BHTD, v_BHTD, *arrays, block_q=self.block, block_k=self.block,
                                          block_rows=self.block_rows, num_warps=self.num_warps,
                                          num_stages=self.num_stages, interpret=self.interpret)
        return chunked_vertical_slash_ref(q_BHTGD, k_BHTD, v_BHTD, index)


def _select_heads(take_a_H: jax.Array, a: VerticalSlashIndex, b: VerticalSlashIndex) -> VerticalSlashIndex:
    """Per KV head, index `a` where `take_a_H`, else `b` (capacities padded to the larger)."""
    def pick(x: jax.Array, y: jax.Array) -> jax.Array:
        x = jnp.broadcast_to(x, y.shape[:3] + x.shape[3:])
        if x.ndim == 4:
            cap = max(x.shape[-1], y.shape[-1])
            pad = lambda z: jnp.pad(z, [(0, 0)] * 3 + [(0, cap - z.shape[-1])])
            x, y = pad(x), pad(y)
        sel = take_a_H.reshape((1, -1) + (1,) * (x.ndim - 2))
        return jnp.where(sel, x, y)

    fields = ("tile_start", "tile_end", "tile_count", "column_index", "column_count")
    return dataclasses.replace(b, **{f: pick(getattr(a, f), getattr(b, f)) for f in fields})


def dense_tail_rows(
    q_BHTGD: jax.Array,
    k_BHTD: jax.Array,
    v_BHTD: jax.Array,
    seq_lens_B: jax.Array,
    o_BHTGD: jax.Array,
    lse_BHTG: jax.Array,
    rows: int,
) -> tuple[jax.Array, jax.Array]:
    """Exact causal attention for the last `rows` valid queries of every batch row, written over `o`/`lse`
    (keys walked in chunks, `chunked_attention_lse`)."""
    pos_BL = last_valid_positions(seq_lens_B, rows, q_BHTGD.shape[2])
    q_BHLGD = jnp.take_along_axis(q_BHTGD, pos_BL[:, None, :, None, None], axis=2)
    causal = lambda s0, s1: (jnp.arange(s0, s1)[None, None, :] <= pos_BL[:, :, None])[:, None]
    o_t, lse_t = chunked_attention_lse(q_BHLGD, k_BHTD, v_BHTD, causal)
    return put_rows(o_BHTGD, pos_BL, o_t), put_rows(lse_BHTG, pos_BL, lse_t)


def chunked_vertical_slash_ref(
    q_BHTGD: jax.Array, k_BHTD: jax.Array, v_BHTD: jax.Array, index: VerticalSlashIndex
) -> tuple[jax.Array, jax.Array]:
    """`vertical_slash_prefill_ref` evaluated `REF_CHUNK_ROWS` queries at a time (same result, bounded memory)."""
    B, H, T, G, D = q_BHTGD.shape
    bq = index.block_q
    mult = vertical_slash_key_counts(index.tile_start, index.tile_end, index.tile_count, index.column_index,
                                     index.column_count, T, block_k=index.block_k)  # [B, H, nQ, T]
    rows = max(bq, REF_CHUNK_ROWS // bq * bq)
    n_chunks = -(-T // rows)
    t_pad = n_chunks * rows
    q = jnp.pad(q_BHTGD, ((0, 0), (0, 0), (0, t_pad - T), (0, 0), (0, 0)))
    blocks = rows // bq
    mult = jnp.pad(mult, ((0, 0), (0, 0), (0, n_chunks * blocks - mult.shape[2]), (0, 0)))

    def chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        q_c = jax.lax.dynamic_slice_in_dim(q, c * rows, rows, axis=2)
        m_c = jax.lax.dynamic_slice_in_dim(mult, c * blocks, blocks, axis=2)
        m_c = jnp.repeat(m_c, bq, axis=2)
        return masked_attention_ref(q_c, k_BHTD, v_BHTD, m_c, c * rows + jnp.arange(rows))

    o, lse = jax.lax.map(chunk, jnp.arange(n_chunks))  # [n, B, H, rows, G, D]
    o = jnp.moveaxis(o, 0, 2).reshape(B, H, t_pad, G, D)[:, :, :T]
    lse = jnp.moveaxis(lse, 0, 2).reshape(B, H, t_pad, G)[:, :, :T]
    return o, lse


# ----------------------------------------------------------------------------------------------------
# Fixed context (ContextAttention) + MInference prefill of the user prompt
# ----------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextMInferenceState:
    """`context`: the `ContextState` of the fixed context; `patterns`: an `MInferenceState` or None."""

    context: Any
    patterns: MInferenceState | None


@dataclasses.dataclass(frozen=True)
class ContextMInference:
    """`ContextAttention` handles the pre-indexed fixed context; the user prompt's own keys are attended
    with MInference sparse prefill instead of densely. Decode (T == 1) is the context backend's."""

    context: Any
    minference: MInferenceAttention = MInferenceAttention()

    def __post_init__(self) -> None:
        from squeeze_jax.attention.context import ContextAttention

        if not isinstance(self.context, ContextAttention):
            raise TypeError(f"context must be a ContextAttention, got {type(self.context).__name__}")
        if self.context.fidelity:
            raise ValueError("ContextMInference does not support ContextAttention(fidelity=True)")

    def __call__(self, q_BTHqD, k_BTHD, v_BTHD, layer_kv: LayerKV, lengths_B, seq_lens_B, positions_BT,
                 layer_state: ContextMInferenceState):
        from squeeze_jax.attention.context import LayerIndex

        B, T, Hq, D = q_BTHqD.shape
        if T < self.minference.min_len:
            return self.context(q_BTHqD, k_BTHD, v_BTHD, layer_kv, lengths_B, seq_lens_B, positions_BT,
                                layer_state.context)
        new_kv = write_kv(layer_kv, k_BTHD, v_BTHD, lengths_B, seq_lens_B)
        o_user, lse_user, aux_user = self.minference.prefill_lse(
            q_BTHqD, k_BTHD, v_BTHD, new_kv, lengths_B, seq_lens_B, layer_state.patterns
        )
        H, G = o_user.shape[1], o_user.shape[3]
        idx = LayerIndex.of(layer_state.context.index)
        q_BHTGD = q_BTHqD.reshape(B, T, H, G, D).transpose(0, 2, 1, 3, 4)
        o_ctx, lse_ctx, aux = self.context.context_part(q_BHTGD, seq_lens_B, idx, layer_state.context)
        o, _ = merge_attention(o_ctx.astype(jnp.float32), lse_ctx, o_user, lse_user)
        out = o.transpose(0, 2, 1, 3, 4).reshape(B, T, Hq, D).astype(q_BTHqD.dtype)
        return out, new_kv, {**aux, "user_kept_fraction": aux_user["kept_fraction"]}


def pattern_counts(config: PatternConfig) -> dict[str, int]:
    """How many (layer, KV head) entries use each pattern."""
    counts = {p: 0 for p in PATTERNS}
    for layer in config.layers:
        for head in layer:
            counts[head.pattern] += 1
    return counts


__all__ = [
    "ContextMInference",
    "ContextMInferenceState",
    "MInferenceAttention",
    "MInferenceState",
    "chunked_vertical_slash_ref",
    "dense_tail_rows",
    "pattern_counts",
]
