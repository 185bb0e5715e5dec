"""K-means seeding on the real model's keys: the sampled k-means++-lite under several PRNG seeds against the
systematic (PRNG-free) seeding, by final objective and Lloyd iterations.

The keys are SmolLM2-135M-Instruct's post-RoPE keys of many-facts documents (every layer and KV head, sinks
and window left out as the index build does), clustered into 5% centroids with the index's metric. Prints a
table and writes JSON.

    PYTHONPATH=. python3 benchmarks/kmeans_init.py --out benchmarks/results/kmeans_init_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np


def cluster_keys(k_PND, n_clusters: int, metric: str, init: str, seed: int, iters: int) -> dict:
    """One K-means run over every (layer, KV head): objective per problem, iterations, seconds."""
    from squeeze_jax.index.kmeans import kmeans

    t = time.perf_counter()
    res = kmeans(k_PND, n_clusters, key=jax.random.PRNGKey(seed), iters=iters, metric=metric, init=init)
    obj = np.asarray(jax.block_until_ready(res.objective_P), np.float64)
    return {"init": init, "seed": seed, "objective_P": obj.tolist(), "n_iters": int(res.n_iters),
            "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--docs", type=int, nargs="+", default=[0, 1, 2], help="many_facts document seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="K-means seeds of the sampled init")
    ap.add_argument("--window", type=int, default=28)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)

    from models.pretrained import load_pretrained
    from squeeze_jax.eval.runner import make_context
    from squeeze_jax.index.build import IndexConfig
    from squeeze_jax.index.capture import capture_context

    _, model, tokenizer = load_pretrained(args.model)
    icfg = IndexConfig.load("default")
    rows = []
    for doc in args.docs:
        ctx = make_context("many_facts", args.length, doc, tokenizer, n_questions=20, options={"n_facts": 20})
        cap = capture_context(model, np.asarray(ctx.ids, np.int32), chunk_size=icfg.prefill_chunk, window=args.window)
        L, H, S, D = cap.k_LHSD.shape
        k_PND = cap.k_LHSD.reshape(L * H, S, D)[:, icfg.n_sink: S - args.window]
        n_clusters = icfg.n_clusters(k_PND.shape[1])
        runs = [cluster_keys(k_PND, n_clusters, icfg.metric, "sampled", s, args.iters) for s in args.seeds]
        runs.append(cluster_keys(k_PND, n_clusters, icfg.metric, "systematic", 0, args.iters))
        best = np.min([r["objective_P"] for r in runs[:-1]], axis=0)
        for r in runs:
            obj = np.asarray(r["objective_P"])
            r.update(doc=doc, n_clusters=n_clusters, n_points=int(k_PND.shape[1]),
                     mean_objective=float(obj.mean()), vs_best_sampled=float(np.mean(obj / best)))
            rows.append(r)
            print(f"doc {doc}  {r['init']:>10s} seed {r['seed']}  objective {r['mean_objective']:9.3f}  "
                  f"vs best sampled {r['vs_best_sampled']:.4f}  iters {r['n_iters']:2d}  {r['seconds']:.1f} s",
                  flush=True)
    summary = {}
    for init in ("sampled", "systematic"):
        v = [r["vs_best_sampled"] for r in rows if r["init"] == init]
        summary[init] = {"mean_vs_best_sampled": float(np.mean(v)), "max_vs_best_sampled": float(np.max(v))}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "length": args.length, "rows": rows, "summary": summary},
                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
