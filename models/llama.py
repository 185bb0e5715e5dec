"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as Flax NNX modules.

Every decoder layer's parameters are stacked along a leading L axis (one `DecoderLayer` module whose arrays
are `[L, ...]`), and the forward pass scans one traced layer body over them, so compile time does not grow
with depth. Weights keep the Hugging Face orientation (`[out, in]`, split into heads): loading is a reshape.

Axis letters: B batch, T chunk tokens, S cache tokens, L layers, M model width, F MLP width, V vocabulary,
Hq query heads, H KV heads, D head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import AttentionBackend
from models.config import ModelConfig
from models.kv_cache import KVCache, LayerKV
from models.rope import apply_rope

INIT_STD = 0.02
LOGITS_MODES = ("last", "all", "none")
_PARAM_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _PARAM_DTYPES:
        allowed = [str(d) for d in _PARAM_DTYPES]
        raise ValueError(f"unsupported parameter dtype {dt}; expected one of {allowed}")
    return dt


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param((INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, statistics in float32, result in the input dtype (as Hugging Face Llama)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, stack: tuple[int, ...] = ()):
        self.eps = float(eps)
        self.scale_M = nnx.Param(jnp.ones((*stack, dim), dtype))

    def __call__(self, x_BTM: jax.Array) -> jax.Array:
        x32 = x_BTM.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x_BTM.dtype) * self.scale_M[...]


class Attention(nnx.Module):
    """Q/K/V/O projections, grouped KV heads, optional Q/K/V bias; the attention itself is the backend's."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, stack: tuple[int, ...] = ()):
        M, Hq, H, D = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.wq_HqDM = _normal(rngs, (*stack, Hq, D, M), dtype)
        self.wk_HDM = _normal(rngs, (*stack, H, D, M), dtype)
        self.wv_HDM = _normal(rngs, (*stack, H, D, M), dtype)
        self.wo_MHqD = _normal(rngs, (*stack, M, Hq, D), dtype)
        if config.qkv_bias:
            self.bq_HqD = nnx.Param(jnp.zeros((*stack, Hq, D), dtype))
            self.bk_HD = nnx.Param(jnp.zeros((*stack, H, D), dtype))
            self.bv_HD = nnx.Param(jnp.zeros((*stack, H, D), dtype))
        else:
            self.bq_HqD = self.bk_HD = self.bv_HD = None

    def qkv(self, h_BTM: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Pre-RoPE projections: q `[B, T, Hq, D]`, k and v `[B, T, H, D]`."""
        q = jnp.einsum("btm,hdm->bthd", h_BTM, self.wq_HqDM[...])
        k = jnp.einsum("btm,hdm->bthd", h_BTM, self.wk_HDM[...])
        v = jnp.einsum("btm,hdm->bthd", h_BTM, self.wv_HDM[...])
        if self.bq_HqD is not None:
            q, k, v = q + self.bq_HqD[...], k + self.bk_HD[...], v + self.bv_HD[...]
        return q, k, v

    def out(self, o_BTHqD: jax.Array) -> jax.Array:
        return jnp.einsum("bthd,mhd->btm", o_BTHqD, self.wo_MHqD[...])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, stack: tuple[int, ...] = ()):
        M, F = config.d_model, config.ffn_dim
        self.gate_FM = _normal(rngs, (*stack, F, M), dtype)
        self.up_FM = _normal(rngs, (*stack, F, M), dtype)
        self.down_MF = _normal(rngs, (*stack, M, F), dtype)

    def __call__(self, h_BTM: jax.Array) -> jax.Array:
        gate_BTF = jnp.einsum("btm,fm->btf", h_BTM, self.gate_FM[...])
        up_BTF = jnp.einsum("btm,fm->btf", h_BTM, self.up_FM[...])
        return jnp.einsum("btf,mf->btm", jax.nn.silu(gate_BTF) * up_BTF, self.down_MF[...])


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Built with `stack=(L,)` it holds all layers."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, stack: tuple[int, ...] = ()):
        self.config = config
        self.attn_norm = RMSNorm(config.d_model, config.rms_eps, dtype=dtype, stack=stack)
        self.attn = Attention(config, rngs=rngs, dtype=dtype, stack=stack)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_eps, dtype=dtype, stack=stack)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, stack=stack)

    def __call__(
        self,
        x_BTM: jax.Array,
        positions_BT: jax.Array,
        lengths_B: jax.Array,
        seq_lens_B: jax.Array,
        layer_kv: LayerKV,
        backend: AttentionBackend,
        layer_state: Any,
    ) -> tuple[jax.Array, LayerKV, Any]:
        q, k, v = self.attn.qkv(self.attn_norm(x_BTM))
        q = apply_rope(q, positions_BT, self.config)
        k = apply_rope(k, positions_BT, self.config)
        o_BTHqD, layer_kv, aux = backend(q, k, v, layer_kv, lengths_B, seq_lens_B, positions_BT, layer_state)
        x_BTM = x_BTM + self.attn.out(o_BTHqD.astype(x_BTM.dtype))
        x_BTM = x_BTM + self.mlp(self.mlp_norm(x_BTM))
        return x_BTM, layer_kv, aux


