"""Llama model core: RoPE, KV cache + dense attention, forward consistency, weight loading, input checks."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.attention import DenseAttention, LayerKV, causal_cache_mask, reference_attention, write_kv
from models.config import ModelConfig, RopeScaling, load_preset
from models.kv_cache import KVCache
from models.llama import apply, check_inputs, hf_param_shapes, init_model, load_state_dict, to_state_dict
from models.rope import apply_rope, inverse_frequencies

DENSE = DenseAttention()


def tiny_config(**changes) -> ModelConfig:
    base = ModelConfig(
        name="tiny",
        vocab_size=97,
        d_model=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=12,
        ffn_dim=80,
        max_context=64,
        rms_eps=1e-5,
        rope_theta=10000.0,
    )
    return base.replace(**changes)


def random_state_dict(config: ModelConfig, seed: int = 0, std: float = 0.15) -> dict[str, np.ndarray]:
    """HF-named random tensors; larger than init std so attention patterns are far from uniform."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_param_shapes(config).items():
        if "norm" in name:
            out[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------------------
# numpy references (float64, written independently of the model code)


def np_inv_freq(config: ModelConfig) -> np.ndarray:
    D = config.head_dim
    freqs = np.array([config.rope_theta ** (-(2 * i) / D) for i in range(D // 2)])
    rs = config.rope_scaling
    if rs.rope_type == "linear":
        return freqs / rs.factor
    if rs.rope_type == "llama3":
        out = []
        for f in freqs:
            wavelength = 2 * math.pi / f
            ratio = rs.original_max_position_embeddings / wavelength
            if ratio < rs.low_freq_factor:  # long wavelength: fully scaled
                out.append(f / rs.factor)
            elif ratio > rs.high_freq_factor:  # short wavelength: unchanged
                out.append(f)
            else:
                w = (ratio - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
                out.append((1 - w) * f / rs.factor + w * f)
        return np.array(out)
    return freqs


def np_rope(x_THD: np.ndarray, pos_T: np.ndarray, config: ModelConfig) -> np.ndarray:
    """RoPE as complex multiplication on explicit (i, partner) pairs."""
    D = config.head_dim
    theta_TK = pos_T[:, None].astype(np.float64) * np_inv_freq(config)[None, :]
    rot_T1K = np.exp(1j * theta_TK)[:, None, :]
    if config.rope_layout == "rotate_half":
        first, second = np.arange(D // 2), np.arange(D // 2) + D // 2
    else:
        first, second = np.arange(0, D, 2), np.arange(1, D, 2)
    z = (x_THD[..., first] + 1j * x_THD[..., second]) * rot_T1K
    out = np.empty(x_THD.shape, np.float64)
    out[..., first], out[..., second] = z.real, z.imag
    return out


def np_forward(config: ModelConfig, sd: dict[str, np.ndarray], tokens_T: np.ndarray) -> np.ndarray:
    """Full causal forward of one sequence from HF-named weights, per-head loops, float64. Returns [T, V]."""
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    T, D, G = len(tokens_T), config.head_dim, config.n_heads // config.n_kv_heads

    def rms(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_eps) * weight

    x = w["model.embed_tokens.weight"][tokens_T]
    pos = np.arange(T)
    causal = np.tril(np.ones((T, T), bool))
    for i in range(config.n_layers):
        p = f"model.layers.{i}.self_attn."
        h = rms(x, w[f"model.layers.{i}.input_layernorm.weight"])
        q, k, v = (h @ w[p + f"{n}_proj.weight"].T + w.get(p + f"{n}_proj.bias", 0.0) for n in "qkv")
        q = np_rope(q.reshape(T, config.n_heads, D), pos, config)
        k = np_rope(k.reshape(T, config.n_kv_heads, D), pos, config)
        v = v.reshape(T, config.n_kv_heads, D)
        o = np.zeros_like(q)
        for head in range(config.n_heads):
            kv = head // G
            s = q[:, head] @ k[:, kv].T / np.sqrt(D)
            s = np.where(causal, s, -np.inf)
            prob = np.exp(s - s.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            o[:, head] = prob @ v[:, kv]
        x = x + o.reshape(T, -1) @ w[p + "o_proj.weight"].T
        m = f"model.layers.{i}.mlp."
        h = rms(x, w[f"model.layers.{i}.post_attention_layernorm.weight"])
        gate = h @ w[m + "gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if config.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


# ------------------------------------------------------------------------------------------------------
# helpers


_APPLY = jax.jit(apply, static_argnames=("graphdef", "backend", "logits_mode"))


def run(
    model, tokens_BT, cache, positions_BT=None, seq_lens_B=None, logits_mode="all", backend=DENSE, state=None
):
    """Checked on the host, then the jitted functional forward (as generation does it)."""
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = cache.lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    positions_BT = jnp.asarray(positions_BT, jnp.int32)
    seq_lens_B = jnp.full((B,), T, jnp.int32) if seq_lens_B is None else jnp.asarray(seq_lens_B, jnp.int32)
    check_inputs(model.config, tokens_BT, positions_BT, seq_lens_B, cache, logits_mode)
    graphdef, params = nnx.split(model)
    return _APPLY(
        graphdef, params, tokens_BT, positions_BT, seq_lens_B, cache, backend, state, logits_mode=logits_mode
    )


# ------------------------------------------------------------------------------------------------------
# RoPE


ROPE_CASES = {
    "default_rotate_half": tiny_config(),
    "default_interleaved": tiny_config(rope_layout="interleaved"),
    "llama3": tiny_config(
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            "llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "linear": tiny_config(rope_scaling=RopeScaling("linear", factor=4.0)),
    "llama3_interleaved": tiny_config(
        rope_layout="interleaved",
        rope_scaling=RopeScaling(
            "llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=2.0,
            original_max_position_embeddings=128,
        ),
    ),
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_matches_numpy(name):
    config = ROPE_CASES[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, config.head_dim)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 100, 1000, 5000, 60000]], np.int32)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), config))
    want = np.stack([np_rope(x[b].astype(np.float64), pos[b], config) for b in range(2)])
    # float32 angles carry an absolute error of a few ulp(position): the tolerance grows with the position.
    tol = 1e-5 + 8 * np.abs(x).max() * np.spacing(pos.astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= tol[:, :, None, None]), np.abs(got - want).max(axis=(2, 3))
    np.testing.assert_allclose(np.asarray(inverse_frequencies(config)), np_inv_freq(config), rtol=1e-6)


def test_rope_scaling_changes_frequencies_as_specified():
    base = np_inv_freq(tiny_config())
    llama3 = inverse_frequencies(ROPE_CASES["llama3_interleaved"])
    default = inverse_frequencies(tiny_config(rope_layout="interleaved"))
    assert llama3[0] == pytest.approx(default[0])  # highest frequency untouched
    assert llama3[-1] == pytest.approx(default[-1] / 4.0, rel=1e-6)  # lowest divided by factor
    np.testing.assert_allclose(inverse_frequencies(ROPE_CASES["linear"]), base / 4.0, rtol=1e-6)


def test_rope_relative_positions_and_bf16():
    """q.k after RoPE depends only on the position difference; bf16 input keeps its dtype."""
    config = tiny_config()
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, config.head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, config.head_dim)), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), config)
        rk = apply_rope(k, jnp.array([[pk]]), config)
        return float(jnp.sum(rq * rk))

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
    assert apply_rope(q.astype(jnp.bfloat16), jnp.array([[5]]), config).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------------
