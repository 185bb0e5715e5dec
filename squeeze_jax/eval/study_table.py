"""Markdown tables of a selection-fidelity study per context length: context-only and total-mass recall at the
target key budgets, bytes read, and recall at equal bytes; the calibrated allocation per layer; greedy-answer
agreement with dense. `python -m squeeze_jax.eval.study_table` writes the combined summary (see `main`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _label(b: float) -> str:
    inv = 1.0 / b
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{b:.3g}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def length_curves(rows: Sequence[dict[str, Any]], mode: str) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """{context_len: {variant: [per-budget means of recall, recall_total, bytes_fraction, kept_fraction]}}."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if mode in r.get("modes", {}):
            groups.setdefault((int(r["context_len"]), r["variant"]), []).append(r)
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for (length, name), rs in groups.items():
        budgets = sorted({p["budget"] for r in rs for p in r["modes"][mode]})
        curve = []
        for b in budgets:  # rows may hold different budget lists: points are matched by value
            pts = [p for r in rs for p in r["modes"][mode] if abs(p["budget"] - b) < 1e-9]
            tot = [p.get("recall_total") for p in pts]
            curve.append({"budget": b, "n": len(pts),
                          "recall": float(np.mean([p["recall"] for p in pts])),
                          "recall_total": float(np.mean(tot)) if all(t is not None for t in tot) else None,
                          "bytes_fraction": float(np.mean([p["bytes_fraction"] for p in pts])),
                          "kept_fraction": float(np.mean([p["kept_fraction"] for p in pts]))})
        out.setdefault(length, {})[name] = curve
    return out


def recall_at_bytes(curve: Sequence[dict[str, Any]], target: float, field: str = "recall") -> float | None:
    """Linear interpolation of `field` at `target` bytes fraction; None outside the measured range."""
    pts = sorted((c["bytes_fraction"], c[field]) for c in curve if c.get(field) is not None)
    if not pts or target < pts[0][0] or target > pts[-1][0]:
        return None
    return float(np.interp(target, [x for x, _ in pts], [y for _, y in pts]))


def length_tables_markdown(cfg, rows: Sequence[dict[str, Any]]) -> str:
    """One table per (mode, context length): variants x (recall, recall_total, bytes) at each target budget and
    recall at equal bytes. `cfg` is the StudyConfig (targets, modes, variant order)."""
    order = [v["name"] for v in cfg.variants]
    parts = ["# Selection fidelity per context length", "",
             "recall = context-only attention-mass recall (softmax over the fixed context's keys alone); "
             "recall_total = total-mass recall (softmax over context + the user's own tokens, which are always "
             "attended): the share of the full attention mass the sparse computation covers. bytes = rows read "
             "per query / dense (K+V per kept key, one K row per centroid). n = contexts at the target budgets "
             "(each with its own number of prompts).", ""]
    for mode in cfg.modes:
        for length, variants in sorted(length_curves(rows, mode).items()):
            header = ["variant", "n"]
            for t in cfg.targets:
                header += [f"recall {_label(t)}", f"total {_label(t)}", f"bytes {_label(t)}"]
            header += [f"recall @ bytes {_label(t)}" for t in cfg.targets]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name in [n for n in order if n in variants]:
                curve = variants[name]
                by_b = {round(c["budget"], 8): c for c in curve}
                row = [name, str(max(c["n"] for c in curve if any(abs(c["budget"] - t) < 1e-9 for t in cfg.targets)))]
                for t in cfg.targets:
                    c = by_b.get(round(t, 8), {})
                    row += [_fmt(c.get("recall")), _fmt(c.get("recall_total")), _fmt(c.get("bytes_fraction"))]
                row += [_fmt(recall_at_bytes(curve, t)) for t in cfg.targets]
                lines.append("| " + " | ".join(row) + " |")
            parts += [f"## {mode}, {length}-token contexts", ""] + lines + [""]
    return "\n".join(parts)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def allocation_markdown(metas: Sequence[tuple[str, dict[str, Any]]], fractions: Sequence[float]) -> str:
    """Calibrated clustered keys per layer (mean over KV heads) at `fractions`, one column block per index.

    metas: (context label, index metadata as written by `save_index`) of calibrated indexes."""
    if not metas:
        return ""
    header = ["layer"]
    cols = []
    for label, meta in metas:
        reps = {round(r["fraction"], 8): r for r in meta["calibration"].get("budgets", [])}
        for f in fractions:
            r = reps.get(round(f, 8))
            if r is not None:
                header.append(f"{label} {_label(f)} (uniform {r['uniform_budget_keys']})")
                cols.append(r["budget_keys_per_layer"])
    if not cols:
        return ""
    n = len(cols[0])
    body = [[str(i)] + [f"{c[i]:.0f}" for c in cols] for i in range(n)]
    gains = []
    for label, meta in metas:
        for r in meta["calibration"].get("budgets", []):
            if any(abs(r["fraction"] - f) < 1e-9 for f in fractions):
                gains.append(f"{label} {_label(r['fraction'])}: calibration recall (window queries) "
                             f"{r['recall_uniform_mean']:.3f} uniform -> {r['recall_allocated_mean']:.3f} allocated "
                             f"({r.get('objective', 'maxmin')})")
    return "\n".join(["## Calibrated allocation: clustered keys kept per layer (mean over the 3 KV heads)", ""]
                     + _table(header, body) + [""] + [f"- {g}" for g in gains] + [""])


def answer_span(text: str) -> str:
    """The answer part of a greedy continuation: up to the first newline or sentence-ending period."""
    first = text.strip().split("\n", 1)[0]
    cut = first.find(". ")
    first = first[:cut] if cut >= 0 else first
    return first.rstrip(".").strip()