def _concrete(x: Any) -> np.ndarray | None:
    """Host copy of `x` when it is a concrete value (not traced under jit), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_inputs(
    config: ModelConfig,
    tokens_BT: Any,
    positions_BT: Any,
    seq_lens_B: Any,
    cache: KVCache,
    logits_mode: str = "last",
) -> None:
    """Validate a forward call's arguments; raises TypeError/ValueError naming the problem.

    Shapes and dtypes are always checked. Value checks (token ids in the vocabulary, positions in
    `[0, max_context)`, `0 <= seq_lens <= T`, cache room for the chunk) run only on concrete arrays: under
    `jit` they are tracers, so a jitted caller must run this on the host values first.
    """
    if logits_mode not in LOGITS_MODES:
        raise ValueError(f"logits_mode must be one of {LOGITS_MODES}, got {logits_mode!r}")
    for name, arr in (("tokens_BT", tokens_BT), ("positions_BT", positions_BT), ("seq_lens_B", seq_lens_B)):
        if not hasattr(arr, "dtype") or not hasattr(arr, "shape"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    if len(tokens_BT.shape) != 2:
        raise ValueError(f"tokens_BT must be [B, T], got shape {tuple(tokens_BT.shape)}")
    B, T = tokens_BT.shape
    if T == 0 or B == 0:
        raise ValueError(f"tokens_BT must be non-empty, got shape {tuple(tokens_BT.shape)}")
    if tuple(positions_BT.shape) != (B, T):
        raise ValueError(f"positions_BT shape {tuple(positions_BT.shape)} != tokens shape {(B, T)}")
    if tuple(seq_lens_B.shape) != (B,):
        raise ValueError(f"seq_lens_B shape {tuple(seq_lens_B.shape)} != ({B},)")
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if len(cache.k_LBSHD.shape) == 5 and cache.k_LBSHD.shape[1] != B:
        raise ValueError(f"cache batch {cache.k_LBSHD.shape[1]} != tokens batch {B}")
    expected = (config.n_layers, B, None, config.n_kv_heads, config.head_dim)
    for name, arr in (("k_LBSHD", cache.k_LBSHD), ("v_LBSHD", cache.v_LBSHD)):
        got = tuple(arr.shape)
        if len(got) != 5 or any(e is not None and e != g for e, g in zip(expected, got)):
            raise ValueError(
                f"cache.{name} shape {got} does not match [L={config.n_layers}, B={B}, S, "
                f"H={config.n_kv_heads}, D={config.head_dim}] (batch of tokens is {B})"
            )
    if tuple(cache.lengths_B.shape) != (B,):
        raise ValueError(f"cache.lengths_B shape {tuple(cache.lengths_B.shape)} != ({B},)")
    if T > cache.max_len:
        raise ValueError(f"chunk of {T} tokens does not fit a cache of max_len {cache.max_len}")

    tokens, positions, seq_lens = _concrete(tokens_BT), _concrete(positions_BT), _concrete(seq_lens_B)
    if tokens is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(
            f"token ids must be in [0, {config.vocab_size}), got [{tokens.min()}, {tokens.max()}]"
        )
    if seq_lens is not None and (seq_lens.min() < 0 or seq_lens.max() > T):
        raise ValueError(f"seq_lens_B must be in [0, T={T}], got {seq_lens.tolist()}")
    if positions is not None:
        # Only valid tokens matter: padded slots may carry any position.
        valid = np.arange(T)[None, :] < (seq_lens[:, None] if seq_lens is not None else T)
        pos_valid = positions[valid]
        if pos_valid.size and pos_valid.min() < 0:
            raise ValueError(f"positions must be >= 0, got min {pos_valid.min()}")
        if pos_valid.size and pos_valid.max() >= config.max_context:
            raise ValueError(
                f"position {pos_valid.max()} is beyond the model's max_context {config.max_context}"
            )
    lengths = _concrete(cache.lengths_B)
    if lengths is not None and seq_lens is not None and (lengths + seq_lens).max() > cache.max_len:
        raise ValueError(
            f"cache overflow: lengths {lengths.tolist()} + seq_lens {seq_lens.tolist()} exceed "
            f"max_len {cache.max_len}"
        )


class Llama(nnx.Module):
    """Decoder-only transformer. Call with a chunk of tokens and a KV cache; returns (logits, cache, aux)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        dt = _check_dtype(dtype)
        self.config = config
        self.dtype = dt
        self.embed_VM = _normal(rngs, (config.vocab_size, config.d_model), dt)
        self.layers = DecoderLayer(config, rngs=rngs, dtype=dt, stack=(config.n_layers,))
        self.final_norm = RMSNorm(config.d_model, config.rms_eps, dtype=dt)
        head_shape = (config.vocab_size, config.d_model)
        self.lm_head_VM = None if config.tie_embeddings else _normal(rngs, head_shape, dt)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        seq_lens_B: jax.Array,
        cache: KVCache,
        backend: AttentionBackend,
        backend_state: Any = None,
        logits_mode: str = "last",
    ) -> tuple[jax.Array | None, KVCache, Any]:
        """Run a right-padded chunk `[B, T]` through all layers.

        `positions_BT` are absolute RoPE positions, `seq_lens_B` the valid tokens per row. The chunk is
        written to the cache after each row's `cache.lengths_B`, which advance by `seq_lens_B`. Logits (f32):
        "last" `[B, V]` at token `seq_lens_B - 1`, "all" `[B, T, V]`, "none" None. `aux` is the backend's
        per-layer aux stacked over L (or None). `backend_state` leaves carry a leading L axis.
        """
        check_inputs(self.config, tokens_BT, positions_BT, seq_lens_B, cache, logits_mode)
        for path, leaf in jax.tree_util.tree_leaves_with_path(backend_state):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != self.config.n_layers:
                raise ValueError(
                    f"backend_state leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
                    f"every leaf needs a leading layer axis of {self.config.n_layers}"
                )
        tokens_BT = tokens_BT.astype(jnp.int32)
        positions_BT = positions_BT.astype(jnp.int32)
        seq_lens_B = seq_lens_B.astype(jnp.int32)
        lengths_B = cache.lengths_B.astype(jnp.int32)

        x_BTM = jnp.take(self.embed_VM[...], tokens_BT, axis=0)
        graphdef, layers_state = nnx.split(self.layers)

        # The cache rides in the carry and each layer's slice is updated in place: passing it as scan
        # input/output instead makes XLA copy the whole cache every step (~2x slower decode on CPU).
        def layer_step(carry: tuple, xs: tuple) -> tuple[tuple, Any]:
            x_BTM, k_LBSHD, v_LBSHD = carry
            i, layer_state, backend_layer_state = xs
            layer = nnx.merge(graphdef, layer_state)
            layer_kv = LayerKV(
                jax.lax.dynamic_index_in_dim(k_LBSHD, i, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(v_LBSHD, i, 0, keepdims=False),
            )
            x_BTM, layer_kv, aux = layer(
                x_BTM, positions_BT, lengths_B, seq_lens_B, layer_kv, backend, backend_layer_state
            )
            new_k, new_v = layer_kv.k_BSHD.astype(k_LBSHD.dtype), layer_kv.v_BSHD.astype(v_LBSHD.dtype)
            k_LBSHD = jax.lax.dynamic_update_index_in_dim(k_LBSHD, new_k, i, 0)
            v_LBSHD = jax.lax.dynamic_update_index_in_dim(v_LBSHD, new_v, i, 0)
            return (x_BTM, k_LBSHD, v_LBSHD), aux

        layer_ids = jnp.arange(self.config.n_layers, dtype=jnp.int32)
        (x_BTM, k_LBSHD, v_LBSHD), aux = jax.lax.scan(
            layer_step, (x_BTM, cache.k_LBSHD, cache.v_LBSHD), (layer_ids, layers_state, backend_state)
        )
        new_cache = KVCache(k_LBSHD, v_LBSHD, lengths_B + seq_lens_B)
        return self._logits(x_BTM, seq_lens_B, logits_mode), new_cache, aux

    def _logits(self, x_BTM: jax.Array, seq_lens_B: jax.Array, logits_mode: str) -> jax.Array | None:
        if logits_mode == "none":
            return None
        head_VM = self.embed_VM[...] if self.lm_head_VM is None else self.lm_head_VM[...]
        if logits_mode == "last":
            last_B = jnp.maximum(seq_lens_B - 1, 0)
            x_BM = jnp.take_along_axis(x_BTM, last_B[:, None, None], axis=1)[:, 0]
            return jnp.einsum("bm,vm->bv", self.final_norm(x_BM), head_VM, preferred_element_type=jnp.float32)
        return jnp.einsum("btm,vm->btv", self.final_norm(x_BTM), head_VM, preferred_element_type=jnp.float32)


def apply(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    seq_lens_B: jax.Array,
    cache: KVCache,
    backend: AttentionBackend,
    backend_state: Any = None,
    logits_mode: str = "last",
) -> tuple[jax.Array | None, KVCache, Any]:
    """Functional forward: `nnx.merge(graphdef, state)`, then call.

    This is what generation jits, with `graphdef`, `backend` and `logits_mode` static (the cache may be
    donated). Value checks of `check_inputs` are skipped on traced arguments: run it on the host first.
    """
    model = nnx.merge(graphdef, state)
    return model(tokens_BT, positions_BT, seq_lens_B, cache, backend, backend_state, logits_mode)


def _fmix32(x: jax.Array) -> jax.Array:
    """Murmur3 finaliser: a cheap, well-mixed bijection of uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _hash_uniform(keys: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Counter-based uniform values with mean 0 and std `INIT_STD` (uint32 keys `[2]`)."""
    rows, cols = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    r = jax.lax.broadcasted_iota(jnp.uint32, (rows, cols), 0)
    c = jax.lax.broadcasted_iota(jnp.uint32, (rows, cols), 1)
    x = _fmix32(_fmix32(r * jnp.uint32(0x9E3779B9) + keys[0]) ^ (c * jnp.uint32(0x7FEB352D) + keys[1]))
    u = (x >> 8).astype(jnp.float32) * (2.0**-24) - 0.5  # uniform in [-0.5, 0.5), std 1/sqrt(12)
    return (u * (INIT_STD * np.sqrt(12.0))).astype(dtype).reshape(shape)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaves(keys_N2: jax.Array, shapes: tuple, kinds: tuple, dtype: np.dtype) -> list[jax.Array]:
    out = []
    for i, (shape, kind) in enumerate(zip(shapes, kinds)):
        if kind == "one":
            out.append(jnp.ones(shape, dtype))
        elif kind == "zero":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append(_hash_uniform(keys_N2[i], shape, dtype))
    return out


def init_model(config: ModelConfig, key_or_seed: int | jax.Array = 0, dtype: Any = jnp.float32) -> Llama:
    """Random weights: matrices uniform with std 0.02 (mean 0), norm scales one, biases zero.

    Values come from a jitted counter-based hash of the seed, so they are identical on every platform and
    generation takes about a second on CPU for SmolLM2-135M (threefry normals take ~10x longer there).
    A jax PRNG key is reduced to an integer seed first.
    """
    dt = _check_dtype(dtype)
    if isinstance(key_or_seed, jax.Array) and not isinstance(key_or_seed, jax.core.Tracer):
        key = key_or_seed
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    elif isinstance(key_or_seed, int | np.integer) and not isinstance(key_or_seed, bool):
        seed = int(key_or_seed)
    else:
        raise TypeError(f"key_or_seed must be an int or a jax PRNG key, got {type(key_or_seed).__name__}")

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dt))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    paths = [path for path, _ in flat]
    shapes = tuple(tuple(var.shape) for _, var in flat)
    keys = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32]).generate_state(2 * len(paths), np.uint32)
    # RMSNorm scales start at one, biases (bq/bk/bv) at zero, every matrix random.
    kinds = tuple("one" if p[-1] == "scale_M" else "zero" if str(p[-1]).startswith("b") else "rand"
                  for p in paths)
    values = _random_leaves(jnp.asarray(keys.reshape(-1, 2)), shapes, kinds, dt)
    new_flat = [(path, var.replace(value)) for (path, var), value in zip(flat, values)]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


