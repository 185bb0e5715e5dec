"""Logit parity with Hugging Face transformers' PyTorch Llama / Qwen2 on random small configs.

Needs torch and transformers (skipped otherwise). Weights are random with a larger spread than the default
init so that attention and RoPE differences show in the logits; comparison in float32, max |diff| < 1e-4.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.attention import DenseAttention  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.kv_cache import KVCache  # noqa: E402
from models.llama import apply, load_state_dict  # noqa: E402

T = 21
DENSE = DenseAttention()
_APPLY = jax.jit(apply, static_argnames=("graphdef", "backend", "logits_mode"))

COMMON = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {
    "llama_gqa_untied": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
        10000.0,
        None,
    ),
    "llama_gqa3_tied": (
        "llama",
        dict(
            hidden_size=96,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
        ),
        100000.0,
        None,
    ),
    "llama3_rope_scaling": (
        "llama",
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
        500000.0,
        LLAMA3_ROPE,
    ),
    "llama_linear_rope_mha": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
        10000.0,
        {"rope_type": "linear", "factor": 4.0},
    ),
    "qwen2_bias_tied": (
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
        1000000.0,
        None,
    ),
    "qwen2_bias_untied": (
        "qwen2",
        dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
        10000.0,
        None,
    ),
}


def build_hf(case: str):
    family, kwargs, theta, rope = CASES[case]
    if family == "llama":
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    else:
        config_cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    kwargs = dict(COMMON, **kwargs)
    params = inspect.signature(config_cls.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kwargs["rope_parameters"] = dict(rope or {"rope_type": "default"}, rope_theta=theta)
    else:
        kwargs.update(rope_theta=theta, rope_scaling=rope)
    hf_config = config_cls(**kwargs, attn_implementation="eager")
    torch.manual_seed(sum(map(ord, case)))
    model = model_cls(hf_config).to(torch.float32).eval()
    with torch.no_grad():  # spread the weights so that every component matters for the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_((0.5 if name.endswith("bias") else 0.12) * torch.randn_like(p))
    return hf_config, model


def to_ours(hf_config, model) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    config = ModelConfig.from_hf_config(hf_config.to_dict(), name="parity")
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the tied head is the embedding, not a separate tensor
    return config, sd


def our_logits(llama, tokens_BT, seq_lens_B, mode="all"):
    B, Tn = tokens_BT.shape
    graphdef, state = nnx.split(llama)
    positions = jnp.broadcast_to(jnp.arange(Tn, dtype=jnp.int32), (B, Tn))
    cache = KVCache.init(llama.config, B, Tn + 4)
    with jax.default_matmul_precision("highest"):
        out, cache, _ = _APPLY(
            graphdef,
            state,
            jnp.asarray(tokens_BT, jnp.int32),
            positions,
            jnp.asarray(seq_lens_B, jnp.int32),
            cache,
            DENSE,
            logits_mode=mode,
        )
    return np.asarray(out), cache


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    hf_config, hf_model = build_hf(case)
    config, sd = to_ours(hf_config, hf_model)
    family, kwargs, theta, rope = CASES[case]
    assert config.qkv_bias == (family == "qwen2")
    assert config.tie_embeddings == kwargs["tie_word_embeddings"]
    assert config.rope_theta == theta
    assert config.rope_scaling.rope_type == (rope or {"rope_type": "default"})["rope_type"]
    llama = load_state_dict(config, sd, jnp.float32)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, T))
    with torch.no_grad():
        want = hf_model(input_ids=torch.as_tensor(tokens)).logits.float().numpy()
    got, _ = our_logits(llama, tokens, [T, T])
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()

    # right-padded batch against Hugging Face with an attention mask: logits at each row's last token
    lens = np.array([T, 9])
    padded = tokens.copy()
    padded[1, 9:] = 0
    mask = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)
    with torch.no_grad():
        hf_pad = hf_model(input_ids=torch.as_tensor(padded), attention_mask=torch.as_tensor(mask)).logits
    hf_pad = hf_pad.float().numpy()
    last, cache = our_logits(llama, padded, lens, mode="last")
    want_last = hf_pad[np.arange(2), lens - 1]
    assert np.abs(last - want_last).max() < 1e-4, np.abs(last - want_last).max()
    assert np.asarray(cache.lengths_B).tolist() == lens.tolist()
