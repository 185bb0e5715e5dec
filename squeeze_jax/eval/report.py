"""Markdown tables from evaluation records (results.jsonl) and from the selection-fidelity study summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (record key, column title, format)
SUMMARY_COLUMNS = (
    ("em", "exact match", "{:.2f}"),
    ("prefill_recall", "recall (prefill)", "{:.3f}"),
    ("decode_recall", "recall (decode)", "{:.3f}"),
    ("decode_out_rel_err", "out err (decode)", "{:.3f}"),
    ("top1", "top-1 agree", "{:.3f}"),
    ("kl", "KL (nats)", "{:.4f}"),
    ("top1_answer", "top-1 agree (answer)", "{:.3f}"),
    ("kl_answer", "KL (answer)", "{:.4f}"),
)


def _budget_label(b: float) -> str:
    inv = 1.0 / b
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{b:.4g}"


def _fmt(x: float | None, fmt: str) -> str:
    return "–" if x is None or not np.isfinite(x) else fmt.format(x)


def group_mean(records: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> dict[tuple, float]:
    """Mean of `metric` over the records of each group (records lacking the metric are skipped)."""
    acc: dict[tuple, list[float]] = {}
    for r in records:
        if metric in r and r[metric] is not None:
            acc.setdefault(tuple(r[k] for k in keys), []).append(float(r[metric]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def summary_rows(records: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (method, budget): every SUMMARY_COLUMNS metric averaged over contexts, plus counts."""
    methods = list(methods or dict.fromkeys(r["method"] for r in records))
    budgets = sorted({r["budget"] for r in records}, reverse=True)
    means = {key: group_mean(records, ("method", "budget"), key) for key, _, _ in SUMMARY_COLUMNS}
    rows = []
    for m in methods:
        for b in budgets:
            n = sum(1 for r in records if r["method"] == m and r["budget"] == b)
            if n == 0:
                continue
            row = {"method": m, "budget": b, "n_contexts": n,
                   "n_questions": sum(r.get("n_questions", 1) for r in records
                                      if r["method"] == m and r["budget"] == b)}
            row.update({key: means[key].get((m, b)) for key, _, _ in SUMMARY_COLUMNS})
            rows.append(row)
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per header column")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(records: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
    rows = summary_rows(records, methods)
    header = ["method", "budget"] + [title for _, title, _ in SUMMARY_COLUMNS] + ["contexts"]
    body = [[r["method"], _budget_label(r["budget"])] + [_fmt(r[k], f) for k, _, f in SUMMARY_COLUMNS]
            + [str(r["n_contexts"])] for r in rows]
    return markdown_table(header, body)


def by_task_table(records: Sequence[dict[str, Any]], metric: str, fmt: str, budget: float,
                  methods: Sequence[str] | None = None) -> str:
    """Rows: methods; columns: (task, length); cells: `metric` averaged over seeds at one budget."""
    recs = [r for r in records if abs(r["budget"] - budget) < 1e-9]
    methods = list(methods or dict.fromkeys(r["method"] for r in recs))
    cols = sorted({(r["task"], r["length"]) for r in recs})
    means = group_mean(recs, ("method", "task", "length"), metric)
    header = ["method"] + [f"{t} {n}" for t, n in cols]
    body = [[m] + [_fmt(means.get((m, t, n)), fmt) for t, n in cols] for m in methods
            if any((m, t, n) in means for t, n in cols)]
    return markdown_table(header, body)


def _context(rec: dict[str, Any]) -> tuple:
    return rec["task"], rec["length"], rec["seed"]