# cache writes and dense attention


def test_write_kv_rows_padding_and_overflow():
    B, S, H, D, T = 3, 6, 2, 4, 3
    layer = LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D)))
    new = jnp.arange(1, B * T * H * D + 1, dtype=jnp.float32).reshape(B, T, H, D)
    lengths, seq_lens = jnp.array([0, 2, 5]), jnp.array([3, 1, 3])
    out = write_kv(layer, new, -new, lengths, seq_lens)
    k = np.asarray(out.k_BSHD)
    np.testing.assert_array_equal(k[0, :3], new[0])
    np.testing.assert_array_equal(k[0, 3:], 0)
    np.testing.assert_array_equal(k[1, 2], new[1, 0])  # only the valid token of row 1
    np.testing.assert_array_equal(np.delete(k[1], 2, axis=0), 0)
    np.testing.assert_array_equal(k[2, 5], new[2, 0])  # overflow dropped, never clamped back
    np.testing.assert_array_equal(k[2, :5], 0)
    np.testing.assert_array_equal(np.asarray(out.v_BSHD), -k)


@pytest.mark.parametrize(("T", "G"), [(1, 3), (4, 1), (4, 3)])
def test_dense_attention_matches_reference(T, G):
    rng = np.random.default_rng(3)
    B, S, H, D = 2, 12, 2, 8
    cache = LayerKV(*(jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32) for _ in range(2)))
    q = jnp.asarray(rng.standard_normal((B, T, H * G, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(2))
    lengths, seq_lens = jnp.array([0, 5]), jnp.array([T, T])
    dense = jax.jit(DENSE)
    out, new_kv, aux = dense(q, k, v, cache, lengths, seq_lens, None, None)
    assert aux is None
    written = jax.jit(write_kv)(cache, k, v, lengths, seq_lens)
    mask = causal_cache_mask(lengths, T, S)
    want = jax.jit(reference_attention)(q, written.k_BSHD, written.v_BSHD, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new_kv.k_BSHD), np.asarray(written.k_BSHD))
    # Query t of row 1 sees exactly 5 + t + 1 keys: changing a later cache entry must not matter.
    poisoned = LayerKV(cache.k_BSHD.at[1, 5 + T :].set(100.0), cache.v_BSHD.at[1, 5 + T :].set(100.0))
    out2, _, _ = dense(q, k, v, poisoned, lengths, seq_lens, None, None)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-5)
    _, _, aux = jax.jit(DenseAttention(capture_queries=True))(q, k, v, cache, lengths, seq_lens, None, None)
    np.testing.assert_array_equal(np.asarray(aux["q"]), np.asarray(q))


