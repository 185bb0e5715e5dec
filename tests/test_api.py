"""End to end on a tiny random model: index a context, ask questions, compare with dense, save/load, errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.llama import init_model
from squeeze_jax.api import ask, context_tokens, index_context, kept_fractions, prompt_parts
from squeeze_jax.generate import SamplingConfig, generate
from squeeze_jax.index import IndexConfig
from squeeze_jax.index.io import IndexFormatError, load_index, save_index

TINY = ModelConfig(name="tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_dim=48, max_context=1024, rope_theta=10000.0, eos_token_ids=(127,))
INDEX_CFG = IndexConfig(centroid_fraction=0.1, iters=5, n_sink=4, window=28, budgets=(0.5,), seed=0)
CONTEXT = " ".join(f"word{i % 37} is number {i}." for i in range(40))


class CharTokenizer:
    """Bytes as tokens (ids < 127), enough to drive the text API on a random model."""

    vocab_size = 128

    def encode(self, text: str) -> list[int]:
        return [b % 127 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


@pytest.fixture(scope="module")
def setup():
    model = init_model(TINY, 0, jnp.float32)
    tok = CharTokenizer()
    index = index_context(model, tok, CONTEXT, INDEX_CFG)
    return model, tok, index


def test_dense_over_index_equals_plain_generation(setup):
    model, tok, index = setup
    questions = ["What is word3?", "Which word is 17?"]
    res = ask(model, tok, index, questions, policy="dense", max_new_tokens=5)
    for q, toks in zip(questions, res.tokens):
        head, tail = prompt_parts(CONTEXT, q)
        full = generate(model, [tok.encode(head) + tok.encode(tail)], sampling=SamplingConfig(max_new_tokens=5))
        assert toks == full.tokens[0]


def test_full_budget_squeezed_equals_dense(setup):
    model, tok, index = setup
    qs = ["What is word3?", "Tell me about word5."]
    dense = ask(model, tok, index, qs, policy="dense", max_new_tokens=5)
    full = ask(model, tok, index, qs, policy="squeezed", budget=1.0, max_new_tokens=5)
    assert full.tokens == dense.tokens
    assert float(full.stats["prefill"]["kept_fraction"].mean()) >= 0.99


def test_sparse_budget_keeps_the_stated_fraction(setup):
    model, tok, index = setup
    res = ask(model, tok, index, ["What is word3?"], policy="squeezed", budget=0.5, max_new_tokens=3, exact_tail=0)
    kept = res.stats["prefill"]["kept_fraction"]
    assert kept.shape == (TINY.n_layers,)
    # calibrated allocation (the default) moves keys between layers; the mean keeps the budget
    assert float(kept.mean()) <= 0.5 + 16 / index.context_len and float(kept.mean()) > 0.3
    assert np.all(kept > 0) and np.all(kept <= 1.0)
    # by default the question attends the context exactly in prefill; decode steps keep the budget
    prefill, decode = kept_fractions(ask(model, tok, index, ["What is word3?"], budget=0.5, max_new_tokens=3,
                                        exact_decode=0))
    assert prefill > float(kept.mean()) + 0.1 and prefill <= 1.0
    assert 0.3 < decode <= 0.5 + 16 / index.context_len
    with pytest.raises(ValueError, match="exact_tail"):
        ask(model, tok, index, ["What is word3?"], exact_tail=-1)


def test_exact_decode_steps_equal_dense_and_count_as_full(setup):
    """With the question exact in prefill and every decode step exact, a tiny budget answers as dense does; the
    exact steps show in the decode kept fraction."""
    model, tok, index = setup
    qs = ["What is word3?", "Which word is 17?"]
    dense = ask(model, tok, index, qs, policy="dense", max_new_tokens=6)
    exact = ask(model, tok, index, qs, budget=0.25, max_new_tokens=6, exact_tail=64, exact_decode=6)
    assert exact.tokens == dense.tokens
    _, sparse_decode_kept = kept_fractions(ask(model, tok, index, qs, budget=0.25, max_new_tokens=6, exact_decode=0))
    _, two_exact_kept = kept_fractions(ask(model, tok, index, qs, budget=0.25, max_new_tokens=6, exact_decode=2))
    assert sparse_decode_kept < 0.3 and two_exact_kept > sparse_decode_kept + 0.1
    with pytest.raises(ValueError, match="exact_decode"):
        ask(model, tok, index, qs, exact_decode=-1)


def test_saved_index_gives_identical_answers_in_new_process(setup, tmp_path):
    model, tok, index = setup
    path = tmp_path / "idx"
    save_index(index, path)
    q = "What is word3?"
    here = ask(model, tok, load_index(path), [q], max_new_tokens=5).tokens[0]
    script = textwrap.dedent(f"""
        import jax.numpy as jnp
        from models.llama import init_model
        from squeeze_jax.api import ask
        from squeeze_jax.index.io import load_index
        from tests.test_api import TINY, CharTokenizer
        model = init_model(TINY, 0, jnp.float32)
        print(ask(model, CharTokenizer(), load_index({str(path)!r}), [{q!r}], max_new_tokens=5).tokens[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, cwd=str(_repo_root()))
    assert out.stdout.strip().splitlines()[-1] == str(here)


def test_bad_inputs(setup, tmp_path):
    model, tok, index = setup
    other = init_model(TINY, 1, jnp.float32)  # same shapes, other weights
    with pytest.raises(ValueError, match="another model"):
        ask(other, tok, index, ["What is word3?"])
    with pytest.raises(ValueError, match="empty"):
        ask(model, tok, index, ["   "])
    for b in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="budget"):
            ask(model, tok, index, ["What is word3?"], budget=b)
    with pytest.raises(ValueError, match="model allows"):
        ask(model, tok, index, ["x" * 800], max_new_tokens=4)
    with pytest.raises(IndexFormatError):
        load_index(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        context_tokens(tok, "  ")
    with pytest.raises(TypeError):
        ask(model, tok, index, "a single string")


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_bad_question_lists_and_other_architecture(setup):
    model, tok, index = setup
    with pytest.raises(ValueError, match="no questions"):
        ask(model, tok, index, [])
    with pytest.raises(TypeError, match="string"):
        ask(model, tok, index, ["What is word3?", None])
    deeper = init_model(dataclasses.replace(TINY, n_layers=3), 0, jnp.float32)
    with pytest.raises(ValueError, match="another model"):
        ask(deeper, tok, index, ["What is word3?"])


def test_cli_ask_rejects_an_index_of_another_model(setup, tmp_path, capsys, monkeypatch):
    from squeeze_jax.cli import main

    _, tok, index = setup
    save_index(index, tmp_path / "idx")
    other = init_model(TINY, 1, jnp.float32)  # same shapes, other weights
    monkeypatch.setattr("squeeze_jax.cli._load_model", lambda name: (TINY, other, tok))
    assert main(["ask", "--index", str(tmp_path / "idx"), "-q", "What is word3?"]) == 2
    assert "built for model" in capsys.readouterr().err
