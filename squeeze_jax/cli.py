"""`squeeze-jax`: build a context index, ask it questions, describe it, evaluate, search MInference patterns.

Thin: parses arguments and calls the library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def _load_model(name: str):
    from models.pretrained import load_pretrained

    t = time.perf_counter()
    cfg, model, tok = load_pretrained(name)
    print(f"model {cfg.name}: {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, loaded in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    return cfg, model, tok


def _read_context(args) -> str:
    if args.text is None:
        raise SystemExit("error: give the fixed context with --text FILE")
    path = Path(args.text)
    if not path.is_file():
        raise SystemExit(f"error: context file {path} does not exist")
    text = path.read_text()
    if not text.strip():
        raise SystemExit(f"error: context file {path} is empty")
    return text


def cmd_index_build(args) -> int:
    from squeeze_jax.api import context_tokens
    from squeeze_jax.index import IndexConfig
    from squeeze_jax.index.build import build_index_report, describe_report
    from squeeze_jax.index.io import save_index

    config = IndexConfig.from_json(args.config) if args.config else IndexConfig.load("default")
    overrides = {k: v for k, v in (("centroid_fraction", args.centroids), ("hierarchical", args.hierarchical),
                                   ("seed", args.seed), ("iters", args.iters), ("metric", args.metric),
                                   ("kmeans_init", args.kmeans_init))
                 if v is not None}
    if overrides:
        config = IndexConfig.from_dict({**config.to_dict(), **overrides})
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists (use --overwrite)")
    _, model, tok = _load_model(args.model)
    ids = context_tokens(tok, _read_context(args))
    print(f"context: {len(ids)} tokens", file=sys.stderr)
    index, report = build_index_report(model, ids, config)
    save_index(index, out, overwrite=args.overwrite)
    print(describe_report(report))
    print(f"index written to {out}")
    return 0


def _check_ask_args(args):
    """Argument errors of `ask` that need neither the model nor the index arrays (raised before any work); returns
    the checked backend."""
    from squeeze_jax.attention.context import POLICIES
    from squeeze_jax.index.io import read_index_metadata

    if not args.question:
        raise SystemExit("error: give at least one --question")
    if any(not q.strip() for q in args.question):
        raise SystemExit("error: a --question is empty")
    if not 0.0 < args.budget <= 1.0:
        raise SystemExit(f"error: --budget must be in (0, 1], got {args.budget}")
    if args.policy not in POLICIES:
        raise SystemExit(f"error: unknown --policy {args.policy!r}; expected one of {POLICIES}")
    if args.max_new_tokens < 1:
        raise SystemExit(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for flag, n in (("--exact-tail", args.exact_tail), ("--exact-decode", args.exact_decode)):
        if n is not None and n < 0:
            raise SystemExit(f"error: {flag} must be >= 0, got {n}")
    try:
        backend = _ask_backend(args)
    except ValueError as ex:
        raise SystemExit(f"error: {ex} (--question-prior / --prior-pin)") from None
    read_index_metadata(args.index)  # not an index directory: IndexFormatError (a ValueError)
    return backend


def _ask_backend(args):
    """The ContextAttention `ask` runs, from the flags (defaults: the API's exact tail and decode steps)."""
    from squeeze_jax.api import EXACT_DECODE_STEPS, QUESTION_TAIL
    from squeeze_jax.attention.context import ContextAttention

    tail = QUESTION_TAIL if args.exact_tail is None else args.exact_tail
    steps = EXACT_DECODE_STEPS if args.exact_decode is None else args.exact_decode
    return ContextAttention(policy=args.policy, max_budget=args.budget, score=args.score, exact_tail=tail,
                            exact_decode=steps, question_prior=args.question_prior, prior_pin=args.prior_pin)


def cmd_ask(args) -> int:
    from squeeze_jax.api import ask, kept_fractions
    from squeeze_jax.index.io import load_index, model_fingerprint

    backend = _check_ask_args(args)  # the ContextAttention to run, checked before the model loads
    _, model, tok = _load_model(args.model)
    index = load_index(args.index, expected_model_fingerprint=model_fingerprint(model))
    t = time.perf_counter()
    tail, steps = backend.exact_tail, backend.exact_decode
    res = ask(model, tok, index, args.question, policy=args.policy, budget=args.budget,
              max_new_tokens=args.max_new_tokens, backend=backend)
    wall = time.perf_counter() - t
    for q, a in zip(args.question, res.texts):
        print(f"Q: {q}\nA: {a.strip()}\n")
    kept_s = " / ".join("n/a" if k is None else f"{k:.3f}" for k in kept_fractions(res))
    print(f"policy {args.policy}, budget {args.budget}, exact tail {tail}, exact decode steps {steps}, "
          f"kept fraction prefill / decode {kept_s}; "
          f"prefill {res.prefill_s:.2f} s, "
          f"decode {res.decode_ms_per_token:.1f} ms/token, total {wall:.2f} s (includes compilation)")
    return 0


def cmd_info(args) -> int:
    from squeeze_jax.index.io import read_index_metadata

    meta = read_index_metadata(args.index)
    print(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return 0


def cmd_eval(args) -> int:
    from squeeze_jax.eval.runner import eval_main

    return eval_main(args.rest)


def cmd_minference_search(args) -> int:
    from squeeze_jax.minference.cli import search_main

    return search_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squeeze-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    idx = sub.add_parser("index", help="context index commands").add_subparsers(dest="index_cmd", required=True)
    b = idx.add_parser("build", help="prefill a fixed context once and build its index")
    b.add_argument("--model", default=DEFAULT_MODEL, help="preset name, GGUF file or HF checkpoint directory")
    b.add_argument("--text", help="text file holding the fixed context")
    b.add_argument("--out", required=True, help="index directory to write (Orbax)")
    b.add_argument("--config", help="IndexConfig JSON (default: configs/index/default.json)")
    b.add_argument("--centroids", type=float, help="centroids as a fraction of the keys (default 0.05)")
    b.add_argument("--hierarchical", action="store_true", default=None, help="add a coarse centroid level")
    b.add_argument("--metric", choices=("cosine", "l2"))
    b.add_argument("--iters", type=int)
    b.add_argument("--seed", type=int, help="PRNG seed (K-means only with --kmeans-init sampled)")
    b.add_argument("--kmeans-init", choices=("systematic", "sampled"),
                   help="K-means seeding: systematic (default, no PRNG) or sampled k-means++")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(fn=cmd_index_build)

    a = sub.add_parser("ask", help="answer questions against a context index")
    a.add_argument("--index", required=True)
    a.add_argument("--question", "-q", action="append", default=[])
    a.add_argument("--model", default=DEFAULT_MODEL)
    a.add_argument("--policy", default="squeezed")
    a.add_argument("--budget", type=float, default=0.125, help="fraction of context keys attended, in (0, 1]")
    a.add_argument("--score", default="box", choices=("box", "mean", "radius"),
                   help="squeezed cluster score: key-box bound (default) or centroid mean")
    a.add_argument("--max-new-tokens", type=int, default=24)
    a.add_argument("--exact-tail", type=int, default=None,
                   help="last prompt tokens that attend the whole context exactly in prefill (default 32: a short "
                        "question whole; 0 = every token sparse)")
    a.add_argument("--exact-decode", type=int, default=None,
                   help="first decode steps that attend the whole context exactly (default: EXACT_DECODE_STEPS of "
                        "squeeze_jax.api)")
    a.add_argument("--question-prior", type=int, default=0,
                   help="last question tokens whose exact attention gives decode a block prior (<= --exact-tail; "
                        "0 = off)")
    a.add_argument("--prior-pin", type=float, default=0.0,
                   help="with --question-prior: share of each decode step's clustered blocks pinned to the "
                        "question's top blocks (0.25 kept 121/122 of dense's answers at 1/8 with --exact-decode 0 on "
                        "results/many_facts_margin)")
    a.set_defaults(fn=cmd_ask)

    i = sub.add_parser("info", help="describe a context index")
    i.add_argument("--index", required=True)
    i.set_defaults(fn=cmd_info)

    e = sub.add_parser("eval", help="evaluation harness (see --help of the runner)", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("minference-search", help="offline MInference per-head pattern search", add_help=False)
    m.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(fn=cmd_minference_search)
    return p


# sub-commands that parse their own arguments: everything after the command name is passed on verbatim
PASSTHROUGH = {"eval": cmd_eval, "minference-search": cmd_minference_search}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        args = argparse.Namespace(rest=argv[1:], fn=PASSTHROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