def test_reference_attention_against_loops():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 3, 4, 5))
    k, v = rng.standard_normal((1, 6, 2, 5)), rng.standard_normal((1, 6, 2, 5))
    mask = rng.random((1, 3, 6)) < 0.6
    mask[..., 0] = True
    got = np.asarray(reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    for t in range(3):
        for h in range(4):
            s = np.array([q[0, t, h] @ k[0, j, h // 2] / np.sqrt(5) for j in range(6)])
            s[~mask[0, t]] = -np.inf
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(got[0, t, h], p @ v[0, :, h // 2], atol=1e-5)


def test_dense_attention_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="implementation"):
        DenseAttention(implementation="flash")


# ------------------------------------------------------------------------------------------------------
# forward pass


@pytest.mark.parametrize(
    "changes",
    [
        dict(n_heads=4, n_kv_heads=4),  # G = 1 (MHA)
        dict(n_heads=6, n_kv_heads=2, tie_embeddings=True),  # G = 3, tied
        dict(n_heads=4, n_kv_heads=1, qkv_bias=True),  # G = 4 (MQA), bias
        dict(qkv_bias=True, rope_layout="interleaved", rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    ],
    ids=["gqa1", "gqa3_tied", "gqa4_bias", "llama3_interleaved"],
)
def test_forward_matches_numpy_reference(changes):
    config = tiny_config(**changes)
    sd = random_state_dict(config, seed=5)
    model = load_state_dict(config, sd, jnp.float32)
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, 11)
    logits, cache, aux = run(model, tokens[None], KVCache.init(config, 1, 16))
    assert logits.dtype == jnp.float32 and aux is None
    want = np_forward(config, sd, tokens)
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=2e-4, rtol=1e-4)
    assert np.asarray(cache.lengths_B).tolist() == [11]


# The tests below share one config and (B=2, S=16) shapes so that jit compilations are reused.
BASE = tiny_config(n_heads=6, n_kv_heads=2)
B2, S16 = 2, 16


@pytest.fixture(scope="module")
def base():
    sd = random_state_dict(BASE, seed=7)
    tokens = np.random.default_rng(8).integers(0, BASE.vocab_size, (B2, 12))
    model = load_state_dict(BASE, sd, jnp.float32)
    full, _, _ = run(model, tokens, KVCache.init(BASE, B2, S16), logits_mode="all")
    return sd, model, tokens, full


def test_prefill_then_decode_equals_full_sequence(base):
    _, model, tokens, full = base
    # prefill 5, then a chunk of 3 (cache offset > 0 and T > 1), then 4 single-token decode steps
    cache = KVCache.init(BASE, B2, S16)
    last, cache, _ = run(model, tokens[:, :5], cache, logits_mode="last")
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, 4]), atol=1e-5)
    chunk, cache, _ = run(model, tokens[:, 5:8], cache, logits_mode="all")
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(full[:, 5:8]), atol=1e-5)
    for t in range(8, 12):
        step, cache, _ = run(model, tokens[:, t : t + 1], cache, logits_mode="last")
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, t]), atol=1e-5)
    assert np.asarray(cache.lengths_B).tolist() == [12, 12]