# ----------------------------------------------------------------------------------------------------------
# Hugging Face state dicts


def hf_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its `[out, in]` shape."""
    M, F, V = config.d_model, config.ffn_dim, config.vocab_size
    q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, M)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, M)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, M)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, M)
        shapes[p + "self_attn.o_proj.weight"] = (M, q_dim)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (F, M)
        shapes[p + "mlp.up_proj.weight"] = (F, M)
        shapes[p + "mlp.down_proj.weight"] = (M, F)
        shapes[p + "input_layernorm.weight"] = (M,)
        shapes[p + "post_attention_layernorm.weight"] = (M,)
    shapes["model.norm.weight"] = (M,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, M)
    return shapes


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(config: ModelConfig, state_dict: dict[str, Any]) -> None:
    """Strict check of names, shapes and dtypes against `hf_param_shapes(config)` (ValueError/TypeError)."""
    expected = hf_param_shapes(config)
    missing = [n for n in expected if n not in state_dict]
    unexpected = [n for n in state_dict if n not in expected]
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} tensor(s): {_names(missing)}")
    if unexpected:
        tied_head = "lm_head.weight" in unexpected
        hint = " (config.tie_embeddings is True: drop lm_head.weight)" if tied_head else ""
        raise ValueError(f"state dict has {len(unexpected)} unexpected tensor(s): {_names(unexpected)}{hint}")
    for name, shape in expected.items():
        arr = state_dict[name]
        got = tuple(getattr(arr, "shape", ()))
        if got != shape:
            raise ValueError(f"tensor {name} has shape {got}, expected {shape}")
        if not jnp.issubdtype(np.dtype(arr.dtype), jnp.floating):
            raise TypeError(f"tensor {name} has non-float dtype {arr.dtype}")


def _internal_arrays(config: ModelConfig, sd: dict[str, Any], dt: np.dtype) -> dict[str, Any]:
    """Nested dict mirroring `Llama`'s parameter tree, built from HF-named tensors (host numpy)."""
    Hq, H, D, M = config.n_heads, config.n_kv_heads, config.head_dim, config.d_model
    L = config.n_layers

    def cast(a: Any) -> np.ndarray:
        return np.asarray(a).astype(dt, copy=False)

    def stacked(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([cast(sd[f"model.layers.{i}.{suffix}"]).reshape(shape) for i in range(L)])

    attn: dict[str, Any] = {
        "wq_HqDM": stacked("self_attn.q_proj.weight", (Hq, D, M)),
        "wk_HDM": stacked("self_attn.k_proj.weight", (H, D, M)),
        "wv_HDM": stacked("self_attn.v_proj.weight", (H, D, M)),
        "wo_MHqD": stacked("self_attn.o_proj.weight", (M, Hq, D)),
    }
    if config.qkv_bias:
        attn["bq_HqD"] = stacked("self_attn.q_proj.bias", (Hq, D))
        attn["bk_HD"] = stacked("self_attn.k_proj.bias", (H, D))
        attn["bv_HD"] = stacked("self_attn.v_proj.bias", (H, D))
    tree: dict[str, Any] = {
        "embed_VM": cast(sd["model.embed_tokens.weight"]),
        "layers": {
            "attn_norm": {"scale_M": stacked("input_layernorm.weight", (M,))},
            "attn": attn,
            "mlp_norm": {"scale_M": stacked("post_attention_layernorm.weight", (M,))},
            "mlp": {
                "gate_FM": stacked("mlp.gate_proj.weight", (config.ffn_dim, M)),
                "up_FM": stacked("mlp.up_proj.weight", (config.ffn_dim, M)),
                "down_MF": stacked("mlp.down_proj.weight", (M, config.ffn_dim)),
            },
        },
        "final_norm": {"scale_M": cast(sd["model.norm.weight"])},
    }
    if not config.tie_embeddings:
        tree["lm_head_VM"] = cast(sd["lm_head.weight"])
    return tree


def load_state_dict(
    model_or_config: Llama | ModelConfig, state_dict: dict[str, Any], dtype: Any = None
) -> Llama:
    """Build a `Llama` from Hugging Face-named `[out, in]` tensors (numpy or array-likes).

    Strict: a missing, unexpected or mis-shaped tensor raises ValueError naming it, before anything is
    converted. `dtype` defaults to the given model's dtype, or float32 for a config.
    """
    if isinstance(model_or_config, Llama):
        config = model_or_config.config
        dtype = model_or_config.dtype if dtype is None else dtype
    elif isinstance(model_or_config, ModelConfig):
        config = model_or_config
    else:
        raise TypeError(f"expected a Llama or ModelConfig, got {type(model_or_config).__name__}")
    dt = _check_dtype(jnp.float32 if dtype is None else dtype)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of arrays, got {type(state_dict).__name__}")
    check_state_dict(config, state_dict)

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dt))
    graphdef, state = nnx.split(abstract)
    tree = _internal_arrays(config, state_dict, dt)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
    return nnx.merge(graphdef, state)


