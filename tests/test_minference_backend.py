"""MInferenceAttention as a model backend: full budgets equal dense, causality, prefix merge, the model path,
the GPU benchmark's smoke mode, and H100 lowering of the whole sparse prefill (index building + kernel)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import DenseAttention
from models.kv_cache import LayerKV
from pallas_kernels.common import has_triton_call, lower_for_h100
from squeeze_jax.minference.backend import MInferenceAttention, MInferenceState
from squeeze_jax.minference.search import HeadPattern, PatternConfig

B, T, H, G, D, S = 2, 160, 3, 2, 32, 192
A_SHAPE, VS, BS = 0, 1, 2


def _chunk(seed: int, t: int = T):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return f(B, t, H * G, D), f(B, t, H, D), f(B, t, H, D)


def _state(kind, p1, p2):
    full = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (H,))
    return MInferenceState(full(kind), full(p1), full(p2))


@functools.partial(jax.jit, static_argnums=0)
def _call(backend, q, k, v, kv, lengths, seq, pos, state):
    return backend(q, k, v, kv, lengths, seq, pos, state)


def _run(backend, q, k, v, seq, state, lengths=None, kv=None):
    kv = kv if kv is not None else LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D)))
    lengths = jnp.zeros((B,), jnp.int32) if lengths is None else lengths
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), (B, q.shape[1]))
    return _call(backend, q, k, v, kv, lengths, seq, pos, state)


FULL = MInferenceAttention(ref_len=T, max_vertical=T, max_slash=T, max_blocks=3, min_len=16,
                           default_pattern=("vertical_slash", T, T))


def test_every_pattern_at_full_budget_equals_dense():
    q, k, v = _chunk(0)
    seq = jnp.array([T, 117], jnp.int32)
    kv0 = LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D)))
    dense, _, _ = DenseAttention()(q, k, v, kv0, jnp.zeros((B,), jnp.int32), seq,
                                   jnp.broadcast_to(jnp.arange(T), (B, T)))
    mixed = MInferenceState(jnp.array([A_SHAPE, VS, BS]), jnp.array([0, T, 3]), jnp.array([T, T, 64]))
    for state in (_state(VS, T, T), _state(A_SHAPE, 0, T), _state(BS, 3, 64), mixed, None):
        out, new_kv, aux = _run(FULL, q, k, v, seq, state)
        for b in range(B):
            n = int(seq[b])
            np.testing.assert_allclose(np.asarray(out[b, :n]), np.asarray(dense[b, :n]), atol=2e-5)
        assert float(aux["kept_fraction"]) == pytest.approx(1.0)
    np.testing.assert_array_equal(np.asarray(new_kv.k_BSHD[0, :T]), np.asarray(k[0]))


def test_sparse_prefill_is_causal_and_pallas_matches_reference():
    q, k, v = _chunk(1)
    seq = jnp.full((B,), T, jnp.int32)
    state = MInferenceState(jnp.array([VS, A_SHAPE, BS]), jnp.array([40, 16, 1]), jnp.array([40, 32, 64]))
    no_tail = MInferenceAttention(**{**FULL.__dict__, "dense_tail": 0})  # the kept fraction of the index alone
    out, _, aux = _run(no_tail, q, k, v, seq, state)
    assert 0.0 < float(aux["kept_fraction"]) < 1.0
    # under a fixed index, changing keys/values from position `cut` on never changes earlier outputs
    to_heads = lambda x: x.transpose(0, 2, 1, 3)
    q5 = q.reshape(B, T, H, G, D).transpose(0, 2, 1, 3, 4)
    index = jax.jit(FULL.build_index)(q5, to_heads(k), seq, state)
    cut = 70
    k2, v2 = (x.at[:, cut:].set(x[:, cut:] * -3.0 + 1.0) for x in (k, v))
    attend = jax.jit(FULL.attend)
    o1, _ = attend(q5, to_heads(k), to_heads(v), index)
    o2, _ = attend(q5, to_heads(k2), to_heads(v2), index)
    np.testing.assert_allclose(np.asarray(o2[:, :, :cut]), np.asarray(o1[:, :, :cut]), atol=1e-6)
    assert float(jnp.max(jnp.abs(o2[:, :, cut:] - o1[:, :, cut:]))) > 1e-2
    pallas = MInferenceAttention(**{**no_tail.__dict__, "use_pallas": True, "interpret": True})
    out_p, _, aux_p = _run(pallas, q, k, v, seq, state)
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out), atol=2e-5)
    assert float(aux_p["kept_fraction"]) == pytest.approx(float(aux["kept_fraction"]))


def test_dense_tail_rows_are_exact_and_the_rest_unchanged(monkeypatch):
    import pallas_kernels.merge as merge_mod

    monkeypatch.setattr(merge_mod, "KEY_CHUNK", 48)  # several key chunks merged by LSE
    q, k, v = _chunk(5)
    seq = jnp.array([T, 117], jnp.int32)
    kv0 = LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D)))
    dense, _, _ = DenseAttention()(q, k, v, kv0, jnp.zeros((B,), jnp.int32), seq,
                                   jnp.broadcast_to(jnp.arange(T), (B, T)))
    sparse = MInferenceAttention(ref_len=T, max_vertical=8, max_slash=16, min_len=16,
                                 n_sink_cols=4, n_local_diags=8, default_pattern=("a_shape", 4, 16), dense_tail=0,
                                 block=16)
    tail = MInferenceAttention(**{**sparse.__dict__, "dense_tail": 20})
    out_s, _, aux_s = _run(sparse, q, k, v, seq, None)
    out_t, _, aux_t = _run(tail, q, k, v, seq, None)
    for b in range(B):
        n = int(seq[b])
        np.testing.assert_allclose(np.asarray(out_t[b, n - 20:n]), np.asarray(dense[b, n - 20:n]), atol=2e-5)
        assert float(jnp.max(jnp.abs(out_s[b, n - 20:n] - dense[b, n - 20:n]))) > 1e-2  # sparse rows differ
        np.testing.assert_array_equal(np.asarray(out_t[b, :n - 20]), np.asarray(out_s[b, :n - 20]))
    assert float(aux_t["kept_fraction"]) > float(aux_s["kept_fraction"])
    with pytest.raises(ValueError, match="dense_tail"):
        MInferenceAttention(dense_tail=-1)


def test_chunk_after_a_cached_prefix_merges_dense_prefix():
    q, k, v = _chunk(2)
    seq = jnp.array([T, 100], jnp.int32)
    kv = DenseAttention()(q, k, v, LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D))),
                          jnp.zeros((B,), jnp.int32), seq, jnp.broadcast_to(jnp.arange(T), (B, T)))[1]
    q2, k2, v2 = _chunk(3, t=32)
    seq2 = jnp.full((B,), 32, jnp.int32)
    want, _, _ = DenseAttention()(q2, k2, v2, kv, seq, seq2, jnp.zeros((B, 32), jnp.int32))
    got, _, _ = _run(FULL, q2, k2, v2, seq2, _state(VS, T, T), lengths=seq, kv=kv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # decode (T == 1) is dense over the cache
    got1, _, aux = _run(FULL, q2[:, :1], k2[:, :1], v2[:, :1], jnp.ones((B,), jnp.int32), None, lengths=seq, kv=kv)
    want1, _, _ = DenseAttention()(q2[:, :1], k2[:, :1], v2[:, :1], kv, seq, jnp.ones((B,), jnp.int32),
                                   jnp.zeros((B, 1), jnp.int32))
    np.testing.assert_allclose(np.asarray(got1), np.asarray(want1), atol=1e-6)
    assert aux is None


def test_from_config_and_bad_input():
    heads = (HeadPattern("vertical_slash", 64, 128, 0.1, 0.2), HeadPattern("a_shape", 8, 96, 0.1, 0.2),
             HeadPattern("block_sparse", 4, 64, 0.1, 0.2))
    cfg = PatternConfig(model="toy", ref_len=1024, sample_len=1024, block=64, layers=(heads, heads))
    backend, state = MInferenceAttention.from_config(cfg, min_len=16)
    assert (backend.max_vertical, backend.max_slash, backend.max_blocks) == (64, 128, 4)
    assert state.kind_LH.shape == (2, 3) and state.kind_LH[0].tolist() == [VS, A_SHAPE, BS]
    assert backend.capacities(512) == (32, 100, 2)
    with pytest.raises(ValueError, match="power of two"):
        MInferenceAttention(block=48)
    with pytest.raises(ValueError, match="capacities"):
        MInferenceAttention(max_vertical=10, default_pattern=("vertical_slash", 20, 100))
    with pytest.raises(ValueError, match="implementation"):
        MInferenceAttention(implementation="flash")
    with pytest.raises(ValueError, match="per layer must be"):
        FULL.head_budgets(MInferenceState(*(jnp.zeros((2, H), jnp.int32),) * 3), H)


def test_prefill_lowers_for_h100():
    """Index building + the vertical-slash kernel, Llama-3.1-8B attention shapes, bf16, mixed heads."""
    Sd = jax.ShapeDtypeStruct
    Hk, Gk, Dk, Tk = 8, 4, 128, 4096
    backend = MInferenceAttention(ref_len=Tk, max_vertical=256, max_slash=1024, max_blocks=16, use_pallas=True,
                                  interpret=False, block_rows=128, num_warps=8,
                                  default_pattern=("vertical_slash", 256, 1024))
    state = MInferenceState(jnp.array([VS, A_SHAPE, BS, VS] * 2), jnp.array([256, 64, 16, 128] * 2),
                            jnp.array([1024, 512, 64, 512] * 2))

    def prefill(q, k, v):
        z, n = jnp.zeros((1,), jnp.int32), jnp.full((1,), Tk, jnp.int32)
        return backend.prefill_lse(q, k, v, LayerKV(k, v), z, n, state)[0]

    text = lower_for_h100(prefill, Sd((1, Tk, Hk * Gk, Dk), jnp.bfloat16), Sd((1, Tk, Hk, Dk), jnp.bfloat16),
                          Sd((1, Tk, Hk, Dk), jnp.bfloat16))
    assert has_triton_call(text)


def test_gpu_benchmark_smoke_mode(tmp_path: Path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_minference.py"
    spec = importlib.util.spec_from_file_location("bench_minference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    bench.main(["--smoke", "--lengths", "128", "--only", "xla,backend_mixed", "--out", str(out)])
    res = json.loads(out.read_text())
    row = res["lengths"]["128"]
    assert row["best_dense"]["name"] == "xla"
    (run,) = row["sparse"]
    assert run["name"] == "backend_mixed_vs_ashape_bs" and run["ok"] and run["total_ms"] > 0
    assert "backend_mixed_vs_ashape_bs" in res["breakeven"]


def test_selectable_as_the_prefill_backend_of_generate():
    from models.config import ModelConfig
    from models.llama import init_model
    from squeeze_jax.generate import SamplingConfig, generate

    cfg = ModelConfig(name="tiny", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=48, max_context=256, rope_theta=10000.0, eos_token_ids=(96,))
    model = init_model(cfg, 0, jnp.float32)
    heads = (HeadPattern("vertical_slash", 128, 128, 0.0, 1.0), HeadPattern("a_shape", 0, 128, 0.0, 1.0))
    config = PatternConfig(model="tiny", ref_len=128, sample_len=128, block=64, layers=(heads, heads[::-1]))
    backend, state = MInferenceAttention.from_config(config, min_len=16)
    assert state.kind_LH.shape == (2, 2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, 100).tolist(), rng.integers(0, 96, 77).tolist()]
    sampling = SamplingConfig(max_new_tokens=6)
    dense = generate(model, prompts, sampling=sampling)
    sparse = generate(model, prompts, sampling=sampling, backend=backend, backend_state=state)
    assert sparse.tokens == dense.tokens
    assert float(np.mean(sparse.stats["prefill"]["kept_fraction"])) == pytest.approx(1.0)
