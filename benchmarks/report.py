"""Plots and the BENCHMARKS.md tables from a `run_all.py` results JSON (also usable on a saved file).

    python benchmarks/report.py benchmarks/results/h100.json --rerun benchmarks/results/h100_rerun.json
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rows(result: dict, name: str) -> list[dict]:
    return result.get("sections", {}).get(name, {}).get("rows", []) or []


def _f(x, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def write_plots(result: dict, out_dir: Path, slug: str) -> list[Path]:
    """Latency vs context length per method (decode pipeline) and speedup vs kept fraction. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(result, "e2e") if "us" in r]
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for shape in sorted({r["shape"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        sub = [r for r in rows if r["shape"] == shape]
        for label in sorted({(r["method"], r.get("keep")) for r in sub}, key=str):
            pts = sorted((r["n_keys"], r["us"]) for r in sub if (r["method"], r.get("keep")) == label)
            name = label[0] if label[0].startswith("dense") else f"{label[0]} keep={label[1]:g}"
            ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="fixed context (K keys)", ylabel="us per decode token per layer",
               title=f"decode attention, {shape}, {result['meta'].get('device', '')}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{slug}_decode_latency_{shape}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (shape, n, method) in sorted({(r["shape"], r["n_keys"], r["method"]) for r in rows
                                      if r["method"].startswith("squeezed")}):
        pts = sorted((r["keep"], r.get("speedup_vs_best_dense")) for r in rows
                     if (r["shape"], r["n_keys"], r["method"]) == (shape, n, method) and r.get("speedup_vs_best_dense"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} {shape} {n // 1024}K")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="kept fraction of the context", ylabel="speedup vs best dense",
           title="decode pipeline speedup")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / f"{slug}_speedup_vs_kept.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files


def _e2e_table(rows: list[dict]) -> list[str]:
    out = ["| shape | context | method | kept | µs / token / layer | vs best dense | bytes read roofline |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "us" not in r:
            continue
        out.append(f"| {r['shape']} | {r['n_keys'] // 1024}K | {r['method']} | {_f(r.get('keep'), 'g')} | "
                   f"{r['us']:.1f} | {_f(r.get('speedup_vs_best_dense'), '.2f')} | "
                   f"{_f(r.get('read_roofline'), '.2f')} |")
    return out


def _kernel_table(rows: list[dict]) -> list[str]:
    out = ["| op | shape | context | kept | impl | µs | vs best dense | roofline |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "s" not in r:
            continue
        roof = r.get("read_roofline_frac", r.get("roofline_frac"))
        out.append(f"| {r.get('op')} | {r.get('shape')} | {r.get('n_keys', 0) // 1024}K | {r.get('keep')} | "
                   f"{r.get('impl')} | {r['s'] * 1e6:.1f} | {_f(r.get('speedup_vs_best_dense'), '.2f')} | "
                   f"{_f(roof, '.2f')} |")
    return out


def _model_table(rows: list[dict]) -> list[str]:
    out = ["| model | context | method | ms / token | vs best dense | prefill s | index build s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms_per_token" not in r:
            continue
        out.append(f"| {r['model']} | {r['n_keys']} | {r['method']} | {r['ms_per_token']:.2f} | "
                   f"{_f(r.get('speedup_vs_best_dense'), '.2f')} | {_f(r.get('prefill_s'), '.2f')} | "
                   f"{_f(r.get('index_build_s'), '.1f')} |")
    return out


def ratio_rows(result: dict) -> dict[tuple, float]:
    """Every speedup-vs-best-dense ratio of a results file, keyed by (section, case...)."""
    out: dict[tuple, float] = {}
    for sec in ("e2e", "model", "kernels"):
        for r in _rows(result, sec):
            if r.get("speedup_vs_best_dense"):
                out[(sec, r.get("shape") or r.get("model"), r.get("n_keys"), r.get("method") or r.get("impl"),
                     r.get("keep"))] = r["speedup_vs_best_dense"]
    for r in _rows(result, "minference"):
        for length, d in r.get("result", {}).get("lengths", {}).items():
            for s in d.get("sparse", []):
                if s.get("speedup"):
                    out[("minference", "gqa", int(length), s["name"], None)] = s["speedup"]
    return out


def _repro_table(earlier: dict, result: dict) -> list[str]:
    a, b = ratio_rows(earlier), ratio_rows(result)
    out = ["| section | case | context | method | kept | this run | re-run | change |",
           "|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for k, x in a.items():
        if k in b:
            y = b[k]
            worst = max(worst, abs(y / x - 1))
            n = f"{k[2] // 1024}K" if k[2] else ""
            out.append(f"| {k[0]} | {k[1]} | {n} | {k[3]} | {_f(k[4], 'g') if k[4] is not None else ''} | {x:.2f} | "
                       f"{y:.2f} | {100 * (y / x - 1):+.1f}% |")
    return [f"Largest change of a ratio: {100 * worst:.1f}% over {len(out) - 2} ratios.", "", *out]


def _minference_table(res: dict) -> list[str]:
    out = ["| length | config | pattern budget | tile density | index ms | kernel ms | total ms | vs best dense | "
           "max rel err |", "|---|---|---|---|---|---|---|---|---|"]
    for length, d in res.get("lengths", {}).items():
        best = d.get("best_dense") or {}
        for name, x in d.get("dense", {}).items():
            if "ms" in x:
                ratio = best.get("ms") and best["ms"] / x["ms"]
                out.append(f"| {int(length) // 1024}K | dense {name} | – | 1 | – | – | {x['ms']:.2f} | "
                           f"{_f(ratio, '.2f')} | {_f(x.get('max_rel_err'), '.1e')} |")
        for s in d.get("sparse", []):
            if "total_ms" not in s:
                out.append(f"| {int(length) // 1024}K | {s['name']} | {s.get('error') or s.get('skipped')} |"
                           " | | | | | |")
                continue
            out.append(f"| {int(length) // 1024}K | {s['name']} | {s.get('budget', '')} | {s['density']:.3f} | "
                       f"{_f(s.get('index_ms'), '.2f')} | {_f(s.get('kernel_ms'), '.2f')} | {s['total_ms']:.2f} | "
                       f"{_f(s.get('speedup'), '.2f')} | {s['max_rel_err']:.1e} |")
    return out


def _index_table(rows: list[dict]) -> list[str]:
    out = ["| context | layers x KV heads x d | clusters / head | total s | K-means s | layout s | calibration s | "
           "peak GiB | index GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sh, st = r.get("shapes", {}), r.get("stage_seconds", {})
        out.append(f"| {sh.get('context', 0) // 1024}K | {sh.get('layers')} x {sh.get('kv_heads')} x "
                   f"{sh.get('head_dim')} | {r.get('n_clusters')} | {_f(r.get('total_s'))} | {_f(st.get('kmeans'))} | "
                   f"{_f(st.get('layout'))} | {_f(st.get('calibration'))} | "
                   f"{_f(r.get('peak_bytes_in_use') and r['peak_bytes_in_use'] / 2**30)} | "
                   f"{_f(r.get('index_bytes') and r['index_bytes'] / 2**30)} |")
    return out


def _breakdown_table(rows: list[dict]) -> list[str]:
    out = ["| context | stage | µs |", "|---|---|---|"]
    for r in rows:
        out.append(f"| {r['n_keys'] // 1024}K | {r['method']} | {r['us']:.1f} |")
    return out


def write_benchmarks_md(result: dict, path: Path, json_path: Path, plots: list[Path], rerun: dict | None = None,
                        rerun_path: Path | None = None) -> None:
    """Regenerates the benchmark report from one results file (and a re-run of it for the reproducibility table)."""
    meta = result["meta"]
    rel = json_path.resolve().relative_to(ROOT) if json_path.resolve().is_relative_to(ROOT) else json_path
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `PYTHONPATH=. python3 {meta.get('command', 'benchmarks/run_all.py')}` on "
        f"{meta.get('device')} (jax {meta.get('jax')}), {meta.get('started', '')}, whole run "
        f"{meta.get('wall_s', 0):.0f} s; raw results: `{rel}`.",
        f"Measured ceilings in the same run: read {meta.get('read_bw_Bps', 0) / 1e12:.2f} TB/s, copy "
        f"{meta.get('copy_bw_Bps', 0) / 1e12:.2f} TB/s, bf16 matmul {meta.get('matmul_flops', 0) / 1e12:.0f} TFLOP/s. "
        "Every timed output is checked against a reference first; times are device-side medians.",
        "",
        "## Decode pipeline (one layer, one token): lookup + selection + sparse attention + user tokens + merge",
        "",
        "Llama-3.1-8B attention shapes (gqa: 32 query / 8 KV heads; mha: 32 / 32), d128, bf16, 5% centroids, "
        "512 user tokens, against dense attention over context + user keys (best of cuDNN and XLA). The roofline "
        "column is the bytes the method must read (kept KV blocks, centroids, selection tables, user KV) over the "
        "measured read bandwidth.",
        "",
        *_e2e_table(_rows(result, "e2e")),
        "",
    ]
    if _rows(result, "breakdown"):
        lines += ["## Decode pipeline stages alone (gqa, 1/8 kept)", "",
                  "Lookup over 5% fine centroids (hierarchical: 1% coarse, a quarter of them expanded), the fused "
                  "selection kernel vs the unfused XLA path (block scores + top-k), the sparse attention kernel, "
                  "the user-token attention + merge as separate XLA ops, and the sparse attention kernel with the "
                  "user tokens in the same launch (what the pipeline runs).", "",
                  *_breakdown_table(_rows(result, "breakdown")), ""]
    if _rows(result, "model"):
        lines += ["## Whole-model decode latency (random weights)", "",
                  "Per-token latency of `generate` (one jit'd decode loop; sampling included) with 64 question "
                  "tokens after the fixed context.", "", *_model_table(_rows(result, "model")), ""]
    if _rows(result, "kernels"):
        lines += ["## Sparse attention kernels alone", "", "Synthetic selections (random blocks at the budget).", "",
                  *_kernel_table(_rows(result, "kernels")), ""]
    if _rows(result, "index"):
        lines += ["## Context-index build", "", "Full model (K-means on every layer and KV head, layout, calibration), "
                  "synthetic post-RoPE keys.", "", *_index_table(_rows(result, "index")), ""]
    mi = _rows(result, "minference")
    if mi:
        lines += ["## MInference causal prefill", "",
                  "Llama-3.1-8B attention shapes (32 query / 8 KV heads, d128, bf16), one layer, B=1. Synthetic "
                  "budgets (A-shape) and indexes built online from a planted attention sample (vertical-slash from "
                  "the last 64 queries, block-sparse from mean-pooled 64-blocks); `total ms` includes index "
                  "building. `backend_*`: the model backend's prefill with mixed per-head patterns.", "",
                  *_minference_table(mi[0].get("result", {})), ""]
    if rerun is not None:
        lines += ["## Reproducibility", "",
                  f"Every ratio against the best dense of this run vs a re-run of the same command on the same kind "
                  f"of machine ({rerun['meta'].get('device')}, {rerun['meta'].get('started', '')}, "
                  f"{rerun['meta'].get('wall_s', 0):.0f} s; raw: `{rerun_path}`):", "",
                  *_repro_table(result, rerun), ""]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    for name, sec in result.get("sections", {}).items():
        if "error" in sec or "skipped" in sec:
            lines.append(f"- section `{name}`: {sec.get('error', sec.get('skipped'))}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.resolve().relative_to(path.resolve().parent)})"
                                         for p in plots]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Re-render BENCHMARKS.md and the plots from a run_all.py results file.")
    ap.add_argument("results", type=Path)
    ap.add_argument("--rerun", type=Path, default=None, help="a second run of the same command (reproducibility)")
    args = ap.parse_args(argv)
    result = json.loads(args.results.read_text())
    rerun = json.loads(args.rerun.read_text()) if args.rerun else None
    plots = write_plots(result, args.results.parent / "plots", args.results.stem)
    rerun_rel = args.rerun and (args.rerun.resolve().relative_to(ROOT) if args.rerun.resolve().is_relative_to(ROOT)
                                else args.rerun)
    write_benchmarks_md(result, ROOT / "BENCHMARKS.md", args.results, plots, rerun, rerun_rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
