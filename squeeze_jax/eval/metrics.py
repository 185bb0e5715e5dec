"""Evaluation metrics: exact match, attention-mass recall / output error (from a backend's fidelity aux), and
teacher-forced next-token agreement / KL against the dense baseline.

All reductions are pure functions over host arrays (numpy, float64 for the divergences) so that they can be
tested against hand-computed values; `teacher_forced_logits` is the one function that runs the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from squeeze_jax.eval.tasks import score_answer

FIDELITY_KEYS = ("recall", "out_rel_err", "kept_fraction")


# ------------------------------------------------------------------------------------------ exact match


def exact_match(generated: str, answer: str) -> bool:
    """True when every part of `answer` appears in `generated` (see `tasks.score_answer`)."""
    if not isinstance(generated, str) or not isinstance(answer, str):
        raise TypeError(f"exact_match takes two strings, got {type(generated).__name__}, "
                        f"{type(answer).__name__}")
    if not answer.strip():
        raise ValueError("the reference answer is empty")
    return score_answer(generated, answer)


# ------------------------------------------------------------------------------------- recall / output error


def attention_recall(probs_TN: np.ndarray, kept_TN: np.ndarray) -> np.ndarray:
    """Attention mass over the kept keys, per query row: `sum_n p[t, n] * kept[t, n] / sum_n p[t, n]`.

    `probs_TN` are attention weights (any leading axes, keys last); `kept_TN` a same-shape (or broadcastable)
    boolean mask. Rows need not be normalised.
    """
    p = np.asarray(probs_TN, np.float64)
    kept = np.broadcast_to(np.asarray(kept_TN, bool), p.shape)
    if np.any(p < 0):
        raise ValueError("attention weights must be non-negative")
    total = p.sum(axis=-1)
    if np.any(total <= 0):
        raise ValueError("every query row needs positive attention mass")
    return np.where(kept, p, 0.0).sum(axis=-1) / total


def output_rel_error(out_ref_TD: np.ndarray, out_TD: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """`||out - out_ref|| / max(||out_ref||, eps)` over the last axis."""
    ref = np.asarray(out_ref_TD, np.float64)
    out = np.asarray(out_TD, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {out.shape}")
    return np.linalg.norm(out - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), eps)


def layer_metric(aux: Mapping[str, Any] | None, key: str) -> tuple[float, list[float]] | None:
    """(mean over layers, per-layer list) of a backend aux entry stacked over layers `[L]`; None if absent."""
    if aux is None or key not in aux:
        return None
    per_layer = np.asarray(aux[key], np.float64).reshape(-1)
    if per_layer.size == 0:
        raise ValueError(f"aux entry {key!r} is empty")
    return float(per_layer.mean()), [float(x) for x in per_layer]


def fidelity_summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten `GenerationResult.stats` ({"prefill": aux, "decode_mean": aux}) into overall and per-layer
    values.

    Keys: `{phase}_{metric}` (mean over layers) and `{phase}_{metric}_per_layer`, phase in prefill / decode.
    """
    out: dict[str, Any] = {}
    for phase, name in (("prefill", "prefill"), ("decode_mean", "decode")):
        aux = stats.get(phase)
        for key in FIDELITY_KEYS:
            got = layer_metric(aux, key)
            if got is None:
                continue
            out[f"{name}_{key}"] = got[0]
            if key != "kept_fraction":
                out[f"{name}_{key}_per_layer"] = got[1]
    return out