def complete_contexts(records: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> set[tuple]:
    """The (task, length, seed) contexts holding a record for every (method, budget) pair seen in `records`."""
    methods = set(methods or {r["method"] for r in records})
    want = {(r["method"], r["budget"]) for r in records if r["method"] in methods}
    have: dict[tuple, set] = {}
    for r in records:
        have.setdefault(_context(r), set()).add((r["method"], r["budget"]))
    return {c for c, got in have.items() if want <= got}


def comparable_records(records: Sequence[dict[str, Any]],
                       methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The records of the complete contexts (all of them when none is complete): means over these compare
    every method on the same contexts, also while a resumable run is still partial."""
    complete = complete_contexts(records, methods)
    return [r for r in records if _context(r) in complete] or list(records)


def kept_of_reference(correct: Sequence[bool], reference: Sequence[bool]) -> tuple[int, int]:
    """(questions right in both, questions right in `reference`): how many of dense's answers a method keeps."""
    if len(correct) != len(reference):
        raise ValueError(f"{len(correct)} answers against {len(reference)} reference answers")
    return sum(bool(a and b) for a, b in zip(correct, reference)), sum(bool(b) for b in reference)


def _columns(records: Sequence[dict[str, Any]], methods: Sequence[str] | None) -> list[tuple[str, float]]:
    """(method, budget) columns: dense (budget independent) once at the largest budget, others at every budget."""
    methods = list(methods or dict.fromkeys(r["method"] for r in records))
    budgets = sorted({r["budget"] for r in records}, reverse=True)
    have = {(r["method"], r["budget"]) for r in records}
    cols = []
    for m in methods:
        bs = [b for b in budgets if (m, b) in have]
        cols += [(m, b) for b in (bs[:1] if m == "dense" else bs)]
    return cols


def _col_title(method: str, budget: float) -> str:
    return method if method == "dense" else f"{method} {_budget_label(budget)}"


def answer_counts_table(records: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
    """Rows: contexts; cells: questions answered right, and of those dense answered right how many are kept."""
    recs = [r for r in records if "correct" in r]
    cols = _columns(recs, methods)
    by_key = {(_context(r), r["method"], r["budget"]): r for r in recs}
    body = []
    for c in sorted({_context(r) for r in recs}):
        dense = next((by_key[c, m, b] for m, b in cols if m == "dense" and (c, m, b) in by_key), None)
        row = [f"{c[0]} {c[1]} s{c[2]}"]
        for m, b in cols:
            r = by_key.get((c, m, b))
            if r is None:
                row.append("–")
                continue
            cell = f"{sum(r['correct'])}/{len(r['correct'])}"
            if dense is not None and m != "dense":
                kept, ref = kept_of_reference(r["correct"], dense["correct"])
                cell += f" ({kept}/{ref})"
            row.append(cell)
        body.append(row)
    return markdown_table(["context"] + [_col_title(m, b) for m, b in cols], body)


def lost_answers_table(records: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> str | None:
    """One row per answer dense got right and a method lost, with dense's own margin on that answer (the smallest
    log-probability gap between a token of its greedy answer and the next best, when the run was teacher-forced);
    None if none lost."""
    recs = [r for r in records if "correct" in r]
    dense = {_context(r): r for r in recs if r["method"] == "dense"}
    body = []
    for m, b in _columns(recs, methods):
        for r in sorted((r for r in recs if r["method"] == m and r["budget"] == b and m != "dense"), key=_context):
            ref = dense.get(_context(r))
            if ref is None:
                continue
            margins = ref.get("dense_margin")
            for i, (ok, ok_ref) in enumerate(zip(r["correct"], ref["correct"])):
                if ok_ref and not ok:
                    c = _context(r)
                    body.append([_col_title(m, b), f"{c[0]} {c[1]} s{c[2]}", str(i + 1), _cell_text(r["expected"][i]),
                                 _cell_text(r["answers"][i]),
                                 "–" if margins is None or margins[i] is None else f"{margins[i]:.2f}"])
    if not body:
        return None
    return markdown_table(["method", "context", "#", "expected", "answered", "dense margin (nats)"], body)


def _cell_text(text: str, limit: int = 24) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def per_question_table(records: Sequence[dict[str, Any]], context: tuple,
                       methods: Sequence[str] | None = None) -> str:
    """One row per question of one context: the expected answer, then each method's answer (✓ / ✗)."""
    recs = [r for r in records if _context(r) == context and "correct" in r]
    if not recs:
        raise ValueError(f"no per-question records for context {context}")
    cols = _columns(recs, methods)
    by_col = {(r["method"], r["budget"]): r for r in recs}
    n = len(recs[0]["expected"])
    body = []
    for i in range(n):
        row = [str(i + 1), _cell_text(recs[0]["expected"][i])]
        for col in cols:
            r = by_col[col]
            row.append(("✓ " if r["correct"][i] else "✗ ") + _cell_text(r["answers"][i]))
        body.append(row)
    return markdown_table(["#", "expected"] + [_col_title(m, b) for m, b in cols], body)


def report_markdown(records: Sequence[dict[str, Any]], title: str, methods: Sequence[str] | None = None) -> str:
    """The whole report: summary per method x budget (over the contexts every method ran on), correct answers
    per context, exact match and recall per task and length, and per-question answers of multi-question
    contexts."""
    if not records:
        raise ValueError("no records to report")
    budgets = sorted({r["budget"] for r in records}, reverse=True)
    tasks = sorted({_context(r) for r in records})
    complete = complete_contexts(records, methods)
    summary_recs = comparable_records(records, methods)
    partial = sorted(set(tasks) - complete) if complete else []
    parts = [
        f"# Evaluation: {title}",
        "",
        f"{len(records)} records; {len(tasks)} contexts (task, length, seed); model context tokens: "
        f"{sorted({r['context_len'] for r in records})}.",
        "Budget = fraction of the fixed context's keys attended (sinks and window included). Recall = attention "
        "mass over the context kept, mean over layers, heads and tokens (prefill: the question; decode: the "
        "generated tokens). top-1 / KL: teacher-forced question + answer tokens against dense attention.",
        "",
        "## Summary (mean over contexts)",
        "",
    ]
    if partial:
        parts += [f"Over the {len(complete)} contexts that every method ran on; left out (not every method run "
                  f"yet): {', '.join(f'{t} {n} s{s}' for t, n, s in partial)}.", ""]
    parts += [
        summary_table(summary_recs, methods),
        "",
        "## Correct answers per context",
        "",
        "Cells: questions answered right / questions; in brackets, of the questions dense answered right, how "
        "many the method also answered right.",
        "",
        answer_counts_table(records, methods),
    ]
    lost = lost_answers_table(records, methods)
    if lost is not None:
        parts += ["", "## Answers dense got right and a method lost", "",
                  "Dense margin: along dense's own greedy answer (up to where it holds the expected answer), the "
                  "smallest log-probability gap between the token dense chose and the next best: how near dense "
                  "itself was to answering otherwise (– where the run was not teacher-forced).", "",
                  lost]
    for b in budgets:
        parts += ["", f"## Exact match by task and length, budget {_budget_label(b)}", "",
                  by_task_table(summary_recs, "em", "{:.2f}", b, methods),
                  "", f"## Decode recall by task and length, budget {_budget_label(b)}", "",
                  by_task_table(summary_recs, "decode_recall", "{:.3f}", b, methods)]
    for c in tasks:
        if max(r.get("n_questions", 1) for r in records if _context(r) == c) > 1:
            parts += ["", f"## Answers per question: {c[0]} {c[1]} s{c[2]}", "",
                      per_question_table(records, c, methods)]
    return "\n".join(parts) + "\n"


def write_report(records: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str,
                 methods: Sequence[str] | None = None) -> Path:
    """Write `report.md` and `summary.json` (summary rows) into `out_dir`; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(report_markdown(records, title, methods))
    (out / "summary.json").write_text(json.dumps(summary_rows(records, methods), indent=1, sort_keys=True))
    return path


# ------------------------------------------------------------------------------------------ fidelity study


def study_markdown(summary: dict[str, Any]) -> str:
    """Tables of the selection-fidelity study: recall at the target key budgets and at equal bytes read."""
    targets = summary["targets"]
    parts = [f"# Selection fidelity: {summary['name']}", "",
             f"Contexts: {', '.join(summary['contexts'])}.",
             "Recall = attention mass over the fixed context kept by the selection, for the queries of a dense "
             "run of the user tokens (question + answer, or a plain-text continuation), mean over layers, "
             "heads, tokens and contexts. Bytes = context rows read per query relative to dense (a selected "
             "key costs K + V, a centroid one K row). 'decode': every token selects its own keys; 'prefill': "
             "the user tokens of a 64-token query block share one selection.", ""]
    for mode in summary["modes"]:
        header = (["variant"] + [f"recall @ keys {_budget_label(t)}" for t in targets]
                  + [f"bytes @ keys {_budget_label(t)}" for t in targets]
                  + [f"recall @ bytes {_budget_label(t)}" for t in targets])
        body = []
        for name, v in summary["variants"].items():
            m = v["modes"].get(mode)
            if m is None:
                continue
            curve = {round(c["budget"], 8): c for c in m["curve"]}
            row = [name]
            row += [_fmt(m["recall_at_key_budget"].get(str(t)), "{:.3f}") + ("*" if _over_budget(m, t) else "")
                    for t in targets]
            row += [_fmt(curve.get(round(t, 8), {}).get("bytes_fraction"), "{:.3f}") for t in targets]
            row += [_fmt(m["recall_at_bytes"].get(str(t)), "{:.3f}") for t in targets]
            body.append(row)
        parts += [f"## Mode: {mode}", "", markdown_table(header, body), "",
                  "\\* the always-kept keys (sinks + window) exceed this budget: more than it was kept.", ""]
        parts += _study_verdict(summary, mode)
    return "\n".join(parts)


def _over_budget(mode_summary: dict[str, Any], t: float) -> bool:
    """True when the selection at key budget `t` kept clearly more than `t` (always-kept keys exceed it)."""
    c = next((c for c in mode_summary["curve"] if abs(c["budget"] - t) < 1e-9), None)
    return c is not None and c["kept_fraction"] > 1.05 * t


def _is_squeezed(v: dict[str, Any]) -> bool:
    return v["options"].get("policy", "squeezed") == "squeezed"


def _study_verdict(summary: dict[str, Any], mode: str) -> list[str]:
    """Best squeezed variant per target (at equal key budget and at equal bytes) against the goals."""
    goals = summary.get("goals") or {}
    ref_name = summary.get("reference")
    max_gap = summary.get("max_gap")
    lines = []
    for t in summary["targets"]:
        key = str(t)
        cands = [(name, v["modes"][mode]) for name, v in summary["variants"].items()
                 if _is_squeezed(v) and mode in v["modes"]]
        if not cands:
            continue
        ref = summary["variants"].get(ref_name, {}).get("modes", {}).get(mode) if ref_name else None
        ref_keys = ref["recall_at_key_budget"].get(key) if ref else None
        for basis, field in (("key budget", "recall_at_key_budget"), ("bytes", "recall_at_bytes")):
            scored = [(m[field].get(key), name) for name, m in cands if m[field].get(key) is not None
                      and (field == "recall_at_bytes" or not _over_budget(m, t))]
            if not scored:
                continue
            best, name = max(scored)
            msg = f"- {mode}, {basis} {_budget_label(t)}: best squeezed variant **{name}** recall {best:.3f}"
            if ref_keys is not None:
                msg += f"; {ref_name} at key budget {_budget_label(t)}: {ref_keys:.3f} (gap {ref_keys - best:+.3f})"
            if key in goals:
                ok = best >= goals[key] and (ref_keys is None or max_gap is None or t != max(summary["targets"])
                                             or ref_keys - best <= max_gap)
                msg += f"; goal >= {goals[key]:.2f}" + (f" and gap <= {max_gap}" if max_gap is not None and
                                                        t == max(summary["targets"]) else "")
                msg += ": met" if ok else ": NOT met"
            lines.append(msg)
    return (["### Verdict", ""] + lines + [""]) if lines else []


__all__ = [
    "SUMMARY_COLUMNS",
    "answer_counts_table",
    "by_task_table",
    "comparable_records",
    "complete_contexts",
    "group_mean",
    "kept_of_reference",
    "markdown_table",
    "per_question_table",
    "report_markdown",
    "study_markdown",
    "summary_rows",
    "summary_table",
    "write_report",
]
