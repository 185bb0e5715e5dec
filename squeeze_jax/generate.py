"""Jit-compiled generation: one prefill call and one `lax.while_loop` decode call per request batch.

Generation knows nothing of clustering: it takes an attention backend (a hashable, static object) and its state
(a pytree with a leading layer axis, e.g. a context index), plus the RoPE position at which the user tokens start.
A backend that defines `after_prefill(state, aux) -> (state, aux)` gets the prefill's per-layer aux once, before
decode, and may move per-request data from it into the state decode reads.
Prompts are right-padded to a length bucket and the batch to a size bucket so that shapes recompile rarely.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import DenseAttention
from models.kv_cache import KVCache
from models.llama import Llama, apply

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature == 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class GenerationResult:
    """Generated tokens per prompt (stop token excluded), decoded text when a tokenizer was given, timings."""

    tokens: list[list[int]]
    texts: list[str] | None
    prefill_s: float
    decode_s: float
    n_decode_steps: int
    stats: dict[str, Any]

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.n_decode_steps, 1)


def length_bucket(n: int, minimum: int = 64) -> int:
    """Round a prompt length up to a bucket: powers of two up to 2048, then multiples of 1024."""
    if n <= 2048:
        b = minimum
        while b < n:
            b *= 2
        return b
    return -(-n // 1024) * 1024


def batch_bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def sample_next(logits_BV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        n_keep = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "cache_len"))
def _prefill(graphdef, state, tokens_BT, seq_lens_B, position_offset, backend_state, *, backend, cache_len):
    config = _config_of(graphdef, state)
    B, T = tokens_BT.shape
    cache = KVCache.init(config, B, cache_len, _param_dtype(state))
    positions_BT = position_offset + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BV, cache, aux = apply(graphdef, state, tokens_BT, positions_BT, seq_lens_B, cache, backend,
                                  backend_state, logits_mode="last")
    return logits_BV, cache, aux


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "sampling"), donate_argnames=("cache",))
def _decode(graphdef, state, first_logits_BV, cache, position_offset, backend_state, key, *, backend, sampling):
    """The decode loop; returns the final cache too, so that the donated input cache is updated in place (a donated
    buffer that is no output cannot be reused)."""
    B = first_logits_BV.shape[0]
    n_new = sampling.max_new_tokens
    stop = jnp.asarray(sampling.stop_tokens or (-1,), dtype=jnp.int32)
    key, sub = jax.random.split(key)
    tok0 = sample_next(first_logits_BV, sub, sampling.temperature, sampling.top_p)
    out0 = jnp.full((B, n_new), PAD_ID, jnp.int32).at[:, 0].set(tok0)
    done0 = jnp.isin(tok0, stop)
    n_gen0 = jnp.ones((B,), jnp.int32)

    def step_with(attn, tokens_B1, cache):
        positions = position_offset + cache.lengths_B[:, None]
        return apply(graphdef, state, tokens_B1, positions, jnp.ones((B,), jnp.int32), cache, attn,
                     backend_state, logits_mode="last")

    n_exact = getattr(backend, "exact_decode", 0)
    if n_exact:  # the first n_exact steps (i = 1..n_exact) with the backend's exact variant
        exact = backend.exact_variant()

        def step(i, tokens_B1, cache):
            return jax.lax.cond(i <= n_exact, functools.partial(step_with, exact),
                                functools.partial(step_with, backend), tokens_B1, cache)
    else:
        def step(i, tokens_B1, cache):
            del i
            return step_with(backend, tokens_B1, cache)

    aux_shape = jax.eval_shape(step, jnp.int32(1), tok0[:, None], cache)[2]
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape)

    def cond(carry):
        i, _, _, _, done, _, _, _ = carry
        return (i < n_new) & ~jnp.all(done)

    def body(carry):
        i, tok, out, cache, done, n_gen, key, aux_sum = carry
        logits, cache, aux = step(i, tok[:, None], cache)
        key, sub = jax.random.split(key)
        nxt = sample_next(logits, sub, sampling.temperature, sampling.top_p)
        nxt = jnp.where(done, PAD_ID, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop)
        aux_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), aux_sum, aux)
        return i + 1, nxt, out, cache, done, n_gen, key, aux_sum

    carry = (jnp.int32(1), tok0, out0, cache, done0, n_gen0, key, aux0)
    steps, _, out, cache, _, n_gen, _, aux_sum = jax.lax.while_loop(cond, body, carry)
    return out, n_gen, steps, aux_sum, cache


def _config_of(graphdef, state):
    return nnx.merge(graphdef, state).config


def _param_dtype(state) -> jnp.dtype:
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return leaves[0].dtype if leaves else jnp.float32


def _encode_prompts(prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
        raise TypeError("prompts must be a list of prompts (strings or token lists), not a single prompt")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
            ids = tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} has no tokens")
        out.append(ids)
    return out


def _check_token_range(ids: list[list[int]], vocab_size: int) -> None:
    for i, x in enumerate(ids):
        lo, hi = min(x), max(x)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} has token ids in [{lo}, {hi}], outside the model vocabulary "
                             f"[0, {vocab_size})")


def generate(
    model: Llama,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer=None,
    sampling: SamplingConfig | None = None,
    backend=None,
    backend_state=None,
    position_offset: int = 0,
    seed: int = 0,
) -> GenerationResult:
    """Generate continuations for a batch of prompts.

    `backend`/`backend_state` choose the attention (default dense over the prompt); `position_offset` is the RoPE
    position of the first prompt token (the fixed-context length when the prompt continues a pre-indexed context).
    """
    sampling = sampling or SamplingConfig(stop_tokens=tuple(model.config.eos_token_ids))
    backend = backend or DenseAttention()
    cfg = model.config
    ids = _encode_prompts(prompts, tokenizer)
    _check_token_range(ids, cfg.vocab_size)
    if tokenizer is not None and getattr(tokenizer, "vocab_size", cfg.vocab_size) > cfg.vocab_size:
        raise ValueError(f"tokenizer vocab ({tokenizer.vocab_size}) is larger than the model's ({cfg.vocab_size})")
    longest = max(len(x) for x in ids)
    total = position_offset + longest + sampling.max_new_tokens
    if total > cfg.max_context:
        raise ValueError(
            f"prompt needs {total} positions (offset {position_offset} + prompt {longest} + max_new_tokens "
            f"{sampling.max_new_tokens}) but the model allows {cfg.max_context}")
    T = length_bucket(longest)
    B = batch_bucket(len(ids))
    tokens = np.full((B, T), PAD_ID, np.int32)
    seq_lens = np.ones((B,), np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
        seq_lens[i] = len(x)
    for i in range(len(ids), B):  # padding rows repeat the first prompt
        tokens[i] = tokens[0]
        seq_lens[i] = seq_lens[0]
    cache_len = T + -(-sampling.max_new_tokens // 64) * 64
    graphdef, state = nnx.split(model)
    offset = jnp.int32(position_offset)

    t0 = time.perf_counter()
    logits, cache, aux_prefill = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(seq_lens), offset,
                                          backend_state, backend=backend, cache_len=cache_len)
    handoff = getattr(backend, "after_prefill", None)
    if handoff is not None:
        backend_state, aux_prefill = handoff(backend_state, aux_prefill)
    logits.block_until_ready()
    t1 = time.perf_counter()
    out, n_gen, steps, aux_sum, _ = _decode(graphdef, state, logits, cache, offset, backend_state,
                                            jax.random.key(seed), backend=backend, sampling=sampling)
    out = np.asarray(out)
    t2 = time.perf_counter()
    n_gen = np.asarray(n_gen)
    steps = int(steps)
    stop = set(sampling.stop_tokens)
    result_tokens = []
    for i in range(len(ids)):
        toks = [int(t) for t in out[i, : n_gen[i]]]
        if toks and toks[-1] in stop:
            toks = toks[:-1]
        result_tokens.append(toks)
    texts = [tokenizer.decode(t) for t in result_tokens] if tokenizer is not None else None
    stats: dict[str, Any] = {}
    if aux_prefill is not None:
        stats["prefill"] = jax.tree.map(np.asarray, aux_prefill)
    if aux_sum is not None and steps > 1:
        stats["decode_mean"] = jax.tree.map(lambda a: np.asarray(a) / (steps - 1), aux_sum)
    return GenerationResult(result_tokens, texts, t1 - t0, t2 - t1, max(steps - 1, 0), stats)
