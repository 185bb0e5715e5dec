"""High-level API: index a fixed context once, then ask it many questions.

    cfg, model, tok = load_pretrained("smollm2-135m")
    index = index_context(model, tok, document_text)
    result = ask(model, tok, index, ["Who ...?", "When ...?"], budget=1/8)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from squeeze_jax.attention.context import POLICIES, ContextAttention, ContextState
from squeeze_jax.generate import GenerationResult, SamplingConfig, generate
from squeeze_jax.index import IndexConfig, build_index


def prompt_parts(context: str, question: str) -> tuple[str, str]:
    """Split one prompt into its fixed part (the context) and its user part (the question).

    Plain completion format `context + " " + question`, the question ending with an answer cue
    ("... The pass key is"): small instruction-tuned models follow it more reliably than a chat turn. The space
    belongs to the user part so that both parts tokenize exactly as the joined prompt does.
    """
    return context.rstrip(), " " + question.strip()


def context_tokens(tokenizer, context: str) -> list[int]:
    """Token ids of the fixed part of the prompt for `context`."""
    if not context.strip():
        raise ValueError("the fixed context is empty")
    return tokenizer.encode(prompt_parts(context, "")[0])


def question_tokens(tokenizer, question: str) -> list[int]:
    """Token ids of the user part of the prompt for `question` (after the fixed context)."""
    if not question.strip():
        raise ValueError("the question is empty")
    return tokenizer.encode(prompt_parts("", question)[1])


# Prompt tokens that attend the fixed context exactly in `ask` (a short question with its chat template).
QUESTION_TAIL = 32
# Decode steps that attend the fixed context exactly in `ask` (the answer's first tokens; one dense step each).
EXACT_DECODE_STEPS = 2


def index_context(model, tokenizer, context: str, config: IndexConfig | None = None, *, progress: bool = True):
    """Prefill the fixed context once and build its context index."""
    ids = context_tokens(tokenizer, context)
    del progress  # the build shows its own progress bar on long K-means runs
    return build_index(model, np.asarray(ids, np.int32), config or IndexConfig())


def ask(
    model,
    tokenizer,
    index,
    questions: Sequence[str],
    *,
    policy: str = "squeezed",
    budget: float | Sequence[float] = 0.125,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    exact_tail: int = QUESTION_TAIL,
    exact_decode: int = EXACT_DECODE_STEPS,
    backend: ContextAttention | None = None,
) -> GenerationResult:
    """Answer a batch of questions against one context index.

    `budget` is the fraction of the fixed context's keys each generated token attends (sinks and the recent
    window included), one value or one per question. `policy="dense"` attends every context key (the exact
    baseline). The last `exact_tail` prompt tokens (a short question whole) attend the context exactly in prefill:
    memory-bound, that costs about one dense decode step per question and keeps the answer's first tokens
    right (results/many_facts_tail). The first `exact_decode` decode steps attend it exactly too (one dense
    decode step each). `backend` overrides policy, exact_tail and exact_decode.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings")
    questions = list(questions)
    if not questions:
        raise ValueError("no questions given")
    if any(not isinstance(q, str) for q in questions):
        raise TypeError("every question must be a string")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    budgets = [float(budget)] * len(questions) if np.isscalar(budget) else [float(b) for b in budget]
    if len(budgets) != len(questions):
        raise ValueError(f"got {len(budgets)} budgets for {len(questions)} questions")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {b}")
    # the backend checks exact_tail / exact_decode; built before any work
    backend = backend or ContextAttention(policy=policy, max_budget=max(budgets), exact_tail=exact_tail,
                                          exact_decode=exact_decode)
    check_index_matches(model, index)
    prompts = [question_tokens(tokenizer, q) for q in questions]
    n = len(prompts)
    B = 1
    while B < n:
        B *= 2
    budget_B = jnp.asarray(budgets + [budgets[0]] * (B - n), jnp.float32)
    # every backend-state leaf carries the layer axis the model scans over
    state = ContextState.for_backend(index, jnp.broadcast_to(budget_B, (index.n_layers, B)), backend)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_tokens=tuple(model.config.eos_token_ids) + _im_end(tokenizer))
    return generate(model, prompts, tokenizer=tokenizer, sampling=sampling, backend=backend,
                    backend_state=state, position_offset=index.context_len, seed=seed)


def kept_fractions(result: GenerationResult) -> tuple[float | None, float | None]:
    """Mean fraction of the context's keys attended per prompt token in prefill (padding excluded, the exact
    question tokens counting every key) and per decode step (None where not run)."""
    mean = lambda part: None if part not in result.stats else float(np.mean(result.stats[part]["kept_fraction"]))
    return mean("prefill"), mean("decode_mean")


def check_index_matches(model, index) -> None:
    """Raise before any work if `index` was built for another model (architecture or weights)."""
    from squeeze_jax.index.io import model_fingerprint

    have = index.info.model_fingerprint
    want = model_fingerprint(model)
    if have != want:
        raise ValueError(f"this context index was built for another model (index fingerprint {have!r}, "
                         f"model {model.config.name!r} has {want!r})")
    if index.n_layers != model.config.n_layers or index.n_kv_heads != model.config.n_kv_heads:
        raise ValueError(f"index shape (layers {index.n_layers}, KV heads {index.n_kv_heads}) does not match "
                         f"the model ({model.config.n_layers}, {model.config.n_kv_heads})")


def _im_end(tokenizer) -> tuple[int, ...]:
    try:
        ids = tokenizer.encode("<|im_end|>")
    except Exception:  # noqa: BLE001 - tokenizers without that special token
        return ()
    return tuple(ids) if len(ids) == 1 else ()