def test_batched_right_padded_equals_one_by_one(base):
    sd, model, _, _ = base
    rng = np.random.default_rng(10)
    lens = [5, 3]
    prompts = [rng.integers(0, BASE.vocab_size, n) for n in lens]
    next_tok = rng.integers(0, BASE.vocab_size, (B2, 1))
    tokens = np.full((B2, 5), 7)  # padding id is arbitrary
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    positions = np.tile(np.arange(5), (B2, 1))
    last, cache, _ = run(model, tokens, KVCache.init(BASE, B2, S16), positions, lens, logits_mode="last")
    assert np.asarray(cache.lengths_B).tolist() == lens
    step, _, _ = run(model, next_tok, cache, np.array(lens)[:, None], [1, 1], logits_mode="last")
    for b, p in enumerate(prompts):
        want = np_forward(BASE, sd, np.concatenate([p, next_tok[b]]))
        np.testing.assert_allclose(np.asarray(last[b]), want[len(p) - 1], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(step[b]), want[len(p)], atol=2e-4, rtol=1e-4)
    # the short row alone through the model, unpadded
    one_last, one_cache, _ = run(model, prompts[1][None], KVCache.init(BASE, 1, S16), logits_mode="last")
    one_step, _, _ = run(model, next_tok[1:], one_cache, logits_mode="last")
    np.testing.assert_allclose(np.asarray(last[1]), np.asarray(one_last[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step[1]), np.asarray(one_step[0]), atol=1e-5)


def test_eager_call_logits_modes_and_positions_offset(base):
    """The un-jitted call equals the jitted `apply`; "none" returns no logits; positions only offset RoPE."""
    _, model, tokens, full = base
    cache = KVCache.init(BASE, B2, S16)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (B2, 12))
    seq = jnp.array([12, 12], jnp.int32)
    eager, eager_cache, _ = model(jnp.asarray(tokens, jnp.int32), pos, seq, cache, DENSE, logits_mode="all")
    np.testing.assert_allclose(np.asarray(eager), np.asarray(full), atol=1e-5)
    assert np.asarray(eager_cache.lengths_B).tolist() == [12, 12]
    none, none_cache, _ = run(model, tokens, cache, pos, logits_mode="none")
    assert none is None
    np.testing.assert_allclose(np.asarray(none_cache.k_LBSHD), np.asarray(eager_cache.k_LBSHD), atol=1e-6)
    # A uniform shift of positions leaves attention scores (and so logits) unchanged.
    shifted, _, _ = run(model, tokens, cache, pos + 17, logits_mode="all")
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(full), atol=1e-4)


