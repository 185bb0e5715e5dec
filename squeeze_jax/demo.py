"""`make demo`: index a filler document with a planted pass key once, then ask for the key.

Answers with Squeezed Attention (1/8 of the context keys), with dense attention over the same stored KV, and with
StreamingLLM at the same budget, and prints answers, kept fraction and timings. The index is cached on disk and
reused by the next run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

DOC_TOKENS = 3000
SEED = 5
BUDGET = 0.125
POLICIES = ("squeezed", "dense", "streaming")


def _cache_dir() -> Path:
    return Path(os.environ.get("SQUEEZE_JAX_CACHE_DIR", Path.home() / ".cache" / "squeeze_jax"))


def main() -> int:
    from models.pretrained import load_pretrained
    from squeeze_jax.api import EXACT_DECODE_STEPS, ask, context_tokens, index_context, kept_fractions
    from squeeze_jax.eval.tasks import passkey, score_answer
    from squeeze_jax.index import IndexConfig
    from squeeze_jax.index.io import (
        IndexFormatError,
        IndexMismatchError,
        load_index,
        model_fingerprint,
        save_index,
    )

    t0 = time.perf_counter()
    cfg, model, tok = load_pretrained("smollm2-135m")
    print(f"model {cfg.name} loaded in {time.perf_counter() - t0:.1f} s")
    task = passkey(DOC_TOKENS, 0.5, SEED, lambda s: len(tok.encode(s)))
    ids = context_tokens(tok, task.context)
    index_cfg = IndexConfig()
    # the cached index is reused only for the same tokens, weights and build settings
    key = hashlib.sha256(repr((ids, model_fingerprint(model), index_cfg.to_dict())).encode()).hexdigest()[:12]
    path = _cache_dir() / f"demo_index_{key}"
    index = None
    if path.exists():
        try:
            index = load_index(path, expected_model_fingerprint=model_fingerprint(model))
            print(f"reusing context index {path}")
        except (IndexFormatError, IndexMismatchError) as e:
            print(f"cached index unusable ({e}); rebuilding")
    if index is None:
        t = time.perf_counter()
        index = index_context(model, tok, task.context, index_cfg)
        print(f"built context index over {len(ids)} tokens in {time.perf_counter() - t:.1f} s")
        save_index(index, path, overwrite=True)
    questions = [q.text for q in task.questions]
    results = {}
    for policy in POLICIES:
        t = time.perf_counter()
        res = ask(model, tok, index, questions, policy=policy, budget=BUDGET, max_new_tokens=6)
        results[policy] = (res, time.perf_counter() - t)
    print()
    n_right = {p: 0 for p in results}
    for i, q in enumerate(task.questions):
        print(q.text.replace("\n", " | "))
        for policy, (res, _) in results.items():
            ok = score_answer(res.texts[i], q.answer)
            n_right[policy] += ok
            print(f"   {policy:>8s}: {res.texts[i].strip()!r:40s} {'right' if ok else 'WRONG (' + q.answer + ')'}")
    print()
    for policy, (res, wall) in results.items():
        kept_prefill, kept_decode = kept_fractions(res)
        kept_d = "n/a" if kept_decode is None else f"{kept_decode:.3f}"
        how = "" if policy == "dense" else f", the first {EXACT_DECODE_STEPS} exact"
        print(f"{policy:>8s}: {n_right[policy]}/{len(questions)} right, kept {kept_d} of the context keys per "
              f"decode step{how} ({kept_prefill:.3f} in prefill, question exact), "
              f"prefill {res.prefill_s:.2f} s, decode {res.decode_ms_per_token:.0f} ms/token "
              f"(CPU; {wall:.1f} s wall incl. compilation)")
    return 0 if n_right["squeezed"] >= n_right["dense"] else 1


if __name__ == "__main__":
    sys.exit(main())