# ------------------------------------------------------------------------------------ logits comparison


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _check_logits(ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: {ref.shape} vs {got.shape}")
    if ref.ndim < 1 or ref.shape[-1] < 2:
        raise ValueError(f"logits need a vocabulary axis of size >= 2, got shape {ref.shape}")
    if mask is None:
        return np.ones(ref.shape[:-1], bool)
    mask = np.asarray(mask, bool)
    if mask.shape != ref.shape[:-1]:
        raise ValueError(f"mask shape {mask.shape} != logits shape without the vocabulary axis "
                         f"{ref.shape[:-1]}")
    return mask


def kl_per_position(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) in nats at every position (vocabulary on the last axis)."""
    ref = np.asarray(ref_logits)
    got = np.asarray(logits)
    _check_logits(ref, got, None)
    lp = _log_softmax(ref)
    lq = _log_softmax(got)
    return np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over the masked positions of KL(dense || method) in nats."""
    mask = _check_logits(np.asarray(ref_logits), np.asarray(logits), mask)
    if not mask.any():
        raise ValueError("the mask selects no position")
    return float(kl_per_position(ref_logits, logits)[mask].mean())


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of the masked positions where the argmax token of both logits is the same."""
    ref = np.asarray(ref_logits)
    got = np.asarray(logits)
    mask = _check_logits(ref, got, mask)
    if not mask.any():
        raise ValueError("the mask selects no position")
    same = np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)
    return float(same[mask].mean())


def bytes_read_fraction(kept_keys: float, centroid_reads: float, context_len: int) -> float:
    """Context bytes read per query relative to dense attention: a selected key costs its K and V rows (2 key
    rows), a centroid one key row (K only), dense reads `2 * context_len` rows."""
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    if kept_keys < 0 or centroid_reads < 0:
        raise ValueError(f"kept_keys and centroid_reads must be >= 0, got {kept_keys}, {centroid_reads}")
    return (2.0 * kept_keys + centroid_reads) / (2.0 * context_len)


# ------------------------------------------------------------------------------ teacher-forced forward


@dataclasses.dataclass(frozen=True)
class TeacherForced:
    """Token rows run through the model in one right-padded batch."""

    tokens_BT: np.ndarray
    seq_lens_B: np.ndarray
    n_rows: int


def pad_rows(rows: Sequence[Sequence[int]]) -> TeacherForced:
    """Right-pad token rows to a length bucket and the batch to a power of two (padding rows repeat row 0)."""
    from squeeze_jax.generate import PAD_ID, batch_bucket, length_bucket

    if isinstance(rows, str) or len(rows) == 0:
        raise ValueError("need a non-empty list of token rows")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every token row needs at least one token")
    T = length_bucket(max(len(r) for r in rows))
    B = batch_bucket(len(rows))
    tokens = np.full((B, T), PAD_ID, np.int32)
    lens = np.zeros((B,), np.int32)
    for i in range(B):
        r = rows[i] if i < len(rows) else rows[0]
        tokens[i, : len(r)] = np.asarray(r, np.int32)
        lens[i] = len(r)
    return TeacherForced(tokens, lens, len(rows))


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "cache_len"))
def _forward_all(graphdef, state, tokens_BT, seq_lens_B, position_offset, backend_state, *, backend,
                 cache_len):
    from models.kv_cache import KVCache
    from models.llama import apply

    dtype = next(x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    config = _model_config(graphdef, state)
    B, T = tokens_BT.shape
    cache = KVCache.init(config, B, cache_len, dtype)
    positions_BT = position_offset + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTV, _, aux = apply(graphdef, state, tokens_BT, positions_BT, seq_lens_B, cache, backend,
                               backend_state, logits_mode="all")
    return logits_BTV, aux


def _model_config(graphdef, state):
    from flax import nnx

    return nnx.merge(graphdef, state).config


def teacher_forced_logits(model, rows: Sequence[Sequence[int]], *, backend, backend_state: Any,
                          position_offset: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """Logits `[n_rows, T, V]` (float32) of every token of each row run in one forward pass, with the row
    lengths and the backend aux (stacked over layers). Positions start at `position_offset` (the fixed
    context's length when the rows continue a pre-indexed context)."""
    from flax import nnx

    batch = pad_rows(rows)
    cfg = model.config
    if position_offset < 0 or position_offset + batch.tokens_BT.shape[1] > cfg.max_context:
        raise ValueError(f"rows of {batch.tokens_BT.shape[1]} tokens at offset {position_offset} exceed the "
                         f"model's max_context ({cfg.max_context})")
    graphdef, state = nnx.split(model)
    logits, aux = _forward_all(graphdef, state, jnp.asarray(batch.tokens_BT), jnp.asarray(batch.seq_lens_B),
                               jnp.int32(position_offset), backend_state, backend=backend,
                               cache_len=int(batch.tokens_BT.shape[1]))
    n = batch.n_rows
    return np.asarray(logits[:n]), batch.seq_lens_B[:n], jax.tree.map(np.asarray, aux)


def position_masks(seq_lens: Sequence[int], answer_starts: Sequence[int],
                   T: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks `[B, T]` over logits positions: every valid position, and the positions that predict the answer
    (row b: `[answer_starts[b] - 1, seq_lens[b] - 1)`, the logits whose next token is an answer token)."""
    lens = np.asarray(seq_lens, np.int64)
    starts = np.asarray(answer_starts, np.int64)
    if lens.shape != starts.shape:
        raise ValueError(f"{lens.shape[0]} row lengths for {starts.shape[0]} answer starts")
    if np.any(starts < 1) or np.any(starts > lens) or np.any(lens > T):
        raise ValueError(f"need 1 <= answer_start <= seq_len <= T={T}; got starts {starts}, lengths {lens}")
    t = np.arange(T)[None, :]
    valid = t < lens[:, None]
    answer = (t >= starts[:, None] - 1) & (t < lens[:, None] - 1)
    return valid, answer


def logits_agreement(ref_logits: np.ndarray, logits: np.ndarray, seq_lens: Sequence[int],
                     answer_starts: Sequence[int]) -> dict[str, float]:
    """top-1 agreement and KL(dense || method) over all user positions and over the answer positions."""
    valid, answer = position_masks(seq_lens, answer_starts, np.asarray(ref_logits).shape[1])
    out = {"top1": top1_agreement(ref_logits, logits, valid), "kl": kl_divergence(ref_logits, logits, valid)}
    if answer.any():
        out["top1_answer"] = top1_agreement(ref_logits, logits, answer)
        out["kl_answer"] = kl_divergence(ref_logits, logits, answer)
    return out


def answer_margins(logits: np.ndarray, rows: Sequence[Sequence[int]], answer_starts: Sequence[int],
                   answer_ends: Sequence[int] | None = None) -> list[float | None]:
    """Per row, the smallest log-probability margin of the row's next token over the best other token along
    `rows[b][answer_starts[b]:answer_ends[b]]` (default: to the row's end), from teacher-forced logits
    `[rows, T, V]`. On a model's own greedy tokens it says how near the model was to answering otherwise (>= 0);
    on a reference answer it is negative where the greedy choice differs. None for an empty span."""
    logits = np.asarray(logits, np.float32)
    ends = [len(r) for r in rows] if answer_ends is None else list(answer_ends)
    if logits.ndim != 3 or logits.shape[0] < len(rows) or not len(rows) == len(answer_starts) == len(ends):
        raise ValueError(f"answer_margins: logits {logits.shape} for {len(rows)} rows, {len(answer_starts)} "
                         f"starts, {len(ends)} ends")
    out: list[float | None] = []
    for b, (row, start, end) in enumerate(zip(rows, answer_starts, ends)):
        if not 1 <= start <= end <= len(row) <= logits.shape[1]:
            raise ValueError(f"answer_margins: row {b} of {len(row)} tokens, answer span [{start}, {end}), "
                             f"logits of {logits.shape[1]} positions")
        if end == start:
            out.append(None)
            continue
        lp = _log_softmax(logits[b, start - 1:end - 1])
        steps, target = np.arange(end - start), np.asarray(row[start:end])
        right = lp[steps, target]
        lp[steps, target] = -np.inf
        out.append(float(np.min(right - lp.max(-1))))
    return out


def answer_prefix_length(tokenizer, tokens: Sequence[int], answer: str) -> int:
    """Generated tokens up to the first point where the decoded text holds the answer (all of them if never)."""
    for n in range(1, len(tokens) + 1):
        if exact_match(tokenizer.decode(list(tokens[:n])), answer):
            return n
    return len(tokens)


__all__ = [
    "answer_margins",
    "answer_prefix_length",
    "TeacherForced",
    "attention_recall",
    "bytes_read_fraction",
    "exact_match",
    "fidelity_summary",
    "kl_divergence",
    "kl_per_position",
    "layer_metric",
    "logits_agreement",
    "output_rel_error",
    "pad_rows",
    "position_masks",
    "teacher_forced_logits",
    "top1_agreement",
]