@dataclasses.dataclass(frozen=True)
class ScaledDense:
    """Test backend: dense attention whose output is scaled by a per-layer state; echoes the state as aux."""

    def __call__(self, q, k, v, layer_kv, lengths_B, seq_lens_B, positions_BT, layer_state):
        out, layer_kv, _ = DENSE(q, k, v, layer_kv, lengths_B, seq_lens_B, positions_BT, None)
        return out * layer_state["scale"], layer_kv, {"scale": layer_state["scale"], "q_sum": jnp.sum(q)}


def test_backend_state_is_sliced_per_layer_and_aux_stacked(base):
    _, model, tokens, full = base
    cache = KVCache.init(BASE, B2, S16)
    scales = jnp.array([0.0, 2.0])
    logits, _, aux = run(model, tokens, cache, backend=ScaledDense(), state={"scale": scales})
    np.testing.assert_array_equal(np.asarray(aux["scale"]), np.asarray(scales))
    assert aux["q_sum"].shape == (BASE.n_layers,)
    assert not np.allclose(np.asarray(logits), np.asarray(full), atol=1e-3)
    same, _, _ = run(model, tokens, cache, backend=ScaledDense(), state={"scale": jnp.ones(2)})
    np.testing.assert_allclose(np.asarray(same), np.asarray(full), atol=1e-6)
    with pytest.raises(ValueError, match=r"backend_state leaf \['scale'\] has shape \(3,\)"):
        model(
            jnp.asarray(tokens, jnp.int32),
            jnp.zeros((B2, 12), jnp.int32),
            jnp.array([12, 12]),
            cache,
            ScaledDense(),
            {"scale": jnp.ones(3)},
        )
    _, _, captured = run(model, tokens, cache, backend=DenseAttention(capture_queries=True))
    assert captured["q"].shape == (BASE.n_layers, B2, 12, BASE.n_heads, BASE.head_dim)


def test_bf16_model_close_to_f32(base):
    sd, _, tokens, full = base
    model16 = load_state_dict(BASE, sd, jnp.bfloat16)
    assert model16.layers.mlp.up_FM[...].dtype == jnp.bfloat16
    b16, cache, _ = run(model16, tokens, KVCache.init(BASE, B2, S16, jnp.bfloat16))
    assert b16.dtype == jnp.float32 and cache.k_LBSHD.dtype == jnp.bfloat16
    err = np.abs(np.asarray(b16) - np.asarray(full)).max()
    assert err < 0.05 * np.abs(np.asarray(full)).max()


def test_scan_compiles_one_layer_body():
    """The traced program does not grow with depth (layers are scanned, not unrolled)."""

    def n_dots(n_layers):
        config = tiny_config(n_layers=n_layers)
        graphdef, state = nnx.split(init_model(config, 0))
        tokens = jnp.zeros((1, 4), jnp.int32)
        jaxpr = jax.make_jaxpr(apply, static_argnums=(0, 6))(
            graphdef, state, tokens, tokens, jnp.array([4]), KVCache.init(config, 1, 4), DENSE
        )
        return str(jaxpr).count("dot_general")

    assert n_dots(2) == n_dots(7)


# ------------------------------------------------------------------------------------------------------
# init and weights


def test_init_model_deterministic_and_round_trip():
    config = tiny_config(qkv_bias=True)
    a, b, c = init_model(config, 3), init_model(config, 3), init_model(config, 4)
    sa, sb, sc = to_state_dict(a), to_state_dict(b), to_state_dict(c)
    assert set(sa) == set(hf_param_shapes(config))
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name])
    w = sa["model.layers.1.mlp.up_proj.weight"]
    assert abs(w.std() - 0.02) < 2e-3 and abs(w.mean()) < 2e-3
    assert not np.array_equal(w, sa["model.layers.0.mlp.up_proj.weight"])  # layers differ
    assert not np.array_equal(w, sc["model.layers.1.mlp.up_proj.weight"])  # seeds differ
    np.testing.assert_array_equal(sa["model.norm.weight"], 1.0)
    np.testing.assert_array_equal(sa["model.layers.0.self_attn.q_proj.bias"], 0.0)
    key_model = init_model(config, jax.random.key(0), jnp.bfloat16)
    assert key_model.embed_VM[...].dtype == jnp.bfloat16
    # export -> import is the identity
    sd = random_state_dict(config, seed=17)
    back = to_state_dict(load_state_dict(config, sd))
    for name, arr in sd.items():
        np.testing.assert_array_equal(back[name], arr, err_msg=name)