def to_state_dict(model: Llama) -> dict[str, np.ndarray]:
    """Inverse of `load_state_dict`: Hugging Face-named `[out, in]` numpy arrays in the model dtype."""
    config = model.config
    M = config.d_model
    tree = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    layers, attn, mlp = tree["layers"], tree["layers"]["attn"], tree["layers"]["mlp"]
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": tree["embed_VM"]}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = attn["wq_HqDM"][i].reshape(-1, M)
        out[p + "self_attn.k_proj.weight"] = attn["wk_HDM"][i].reshape(-1, M)
        out[p + "self_attn.v_proj.weight"] = attn["wv_HDM"][i].reshape(-1, M)
        out[p + "self_attn.o_proj.weight"] = attn["wo_MHqD"][i].reshape(M, -1)
        if config.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = attn["bq_HqD"][i].reshape(-1)
            out[p + "self_attn.k_proj.bias"] = attn["bk_HD"][i].reshape(-1)
            out[p + "self_attn.v_proj.bias"] = attn["bv_HD"][i].reshape(-1)
        out[p + "mlp.gate_proj.weight"] = mlp["gate_FM"][i]
        out[p + "mlp.up_proj.weight"] = mlp["up_FM"][i]
        out[p + "mlp.down_proj.weight"] = mlp["down_MF"][i]
        out[p + "input_layernorm.weight"] = layers["attn_norm"]["scale_M"][i]
        out[p + "post_attention_layernorm.weight"] = layers["mlp_norm"]["scale_M"][i]
    out["model.norm.weight"] = tree["final_norm"]["scale_M"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = tree["lm_head_VM"]
    return out
