"""`squeeze-jax minference-search`: offline kernel-aware pattern search on one long sample, written as the
model's config `configs/minference/<model>.json` (loaded by `MInferenceAttention.load(model)`).

The sample is a seeded multi-key needle document (a synthetic key-value retrieval text, as in the paper)
cut to `--length` tokens and run once through the model with dense attention to capture every layer's
post-RoPE q/k/v. Candidate budgets are derived from the target A-shape unless given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def default_candidates(target_sink: int, target_local: int, block: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Vertical-slash `(verticals, slashes)` and block-sparse key-block budgets around the target's key count
    (all at ref_len); candidates over the target's kernel cost are dropped by the search itself."""
    keys = target_sink + target_local
    vs = sorted({(max(30, round(keys * fv)), max(100, round(keys * fs)))
                 for fv, fs in ((1 / 16, 3 / 4), (1 / 8, 5 / 8), (1 / 4, 1 / 2), (1 / 8, 7 / 8), (1 / 2, 3 / 8))})
    bs = sorted({max(2, round(keys * f / block)) for f in (0.5, 0.75, 1.0)})
    return vs, bs


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"error: --vs-budgets must look like 64:512,128:768, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squeeze-jax minference-search", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model preset name (also names the config file)")
    p.add_argument("--length", type=int, default=4096, help="sample length in tokens")
    p.add_argument("--task", default="multi_needle", help="eval task generator of the sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-len", type=int, default=None, help="tokens the budgets refer to (default: max context)")
    p.add_argument("--target-sink", type=int, default=128, help="target A-shape sinks at ref_len")
    p.add_argument("--target-local", type=int, default=1024, help="target A-shape local window at ref_len")
    p.add_argument("--tolerance", type=float, default=0.1, help="allowed cost over the target (fraction)")
    p.add_argument("--vs-budgets", default="", help="verticals:slashes,... at ref_len (default: from target)")
    p.add_argument("--bs-budgets", default="", help="key blocks per query block,... (default: from target)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--out", default=None, help="config path (default configs/minference/<model>.json)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def search_main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, capture a sample, search every (layer, KV head), write the config. Returns 0."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.length < 256:
        raise SystemExit(f"error: --length must be >= 256 tokens, got {args.length}")
    if args.target_local < 1 or args.target_sink < 0 or args.tolerance < 0:
        raise SystemExit("error: need --target-local >= 1, --target-sink >= 0, --tolerance >= 0")
    from squeeze_jax.minference.search import _configs_root

    out = Path(args.out) if args.out else _configs_root() / "minference" / f"{args.model}.json"
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists (use --overwrite)")
    vs = _pairs(args.vs_budgets) if args.vs_budgets else None
    bs = [int(x) for x in args.bs_budgets.split(",") if x] if args.bs_budgets else None
    if vs is not None and any(len(x) != 2 for x in vs):
        raise SystemExit("error: --vs-budgets entries must be verticals:slashes")

    from models.pretrained import load_pretrained
    from squeeze_jax.eval.runner import make_context
    from squeeze_jax.minference.backend import pattern_counts
    from squeeze_jax.minference.capture import capture_qkv
    from squeeze_jax.minference.search import save_pattern_config, search_patterns

    t0 = time.perf_counter()
    cfg, model, tok = load_pretrained(args.model)
    if args.length > cfg.max_context:
        raise SystemExit(f"error: --length {args.length} exceeds the model's max context {cfg.max_context}")
    ref_len = args.ref_len or cfg.max_context
    d_vs, d_bs = default_candidates(args.target_sink, args.target_local, args.block)
    vs, bs = vs if vs is not None else d_vs, bs if bs is not None else d_bs
    ctx = make_context(args.task, args.length, args.seed, tok)
    print(f"sample: {args.task} seed {args.seed}, {len(ctx.ids)} tokens; ref_len {ref_len}; target A-shape "
          f"{args.target_sink} + {args.target_local}; candidates VS {vs}, BS {bs}", file=sys.stderr)
    q, k, v = capture_qkv(model, ctx.ids)
    print(f"captured q {tuple(q.shape)}, k/v {tuple(k.shape)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=cfg.n_layers, desc="layers", unit="layer", disable=args.no_progress, file=sys.stderr)

    def log(line: str) -> None:
        bar.update(1)
        bar.write(line, file=sys.stderr)

    config = search_patterns(q, k, v, model_name=args.model, ref_len=ref_len, target_sink=args.target_sink,
                             target_local=args.target_local, vs_budgets=vs, bs_budgets=bs, block=args.block,
                             cost_tolerance=args.tolerance, log=log)
    bar.close()
    config = type(config)(**{**config.__dict__, "target": {**config.target, "task": args.task, "seed": args.seed}})
    save_pattern_config(config, out)
    counts = pattern_counts(config)
    scores = [h.score for layer in config.layers for h in layer]
    costs = [h.cost for layer in config.layers for h in layer]
    print(f"patterns: {counts}; mean output error {sum(scores) / len(scores):.4f}, mean cost "
          f"{sum(costs) / len(costs):.3f} (target {config.target['cost']:.3f})")
    print(f"config written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(search_main())