def answer_agreement(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): prompts, prompts dense answers correctly, and among those how many the method
    answers with dense's greedy answer (`answer_span` equal), with dense's whole greedy text (`same_text`), and
    correctly (the task's exact match). Records are one run_eval's."""
    dense = {}
    for r in records:
        if r["policy"] == "dense":
            for i, (a, ok) in enumerate(zip(r["answers"], r["correct"])):
                dense[(r["task"], r["length"], r["seed"], i)] = (a, ok)
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for r in records:
        if r["policy"] == "dense":
            continue
        e = out.setdefault((r["method"], r["budget"]), {"method": r["method"], "budget": r["budget"], "prompts": 0,
                                                         "dense_correct": 0, "same_as_dense": 0, "same_text": 0,
                                                         "correct": 0})
        for i, (a, ok) in enumerate(zip(r["answers"], r["correct"])):
            d_answer, d_ok = dense[(r["task"], r["length"], r["seed"], i)]
            e["prompts"] += 1
            if d_ok:
                e["dense_correct"] += 1
                e["same_as_dense"] += int(answer_span(a) == answer_span(d_answer))
                e["same_text"] += int(a == d_answer)
                e["correct"] += int(bool(ok))
    return sorted(out.values(), key=lambda e: (e["method"], -e["budget"]))


def answers_markdown(by_seed: Sequence[tuple[int, Sequence[dict[str, Any]]]]) -> str:
    """Greedy-answer agreement tables, one row per (K-means seed, method, budget)."""
    body = []
    for seed, records in by_seed:
        for e in answer_agreement(records):
            body.append([str(seed), e["method"], _label(e["budget"]), str(e["prompts"]), str(e["dense_correct"]),
                         f"{e['same_as_dense']}/{e['dense_correct']}", f"{e['same_text']}/{e['dense_correct']}",
                         f"{e['correct']}/{e['dense_correct']}"])
    header = ["K-means seed", "method", "budget", "prompts", "dense correct", "same answer as dense",
              "same 10-token text as dense", "correct (of dense-correct)"]
    return "\n".join(["## Greedy answers vs dense", ""] + _table(header, body) + [""])


def main(argv: Sequence[str] | None = None) -> int:
    """Write the combined fidelity summary markdown from study JSONL rows, cached index metadata and answers."""
    from squeeze_jax.eval import runner
    from squeeze_jax.index.io import IndexFormatError, read_index_metadata

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--results", default="results", help="directory holding <study>.jsonl")
    p.add_argument("--study", action="append", required=True, help="study config name (repeatable)")
    p.add_argument("--answers", action="append", default=[], help="SEED=DIR of a run_eval output (repeatable)")
    p.add_argument("--cache-dir", help="index cache (default: runner.default_index_cache())")
    p.add_argument("--notes", help="markdown file put first (the summary of the findings)")
    p.add_argument("--plot", help="PNG: recall vs budget of the --plot-study rows (all lengths in one figure)")
    p.add_argument("--plot-study", action="append", default=[], help="study whose rows go into --plot")
    p.add_argument("--out", required=True)
    args = p.parse_args(list(argv) if argv is not None else None)
    parts = [Path(args.notes).read_text()] if args.notes else []
    if args.plot:
        from squeeze_jax.eval import plots

        plot_rows = [r for name in args.plot_study
                     for r in dedupe_rows(runner.read_jsonl(Path(args.results) / f"{name}.jsonl"))]
        plots.plot_recall_vs_budget(plot_rows, args.plot, title="SmolLM2-135M")
    first = None
    for name in args.study:
        cfg = runner.StudyConfig.from_dict(runner.load_config(name))
        first = first or cfg
        labels = {context_label(c) for c in cfg.contexts}
        rows = [r for r in dedupe_rows(runner.read_jsonl(Path(args.results) / f"{cfg.name}.jsonl"))
                if r["context"] in labels]
        parts.append(length_tables_markdown(cfg, rows).replace("# Selection fidelity per context length",
                                                               f"# Study {cfg.name}", 1))
    cache = Path(args.cache_dir) if args.cache_dir else runner.default_index_cache()
    base = first.variant_index_config({}).to_dict() if first else {}
    metas = []
    for d in sorted((cache / "index").glob("*")):
        try:
            meta = read_index_metadata(d)
        except IndexFormatError:
            continue
        bc = meta.get("build_config", {})
        if all(bc.get(k) == base.get(k) for k in base if k != "progress") and meta.get("calibration"):
            metas.append((d.name.rsplit("-", 1)[0], meta))
    parts.append(allocation_markdown(metas, (0.125, 0.0625)))
    by_seed = []
    for item in args.answers:
        seed, _, d = item.partition("=")
        by_seed.append((int(seed), runner.read_jsonl(Path(d) / runner.RESULTS_FILE)))
    if by_seed:
        parts.append(answers_markdown(by_seed))
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


def context_label(item: dict[str, Any]) -> str:
    """The label a study context item gets (`kind-length-sSEED`), as in the study rows."""
    return f"{item['kind']}-{int(item['length'])}-s{int(item.get('seed', 0))}"


def dedupe_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of every (context, variant) (a resumed run may have appended one twice)."""
    seen, out = set(), []
    for r in rows:
        key = (r["context"], r["variant"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


__all__ = ["allocation_markdown", "answer_agreement", "answer_span", "answers_markdown", "context_label", "dedupe_rows",
           "length_curves",
           "length_tables_markdown", "main", "recall_at_bytes"]

if __name__ == "__main__":
    sys.exit(main())
