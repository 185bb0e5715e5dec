"""Dense SmolLM2 throughput with the real weights: prefill tokens/s at a given prompt length, decode tokens/s.

Runs wherever jax runs (made for the CPU). Prints a table and writes JSON.

    python benchmarks/bench_cpu_model.py --lengths 4096 --new-tokens 32 --out benchmarks/results/cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import jax
import numpy as np

from models.pretrained import load_pretrained
from squeeze_jax.eval.tasks import haystack_text
from squeeze_jax.generate import SamplingConfig, generate


def measure(model, tokenizer, n_tokens: int, new_tokens: int, reps: int) -> dict:
    ids = tokenizer.encode(haystack_text())[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"the haystack has only {len(ids)} tokens, asked for {n_tokens}")
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_tokens=())
    generate(model, [ids], sampling=sampling)  # compile
    pre, dec = [], []
    for _ in range(reps):
        r = generate(model, [ids], sampling=sampling)
        pre.append(r.prefill_s)
        dec.append(r.decode_s / max(r.n_decode_steps, 1))
    p, d = float(np.median(pre)), float(np.median(dec))
    return {"prompt_tokens": n_tokens, "new_tokens": new_tokens, "prefill_s": p, "prefill_tok_s": n_tokens / p,
            "decode_s_per_token": d, "decode_tok_s": 1.0 / d, "reps": reps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    _, model, tokenizer = load_pretrained("smollm2-135m")
    rows = [measure(model, tokenizer, n, args.new_tokens, args.reps) for n in args.lengths]
    print(f"{'prompt':>8} {'prefill s':>10} {'prefill tok/s':>14} {'decode ms/tok':>14} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['prompt_tokens']:>8} {r['prefill_s']:>10.2f} {r['prefill_tok_s']:>14.1f} "
              f"{1e3 * r['decode_s_per_token']:>14.1f} {r['decode_tok_s']:>13.2f}")
    if args.out:
        meta = {"device": str(jax.devices()[0]), "cpu_count": __import__("os").cpu_count(),
                "machine": platform.machine(), "jax": jax.__version__}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