def test_load_state_dict_strict_errors():
    config = tiny_config()
    sd = random_state_dict(config)
    missing = dict(sd)
    del missing["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_state_dict(config, missing)
    extra = dict(sd, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(48, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected .*o_proj\.bias"):
        load_state_dict(config, extra)
    tied = dict(sd)
    with pytest.raises(ValueError, match="tie_embeddings"):
        load_state_dict(config.replace(tie_embeddings=True), tied)
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((12, 48), np.float32)})
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(12, 48\), expected \(24, 48\)"):
        load_state_dict(config, bad)
    ints = dict(sd, **{"model.norm.weight": np.ones(48, np.int32)})
    with pytest.raises(TypeError, match="model.norm.weight"):
        load_state_dict(config, ints)
    with pytest.raises(ValueError, match="dtype"):
        load_state_dict(config, sd, jnp.int8)
    with pytest.raises(TypeError):
        load_state_dict("tiny", sd)


# ------------------------------------------------------------------------------------------------------
# input checks


def test_input_errors():
    config = tiny_config()
    model = init_model(config, 0)
    cache = KVCache.init(config, 2, 8)
    tokens = jnp.zeros((2, 3), jnp.int32)
    pos = jnp.zeros((2, 3), jnp.int32)
    lens = jnp.array([3, 3])
    with pytest.raises(ValueError, match="unknown model preset 'no-such-model'"):
        load_preset("no-such-model")
    with pytest.raises(TypeError, match="tokens_BT must have an integer dtype"):
        model(tokens.astype(jnp.float32), pos, lens, cache, DENSE)
    with pytest.raises(ValueError, match="beyond the model's max_context 64"):
        model(tokens, pos.at[1, 2].set(64), lens, cache, DENSE)
    # a padded slot may carry any position
    check_inputs(config, tokens, pos.at[1, 2].set(64), jnp.array([3, 2]), cache)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        model(tokens, pos.at[0, 0].set(-1), lens, cache, DENSE)
    with pytest.raises(ValueError, match=r"cache batch 3 != tokens batch 2"):
        model(tokens, pos, lens, KVCache.init(config, 3, 8), DENSE)
    with pytest.raises(ValueError, match="positions_BT shape"):
        model(tokens, pos[:, :2], lens, cache, DENSE)
    with pytest.raises(ValueError, match="seq_lens_B must be in"):
        model(tokens, pos, jnp.array([4, 3]), cache, DENSE)
    with pytest.raises(ValueError, match="token ids"):
        model(tokens.at[0, 0].set(config.vocab_size), pos, lens, cache, DENSE)
    with pytest.raises(ValueError, match="cache overflow"):
        model(tokens, pos, lens, dataclasses.replace(cache, lengths_B=jnp.array([6, 0])), DENSE)
    with pytest.raises(ValueError, match="does not fit"):
        model(jnp.zeros((2, 9), jnp.int32), jnp.zeros((2, 9), jnp.int32), lens, cache, DENSE)
    with pytest.raises(ValueError, match="logits_mode"):
        model(tokens, pos, lens, cache, DENSE, logits_mode="first")
    with pytest.raises(TypeError, match="KVCache"):
        model(tokens, pos, lens, (cache.k_LBSHD, cache.v_LBSHD), DENSE)
    with pytest.raises(ValueError, match="max_len"):
        KVCache.init(config, 2, 0)
    with pytest.raises(ValueError, match="parameter dtype"):
        init_model(config, 0, jnp.int32)
