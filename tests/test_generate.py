"""Generation: jit reuse across prompts of one bucket, sampling, stop tokens, and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.llama import init_model
from squeeze_jax import generate as gen
from squeeze_jax.generate import SamplingConfig, generate, length_bucket, sample_next

TINY = ModelConfig(name="tiny", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   ffn_dim=48, max_context=256, rope_theta=10000.0, eos_token_ids=(96,))


@pytest.fixture(scope="module")
def model():
    return init_model(TINY, 0, jnp.float32)


def _greedy_reference(model, prompt, n_new):
    """Token-by-token greedy decoding by recomputing the whole sequence (no cache reuse)."""
    from models.attention import DenseAttention
    from models.kv_cache import KVCache

    seq = list(prompt)
    for _ in range(n_new):
        T = len(seq)
        cache = KVCache.init(TINY, 1, T, jnp.float32)
        logits, _, _ = model(jnp.asarray([seq], jnp.int32), jnp.arange(T, dtype=jnp.int32)[None],
                             jnp.asarray([T], jnp.int32), cache, DenseAttention())
        seq.append(int(jnp.argmax(logits[0])))
    return seq[len(prompt):]


def test_greedy_matches_recompute_and_batches_are_independent(model):
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
    sp = SamplingConfig(max_new_tokens=6)
    res = generate(model, prompts, sampling=sp)
    for p, toks in zip(prompts, res.tokens):
        assert toks == _greedy_reference(model, p, 6)
    single = generate(model, [prompts[1]], sampling=sp)
    assert single.tokens[0] == res.tokens[1]


def test_same_bucket_does_not_retrace(model, monkeypatch):
    sp = SamplingConfig(max_new_tokens=3)
    generate(model, [[1, 2, 3, 4]], sampling=sp)
    calls = []
    orig = gen.apply

    def counting_apply(*a, **k):
        calls.append(1)  # runs only while tracing
        return orig(*a, **k)

    monkeypatch.setattr(gen, "apply", counting_apply)
    generate(model, [[9, 8, 7, 6, 5, 4, 3]], sampling=sp)  # same length bucket (64)
    assert calls == []
    generate(model, [[1] * 70], sampling=sp)  # next bucket: traced again
    assert calls != []


def test_decode_reuses_the_donated_cache(model):
    """The decode loop returns its cache, so the donated prefill cache is updated in place: jax warns when a donated
    buffer cannot be used. A fresh sampling config forces a new compile, where the warning would be raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, [[4, 5, 6]], sampling=SamplingConfig(max_new_tokens=5, stop_tokens=(95,)))
    assert not [w for w in caught if "donated buffers were not usable" in str(w.message)]


def test_stop_token_ends_generation(model):
    sp = SamplingConfig(max_new_tokens=8)
    free = generate(model, [[3, 4, 5]], sampling=sp).tokens[0]
    stop_tok = free[2]
    res = generate(model, [[3, 4, 5]], sampling=SamplingConfig(max_new_tokens=8, stop_tokens=(stop_tok,)))
    assert res.tokens[0] == free[: free.index(stop_tok)]


def test_sampling_is_seeded_and_top_p_restricts():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    draws = [int(sample_next(logits, jax.random.key(i), 1.0, 0.6)[0]) for i in range(200)]
    assert set(draws) <= {0, 1}  # top-p 0.6 keeps only the two most likely tokens
    assert len(set(draws)) == 2
    a = sample_next(logits, jax.random.key(3), 1.0, 1.0)
    b = sample_next(logits, jax.random.key(3), 1.0, 1.0)
    assert int(a[0]) == int(b[0])
    assert int(sample_next(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


def test_length_bucket():
    assert length_bucket(1) == 64
    assert length_bucket(65) == 128
    assert length_bucket(2048) == 2048
    assert length_bucket(2049) == 3072


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="model allows"):
        generate(model, [[1] * 250], sampling=SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], sampling=SamplingConfig())
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, [[]], sampling=SamplingConfig())
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, [1, 2, 3], sampling=SamplingConfig())
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["hello"], sampling=SamplingConfig())
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        generate(model, [np.asarray([1, 2, 500])], sampling=SamplingConfig(max_new_tokens=2))
