"""Plots (matplotlib, Agg backend): accuracy / recall vs kept fraction per method, and the fidelity study's
recall vs bytes read per variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from squeeze_jax.eval.report import group_mean


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budget_axis(ax, budgets: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets))
    ax.set_xticklabels([f"1/{round(1 / b)}" if abs(1 / b - round(1 / b)) < 1e-6 else f"{b:.3g}" for b in budgets])
    ax.set_xlabel("kept fraction of the fixed context (budget)")
    ax.grid(True, alpha=0.3)


def metric_curves(records: Sequence[dict[str, Any]], metric: str,
                  methods: Sequence[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per method, (budget, mean metric) points sorted by budget."""
    means = group_mean(records, ("method", "budget"), metric)
    methods = list(methods or dict.fromkeys(r["method"] for r in records))
    out = {}
    for m in methods:
        pts = sorted((b, v) for (mm, b), v in means.items() if mm == m)
        if pts:
            out[m] = pts
    return out


def plot_metric(records: Sequence[dict[str, Any]], metric: str, path: str | Path, *, ylabel: str,
                title: str, methods: Sequence[str] | None = None) -> Path | None:
    """One line per method of `metric` vs budget; budget-independent dense is a dashed horizontal line."""
    curves = metric_curves(records, metric, methods)
    if not curves:
        return None
    plt = _pyplot()
    budgets = sorted({b for pts in curves.values() for b, _ in pts})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, pts in curves.items():
        xs, ys = zip(*pts)
        if m == "dense":
            ax.axhline(float(np.mean(ys)), color="black", ls="--", lw=1, label="dense")
        else:
            ax.plot(xs, ys, marker="o", label=m)
    _budget_axis(ax, budgets)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_curves(records: Sequence[dict[str, Any]], out_dir: str | Path,
                methods: Sequence[str] | None = None) -> list[Path]:
    """accuracy_vs_budget.png, recall_vs_budget.png (decode and prefill) and kl_vs_budget.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for metric, name, ylabel in (("em", "accuracy_vs_budget.png", "exact match"),
                                 ("decode_recall", "recall_vs_budget.png", "attention-mass recall (decode)"),
                                 ("prefill_recall", "prefill_recall_vs_budget.png",
                                  "attention-mass recall (prefill)"),
                                 ("kl", "kl_vs_budget.png", "KL(dense || method), nats")):
        p = plot_metric(records, metric, out / name, ylabel=ylabel, title=f"{ylabel} vs budget", methods=methods)
        if p is not None:
            made.append(p)
    return made


def plot_study(summary: dict[str, Any], path: str | Path) -> Path:
    """Recall vs bytes read (fraction of dense) per variant, one panel per mode."""
    plt = _pyplot()
    modes = summary["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, mode in zip(axes[0], modes):
        for i, (name, v) in enumerate(summary["variants"].items()):
            m = v["modes"].get(mode)
            if not m:
                continue
            xs = [c["bytes_fraction"] for c in m["curve"]]
            ys = [c["recall"] for c in m["curve"]]
            ref = v["options"].get("policy", "squeezed") != "squeezed"
            ax.plot(xs, ys, "--" if ref else "-", marker="x" if ref else ".", color=cmap(i % 20),
                    lw=1.6 if name == "base" else 1.0, label=name)
        for t in summary["targets"]:
            ax.axvline(t, color="grey", lw=0.8, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes read / dense (K+V per key, K per centroid)")
        ax.set_ylabel("attention-mass recall")
        ax.set_title(f"{summary['name']}: {mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_recall_vs_budget(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "",
                          mode: str = "decode", variants: Sequence[str] | None = None) -> Path | None:
    """Study rows -> recall vs key budget per variant: one column per context length, rows context-only recall
    and total-mass recall; reference policies (oracles, StreamingLLM, ...) dashed on the same axes."""
    from squeeze_jax.eval.study_table import length_curves

    curves = length_curves(rows, mode)
    if not curves:
        return None
    plt = _pyplot()
    lengths = sorted(curves)
    fig, axes = plt.subplots(2, len(lengths), figsize=(6.4 * len(lengths), 9.0), squeeze=False)
    policy = {r["variant"]: r.get("options", {}).get("policy", "squeezed") for r in rows}
    names = list(variants) if variants is not None else list(dict.fromkeys(r["variant"] for r in rows))
    cmap = plt.get_cmap("tab20")
    for col, length in enumerate(lengths):
        for row_i, (field, ylabel) in enumerate((("recall", "context-only recall"),
                                                 ("recall_total", "total-mass recall"))):
            ax = axes[row_i][col]
            for i, name in enumerate(names):
                curve = curves[length].get(name)
                if not curve or any(c[field] is None for c in curve):
                    continue
                ref = policy.get(name, "squeezed") != "squeezed"
                ax.plot([c["budget"] for c in curve], [c[field] for c in curve], "--" if ref else "-",
                        marker="x" if ref else ".", color=cmap(i % 20), lw=1.0, label=name)
            _budget_axis(ax, sorted({c["budget"] for v in curves[length].values() for c in v}))
            ax.set_ylabel(f"{ylabel} ({mode})")
            ax.set_title(f"{title} {length}-token contexts")
            ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


__all__ = ["metric_curves", "plot_curves", "plot_metric", "plot_recall_vs_budget", "plot_study"]


def _save(fig, path: str | Path) -> Path:
    """Writes `fig` as a PNG at `path` (parent folders created) and closes it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
