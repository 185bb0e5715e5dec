"""ContextMInference: a pre-indexed fixed context (ContextAttention) merged with MInference sparse prefill over the
user prompt's own keys. At full MInference budget it equals ContextAttention alone (dense and squeezed context
policies, GQA, ragged rows, a chunk after a cached prefix, and through `generate`); a sparse pattern stays finite
and causal; the constructor rejects what it cannot compose."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import DenseAttention
from models.kv_cache import LayerKV
from squeeze_jax.attention.context import ContextAttention, ContextState
from squeeze_jax.index import IndexConfig
from squeeze_jax.minference.backend import (
    ContextMInference,
    ContextMInferenceState,
    MInferenceAttention,
    MInferenceState,
)

# batch, user tokens, KV heads, query heads per KV head (GQA 3x), head dim, cache length, context tokens
B, T, H, G, D, S, N_CTX = 2, 96, 2, 3, 16, 256, 192
A_SHAPE, VS = 0, 1
MIN_LEN = 32
SEQ = (T, 70)  # two rows of different lengths
FULL = MInferenceAttention(ref_len=T, max_vertical=T, max_slash=T, min_len=MIN_LEN,
                           default_pattern=("vertical_slash", T, T))
FULL_PATTERNS = MInferenceState(jnp.array([VS, A_SHAPE]), jnp.array([T, 0]), jnp.array([T, T]))


def _patterns(kind, p1, p2) -> MInferenceState:
    full = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (H,))
    return MInferenceState(full(kind), full(p1), full(p2))


@pytest.fixture(scope="module")
def tiny():
    """A tiny random-weight Llama (GQA 3x) and the index of a random fixed context it prefilled."""
    from models.config import ModelConfig
    from models.llama import init_model
    from squeeze_jax.index import build_index

    cfg = ModelConfig(name="tiny", vocab_size=97, d_model=32, n_layers=2, n_heads=H * G, n_kv_heads=H, head_dim=D,
                      ffn_dim=48, max_context=512, rope_theta=10000.0, eos_token_ids=(96,))
    model = init_model(cfg, 0, jnp.float32)
    context = np.random.default_rng(0).integers(0, 96, N_CTX).astype(np.int32)
    index = build_index(model, context, IndexConfig(centroid_fraction=0.1, iters=3, n_sink=4, window=12,
                                                    budgets=(0.25,), progress=False))
    return model, index


@pytest.fixture(scope="module")
def context_state(tiny) -> ContextState:
    """Layer 1 of the context's state (leading layer axis removed, as the model's scan does), budget 0.25."""
    state = ContextState.create(tiny[1], jnp.full((tiny[1].n_layers, B), 0.25, jnp.float32))
    return jax.tree.map(lambda a: a[1], state)


def _chunk(seed: int, t: int = T):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return f(B, t, H * G, D), f(B, t, H, D), f(B, t, H, D)


@functools.partial(jax.jit, static_argnums=0)
def _call(backend, q, k, v, kv, lengths, seq, state):
    pos = lengths[:, None] + jnp.arange(q.shape[1])[None]
    return backend(q, k, v, kv, lengths, seq, pos, state)


def _empty_kv() -> LayerKV:
    return LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D)))


def _assert_valid_close(got, want, seq, atol=2e-5):
    for b in range(B):
        n = int(seq[b])
        np.testing.assert_allclose(np.asarray(got[b, :n]), np.asarray(want[b, :n]), atol=atol, rtol=0)


def _compare_full_budget(policy_backend: ContextAttention, ctx_state: ContextState, more: bool = True):
    """ContextMInference(full budget) vs ContextAttention alone on a first chunk; with `more` also on a chunk
    after the cache and on one below min_len."""
    both = ContextMInference(policy_backend, FULL)
    state = ContextMInferenceState(ctx_state, FULL_PATTERNS)
    q, k, v = _chunk(0)
    seq = jnp.asarray(SEQ, jnp.int32)
    zeros = jnp.zeros((B,), jnp.int32)
    want, kv_want, aux_want = _call(policy_backend, q, k, v, _empty_kv(), zeros, seq, ctx_state)
    got, kv_got, aux = _call(both, q, k, v, _empty_kv(), zeros, seq, state)
    assert got.shape == (B, T, H * G, D) and got.dtype == q.dtype
    _assert_valid_close(got, want, SEQ)
    np.testing.assert_array_equal(np.asarray(kv_got.k_BSHD), np.asarray(kv_want.k_BSHD))
    np.testing.assert_array_equal(np.asarray(kv_got.v_BSHD), np.asarray(kv_want.v_BSHD))
    # the MInference path really ran (T >= min_len), keeping every causal tile of the user prompt
    assert float(aux["user_kept_fraction"]) == pytest.approx(1.0)
    assert float(aux["kept_fraction"]) == pytest.approx(float(aux_want["kept_fraction"]))
    # the context part matters: attention over the user's own tokens alone is far from it
    alone, _, _ = _call(DenseAttention(), q, k, v, _empty_kv(), zeros, seq, None)
    assert float(jnp.max(jnp.abs(alone[0] - want[0]))) > 1e-2
    if not more:
        return aux_want

    # a chunk continuing the cache: dense over the cached prefix, sparse (here full) over the chunk
    q2, k2, v2 = _chunk(1, t=MIN_LEN + 8)
    seq2 = jnp.asarray([MIN_LEN + 8, MIN_LEN + 1], jnp.int32)
    want2, _, _ = _call(policy_backend, q2, k2, v2, kv_want, seq, seq2, ctx_state)
    got2, _, aux2 = _call(both, q2, k2, v2, kv_got, seq, seq2, state)
    _assert_valid_close(got2, want2, seq2)
    assert float(aux2["user_kept_fraction"]) == pytest.approx(1.0)

    # below min_len it is the context backend itself, with no MInference aux (decode is covered by generate)
    t, seq3 = MIN_LEN - 1, jnp.full((B,), MIN_LEN - 1, jnp.int32)
    got3, _, aux3 = _call(both, q2[:, :t], k2[:, :t], v2[:, :t], kv_got, seq, seq3, state)
    want3, _, _ = _call(policy_backend, q2[:, :t], k2[:, :t], v2[:, :t], kv_want, seq, seq3, ctx_state)
    np.testing.assert_allclose(np.asarray(got3), np.asarray(want3), atol=1e-6, rtol=0)
    assert "user_kept_fraction" not in aux3
    return aux_want


def test_full_budget_equals_dense_context_attention(context_state):
    aux = _compare_full_budget(ContextAttention(policy="dense"), context_state)
    assert float(aux["kept_fraction"]) == pytest.approx(1.0)


def test_full_budget_equals_squeezed_context_attention(context_state):
    squeezed = ContextAttention(policy="squeezed", max_budget=0.25)
    aux = _compare_full_budget(squeezed, context_state, more=False)
    assert 0.1 < float(aux["kept_fraction"]) < 0.4  # the context part really is sparse
    # ... and differs from the dense context
    q, k, v = _chunk(0)
    seq, zeros = jnp.asarray(SEQ, jnp.int32), jnp.zeros((B,), jnp.int32)
    sq, _, _ = _call(squeezed, q, k, v, _empty_kv(), zeros, seq, context_state)
    dense, _, _ = _call(ContextAttention(policy="dense"), q, k, v, _empty_kv(), zeros, seq, context_state)
    assert float(jnp.max(jnp.abs(sq[0] - dense[0]))) > 1e-3


@pytest.mark.parametrize("kernels", [False, True], ids=["jnp", "pallas"])
def test_exact_tail_rows_equal_dense_context_and_the_rest_unchanged(context_state, monkeypatch, kernels):
    """jnp path: the tail rows by key chunks merged by LSE; kernel path (interpret mode): by the decode kernel
    with every block selected, rows folded into tiles of 16 (several tiles)."""
    import pallas_kernels.merge as merge_mod
    import pallas_kernels.sparse_decode as sd_mod

    monkeypatch.setattr(merge_mod, "KEY_CHUNK", 80)  # several context-key chunks merged by LSE
    monkeypatch.setattr(sd_mod, "ALL_KEYS_ROWS", 16)
    rows = 5
    kw = dict(use_pallas=True, interpret=True, score="mean") if kernels else {}  # fixture state: no box table
    sparse = ContextAttention(policy="squeezed", max_budget=0.25, **kw)
    tail = ContextAttention(policy="squeezed", max_budget=0.25, exact_tail=rows, **kw)
    q, k, v = _chunk(3)
    seq, zeros = jnp.asarray(SEQ, jnp.int32), jnp.zeros((B,), jnp.int32)
    out = {name: _call(backend, q, k, v, _empty_kv(), zeros, seq, context_state)
           for name, backend in (("dense", ContextAttention(policy="dense", **kw)), ("sparse", sparse), ("tail", tail))}
    for b, n in enumerate(SEQ):
        last = slice(n - rows, n)
        np.testing.assert_allclose(np.asarray(out["tail"][0][b, last]), np.asarray(out["dense"][0][b, last]),
                                   atol=2e-5, rtol=0)
        assert float(jnp.max(jnp.abs(out["sparse"][0][b, last] - out["dense"][0][b, last]))) > 1e-3
        head = slice(0, n - rows)
        np.testing.assert_array_equal(np.asarray(out["tail"][0][b, head]), np.asarray(out["sparse"][0][b, head]))
    assert float(out["sparse"][2]["kept_fraction"]) < float(out["tail"][2]["kept_fraction"]) < 1.0
    # exact_end (teacher forcing question + answer rows): the exact rows end there, the later rows stay sparse
    ends = (SEQ[0] - 7, SEQ[1] - 2)
    st = dataclasses.replace(context_state, exact_end_LB=jnp.asarray(ends, jnp.int32))
    got = _call(tail, q, k, v, _empty_kv(), zeros, seq, st)[0]
    for b, (n, e) in enumerate(zip(SEQ, ends)):
        np.testing.assert_allclose(np.asarray(got[b, e - rows:e]), np.asarray(out["dense"][0][b, e - rows:e]),
                                   atol=2e-5, rtol=0)
        for part in (slice(0, e - rows), slice(e, n)):
            np.testing.assert_array_equal(np.asarray(got[b, part]), np.asarray(out["sparse"][0][b, part]))
    if not kernels:
        _compare_full_budget(tail, context_state, more=False)  # the same rows through ContextMInference
    with pytest.raises(ValueError, match="exact_tail"):
        ContextAttention(exact_tail=-2)


def test_sparse_user_pattern_is_finite_and_causal(context_state):
    dense_ctx = ContextAttention(policy="dense")
    sparse = ContextMInference(dense_ctx, MInferenceAttention(**{**FULL.__dict__, "block": 16, "dense_tail": 0}))
    state = ContextMInferenceState(context_state, _patterns(A_SHAPE, 4, 16))  # 4 sinks + 16 local diagonals
    q, k, v = _chunk(2)
    seq, zeros = jnp.asarray(SEQ, jnp.int32), jnp.zeros((B,), jnp.int32)
    out, _, aux = _call(sparse, q, k, v, _empty_kv(), zeros, seq, state)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert 0.0 < float(aux["user_kept_fraction"]) < 1.0
    want, _, _ = _call(dense_ctx, q, k, v, _empty_kv(), zeros, seq, context_state)
    assert float(jnp.max(jnp.abs(out[0, 48:] - want[0, 48:]))) > 1e-3
    # early tokens see every user key within the window: there it is still exact
    _assert_valid_close(out[:, :16], want[:, :16], (16, 16))
    # changing user keys/values from position `cut` on never changes earlier outputs
    cut = 70
    k2, v2 = (x.at[:, cut:].set(x[:, cut:] * -3.0 + 1.0) for x in (k, v))
    out2, _, _ = _call(sparse, q, k2, v2, _empty_kv(), zeros, seq, state)
    np.testing.assert_allclose(np.asarray(out2[:, :cut]), np.asarray(out[:, :cut]), atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(out2[:, cut:] - out[:, cut:]))) > 1e-2


def test_generate_through_context_minference_matches_context_attention(tiny):
    from squeeze_jax.generate import SamplingConfig, batch_bucket, generate

    model, index = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 96, 100).tolist(), rng.integers(0, 96, 77).tolist()]  # length bucket 128
    ctx_state = ContextState.create(index, jnp.ones((index.n_layers, batch_bucket(len(prompts))), jnp.float32))
    dense_ctx = ContextAttention(policy="dense")
    minf = MInferenceAttention(ref_len=128, max_vertical=128, max_slash=128, min_len=64,
                               default_pattern=("vertical_slash", 128, 128))
    # per-(layer, KV head) patterns through the model's layer scan, each at full budget
    patterns = MInferenceState(jnp.array([[VS, A_SHAPE], [A_SHAPE, VS]]), jnp.array([[128, 0], [0, 128]]),
                               jnp.array([[128, 128], [128, 128]]))
    kw = dict(sampling=SamplingConfig(max_new_tokens=6), position_offset=index.context_len)
    want = generate(model, prompts, backend=dense_ctx, backend_state=ctx_state, **kw)
    got = generate(model, prompts, backend=ContextMInference(dense_ctx, minf),
                   backend_state=ContextMInferenceState(ctx_state, patterns), **kw)
    assert got.tokens == want.tokens
    assert all(len(t) == 6 for t in got.tokens)
    assert float(np.mean(got.stats["prefill"]["user_kept_fraction"])) == pytest.approx(1.0)


def test_constructor_errors():
    with pytest.raises(TypeError, match="ContextAttention"):
        ContextMInference(FULL)
    with pytest.raises(TypeError, match="ContextAttention"):
        ContextMInference(object(), FULL)
    with pytest.raises(ValueError, match="fidelity"):
        ContextMInference(ContextAttention(policy="dense", fidelity=True), FULL)
    assert ContextMInference(ContextAttention()).minference == MInferenceAttention()
