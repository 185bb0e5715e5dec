"""The whole GPU benchmark suite in one command: results JSON, plots, and a regenerated BENCHMARKS.md.

    PYTHONPATH=. python3 benchmarks/run_all.py                 # on the GPU machine, < 8 minutes on an H100
    PYTHONPATH=. python3 benchmarks/run_all.py --smoke         # CPU: tiny shapes, interpret-mode kernels

Sections (each checks its outputs against a reference before timing, then times on the device):
  ceilings   measured read/copy bandwidth and bf16 matmul rate (the rooflines of every row)
  kernels    sparse decode / prefill kernels vs dense (cuDNN, XLA, PyTorch SDPA when importable)
  e2e        one layer's decode pipeline: lookup (flat / hierarchical) + fused selection + sparse attention +
             user-token attention + merge, at 1/8, 1/16 and 100% kept, vs dense over context + user keys
  lookup     centroid lookup alone, flat vs hierarchical
  model      per-token decode latency of a Llama-3.1-8B-shaped model (random weights, 4 layers): dense cuDNN /
             XLA vs squeezed at 128K; dense cuDNN vs XLA at 32K
  index      full-model context-index build at 128K (32 layers x 8 KV heads), time per stage, peak memory
  minference MInference causal prefill vs dense (subprocess of bench_minference.py)
Writes benchmarks/results/<gpu>.json, benchmarks/results/plots/*.png and BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench_e2e, timing  # noqa: E402
from benchmarks.report import write_benchmarks_md, write_plots  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BREAKDOWN_STAGES = ("lookup_flat", "lookup_logits", "lookup_hierarchical", "select_fused", "select_from_logits",
                    "select_unfused", "sparse_attention", "sparse_attention_with_user", "user_attention_merge")
# MInference in the one-command run: the 128K target length and the configurations that answer it (dense
# cuDNN / torch SDPA, A-shape, the paper's vertical-slash budget with its online index, block-sparse top-100,
# the model backend with mixed per-head patterns); benchmarks/bench_minference.py alone covers more lengths.
MINFERENCE_ONLY = "cudnn,a_shape_1k_4k,vs_est_1000_6096,bs_est_100,backend_mixed"
FULL = {
    "e2e_contexts": [32768, 131072, 524288], "e2e_shapes": ["gqa", "mha"],
    "keeps": {32768: [0.125], 131072: [0.125, 0.0625, 1.0], 524288: [0.125, 0.0625]},
    "hier_keeps": (0.125,), "hier_at": (131072,), "mha_contexts": (131072,),
    "box_keeps": {32768: (0.125,), 131072: (0.125, 0.0625), 524288: (0.125,)},
    "kernel_contexts": [131072], "tail_contexts": [32768, 131072, 524288],
    "model_context": 130048, "model_layers": 4, "model_short": 32768,
    "index_context": 131072, "index_layers": 32, "minference_lengths": "131072",
    "breakdown": {131072: BREAKDOWN_STAGES, 524288: ("lookup_flat", "lookup_hierarchical")},
}
SMOKE = {
    "e2e_contexts": [1024], "e2e_shapes": ["gqa"], "keeps": {1024: [0.125]}, "hier_keeps": (0.125,), "hier_at": (1024,),
    "box_keeps": {1024: (0.125,)}, "mha_contexts": (),
    "kernel_contexts": [], "tail_contexts": [1024],
    "model_context": 0, "model_layers": 2, "model_short": 0, "index_context": 0, "index_layers": 2,
    "minference_lengths": "", "breakdown": {1024: BREAKDOWN_STAGES},
}


def section(name: str, result: dict, fn, budget: timing.Budget, min_left: float, save=None) -> None:
    """Runs one section, recording its rows, wall time, or the error (a failing section does not stop the run);
    `save()` then writes the partial results (a run killed later keeps the finished sections)."""
    if budget.left() < min_left:
        result["sections"][name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
        return
    t0 = time.perf_counter()
    print(f"\n== {name} ==", flush=True)
    try:
        rows = fn()
        result["sections"][name] = {"rows": rows, "wall_s": time.perf_counter() - t0}
    except Exception as ex:  # noqa: BLE001
        result["sections"][name] = {"error": repr(ex)[:500], "trace": traceback.format_exc()[-2000:],
                                    "wall_s": time.perf_counter() - t0}
        print(f"{name} failed: {ex!r}", flush=True)
    if save is not None:
        save()


def breakdown_rows(stages_at: dict[int, tuple[str, ...]], read_bw: float) -> list[dict]:
    """The decode pipeline's stages timed alone (GQA, 8 KV heads x 4 query rows, 1/8 kept): flat and
    hierarchical lookup, fused vs unfused selection, sparse attention, user-token attention + merge, and the
    sparse attention with the user tokens in the same launch;
    `stages_at` maps a context length to the stages timed there."""
    rows = []
    for n, wanted in stages_at.items():
        ix, stages = _breakdown_stages(n)
        for name, (args, fn) in stages.items():
            if name not in wanted:
                continue
            # est sets the loop length; 4x unrolled (once unrolled, the subtracted loop overhead overlaps small kernels)
            t = timing.device_time(fn, args, est_s=5e-5, unroll=4, reps=3)
            rows.append({"section": "breakdown", "n_keys": n, "method": name, "us": t * 1e6, "C": ix["C"],
                         "Cc": ix["Cc"]})
            print(rows[-1], flush=True)
    return rows


def _breakdown_stages(n: int):
    from pallas_kernels.block_select import select_blocks, select_blocks_from_logits
    from pallas_kernels.centroid_lookup import centroid_logits, centroid_scores, hierarchical_scores
    from pallas_kernels.merge import dense_attention_lse, merge_attention
    from pallas_kernels.selection import block_scores, select_topk
    from pallas_kernels.sparse_decode import sparse_decode

    D, BK, NF = bench_e2e.D, bench_e2e.BLOCK_K, bench_e2e.N_FIXED
    ix = bench_e2e.synthetic_index(n, 8, seed=n)
    key = jax.random.PRNGKey(0)
    q = jax.random.normal(key, (1, 8, 4, D), jnp.bfloat16)
    k_u = jax.random.normal(jax.random.fold_in(key, 1), (1, 8, bench_e2e.USER, D), jnp.bfloat16)
    k_u_BUHD = k_u.transpose(0, 2, 1, 3)
    user_len = jnp.full((1,), bench_e2e.USER, jnp.int32)
    fine = (ix["centroids"], ix["log_sizes"], ix["radius"])
    ck = max(1, ix["Cc"] // 4)
    kb = max(NF // BK + 1, int(round(0.125 * ix["n_blocks"])))
    k_BH = jnp.full((1, 8), kb, jnp.int32)
    scores = centroid_scores(q, *fine)
    logits = centroid_logits(q, *fine)
    ids, cnt = select_blocks(scores, ix["cluster_size"], ix["lo"], ix["hi"], k_BH, n_blocks=ix["n_blocks"],
                             capacity=kb, fixed_blocks=NF // BK)
    lay = dict(n_fixed=NF, fixed_pad=NF, n_clustered=n - NF)
    o_ctx, lse_ctx = sparse_decode(q, ix["keys"], ix["values"], ids, cnt, **lay)
    stages = {
        "lookup_flat": ((q,), lambda i, q: centroid_scores(q, *fine)),
        "lookup_hierarchical": ((q,), lambda i, q: hierarchical_scores(
            q, ix["coarse_centroids"], ix["coarse_log_sizes"], ix["coarse_first"], ix["coarse_count"], *fine,
            coarse_keep=ck, max_fine_per_coarse=ix["max_fine"])),
        "select_fused": ((scores,), lambda i, s: select_blocks(
            s, ix["cluster_size"], ix["lo"], ix["hi"], k_BH, n_blocks=ix["n_blocks"], capacity=kb,
            fixed_blocks=NF // BK)),
        "lookup_logits": ((q,), lambda i, q: centroid_logits(q, *fine)),
        "select_from_logits": ((logits,), lambda i, lg: select_blocks_from_logits(
            lg, ix["cluster_size"], ix["lo"], ix["hi"], k_BH, n_blocks=ix["n_blocks"], capacity=kb,
            fixed_blocks=NF // BK)),
        "select_unfused": ((scores,), lambda i, s: select_topk(block_scores(
            s, ix["cluster_start"], ix["cluster_size"], n_blocks=ix["n_blocks"], block_k=BK,
            fixed_blocks=NF // BK), k_BH, kb)),
        "sparse_attention": ((q,), lambda i, q: sparse_decode(q, ix["keys"], ix["values"], ids, cnt, **lay)),
        "sparse_attention_with_user": ((q,), lambda i, q: sparse_decode(
            q, ix["keys"], ix["values"], ids, cnt, k_user_BUHD=k_u_BUHD, v_user_BUHD=k_u_BUHD, user_len_B=user_len,
            **lay)),
        "user_attention_merge": ((q,), lambda i, q: merge_attention(
            o_ctx[:, :, None].astype(jnp.float32), lse_ctx[:, :, None],
            *[x.astype(jnp.float32) for x in dense_attention_lse(q[:, :, None], k_u, k_u)])),
    }
    return ix, stages


def kernel_rows(contexts: list[int], copy_bw: float, read_bw: float, budget: timing.Budget,
                tail_contexts: list[int] = ()) -> list[dict]:
    """Sparse prefill kernel (1K user tokens, 1/8 kept) vs dense (cuDNN, XLA, torch SDPA) at each context; the
    exact-question pass (32 queries over every context key) at `tail_contexts`."""
    from benchmarks import bench_sparse_attention as bsa

    torch_ok = _torch_cuda()
    rows: list[dict] = []
    rng = __import__("numpy").random.default_rng(0)
    for n in contexts:
        if budget.left() < 40:
            continue
        shape = "gqa"  # decode kernels are inside the e2e pipeline rows; here the 1K-token prefill
        q, k, v = bsa.make_inputs(shape, n, bsa.T_PREFILL)
        best_p = bsa.prefill_dense(rows, shape, n, q, k, v, torch_ok)
        bsa.prefill_case(rows, shape, n, 1 / 8, [{"block_q": 64}], copy_bw, rng, q, k, v, best_p)
        del q, k, v
    for n in tail_contexts:
        if budget.left() < 20:
            continue
        q, k, v = bsa.make_inputs("gqa", n, 64)
        bsa.exact_tail_case(rows, "gqa", n, q, k, v, read_bw)
        del q, k, v
    for r in rows:
        r["section"] = "kernels"
    return rows


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def index_rows(context: int, layers: int, hierarchical: bool) -> list[dict]:
    from benchmarks import bench_index_build

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--context", str(context), "--layers", str(layers), "--out", f"{tmp}/ix.json"]
        if hierarchical:
            argv.append("--hierarchical")
        res = bench_index_build.main(argv)
    return [{"section": "index", "hierarchical": hierarchical, **_flat(res)}]


def _flat(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, (list, tuple)) or len(v) < 64}


def minference_rows(lengths: str, budget_s: float, smoke: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mi.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_minference.py"), "--out", str(out),
               "--budget-s", str(budget_s), "--no-tune"]
        cmd += ["--smoke"] if smoke else ["--lengths", lengths, "--only", MINFERENCE_ONLY, "--xla-max", "0"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget_s + 120)
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_minference exited {proc.returncode}: {proc.stderr[-800:]}")
        data = json.loads(out.read_text())
    return [{"section": "minference", "result": data}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret-mode kernels (CPU CI)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>.json)")
    ap.add_argument("--md", type=Path, default=None, help="markdown report (default BENCHMARKS.md; smoke: none)")
    ap.add_argument("--time-budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument("--sections", default="ceilings,e2e,breakdown,model,kernels,index,minference")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.smoke:
        timing.set_smoke(True)
    budget = timing.Budget(args.time_budget)
    wanted = set(args.sections.split(","))
    slug = timing.device_slug()
    out = args.out or ROOT / "benchmarks" / "results" / f"{slug}{'_smoke' if args.smoke else ''}.json"
    result: dict = {"meta": {**timing.device_info(), "command": " ".join(["benchmarks/run_all.py"] + (argv or
                                                                                                   sys.argv[1:])),
                             "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
                    "sections": {}}
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["meta"]["wall_s"] = args.time_budget - budget.left()
        out.write_text(json.dumps(result, indent=1, default=str))

    copy_bw, read_bw = timing.copy_and_read_bandwidth(0.0625 if args.smoke else 1.0)
    result["meta"].update(copy_bw_Bps=copy_bw, read_bw_Bps=read_bw)
    if "ceilings" in wanted:
        result["meta"]["matmul_flops"] = timing.matmul_rate(256 if args.smoke else 8192)
    print(f"{result['meta']}", flush=True)
    if "e2e" in wanted:
        def e2e():
            rows = []
            for n in cfg["e2e_contexts"]:
                for shape in cfg["e2e_shapes"]:
                    if shape == "mha" and n not in cfg["mha_contexts"]:
                        continue  # MHA only where it answers a question GQA does not (compile time dominates)
                    rows += bench_e2e.attention_rows(n, shape, cfg["keeps"][n], read_bw, budget,
                                                     hier_keeps=cfg["hier_keeps"] if n in cfg["hier_at"] else (),
                                                     box_keeps=cfg["box_keeps"].get(n, ()))
            return rows
        section("e2e", result, e2e, budget, 20, save)
    if "breakdown" in wanted:
        section("breakdown", result, lambda: breakdown_rows(cfg["breakdown"], read_bw), budget, 20, save)
    if "model" in wanted and cfg["model_context"]:
        def model():
            rows = bench_e2e.model_rows(cfg["model_context"], cfg["model_layers"], 0.125, 32, budget)
            rows += bench_e2e.model_rows(cfg["model_short"], 2, 0.125, 32, budget, squeezed=False)
            return rows
        section("model", result, model, budget, 90, save)
    if "kernels" in wanted and (cfg["kernel_contexts"] or cfg["tail_contexts"]):
        section("kernels", result, lambda: kernel_rows(cfg["kernel_contexts"], copy_bw, read_bw, budget,
                                                       cfg["tail_contexts"]), budget, 60, save)
    if "index" in wanted and cfg["index_context"]:
        section("index", result, lambda: index_rows(cfg["index_context"], cfg["index_layers"], False), budget, 60, save)
    if "minference" in wanted and (cfg["minference_lengths"] or args.smoke):
        section("minference", result,
                lambda: minference_rows(cfg["minference_lengths"], max(30.0, budget.left() - 20), args.smoke),
                budget, 45, save)
    save()
    print(f"wrote {out}")
    if not args.smoke or args.md:
        try:
            plots = write_plots(result, out.parent / "plots", slug)
        except ImportError as ex:  # matplotlib missing: tables only (re-render later with benchmarks/report.py)
            print(f"no plots: {ex}")
            plots = []
        md = args.md or ROOT / "BENCHMARKS.md"
        write_benchmarks_md(result, md, out, plots)
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
