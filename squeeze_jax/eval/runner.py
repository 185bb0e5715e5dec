"""Evaluation runner: every method at the same budgets, on the same model and the same context index.

    python -m squeeze_jax.eval.runner --config configs/eval/smoke.json --out results/smoke
    squeeze-jax eval --config full --out results/full

For each context (task kind x length x seed) the index is built once (cached on disk with `save_index`), then
every method answers the context's questions at every budget. One JSON line per (task, length, seed, method,
budget) is appended to `<out>/results.jsonl`; a rerun skips the entries already there. Each line holds exact
match, attention-mass recall / output error per layer (prefill and decode, from the backend's fidelity aux)
and teacher-forced top-1 agreement / KL against dense attention. `report.md`, `summary.json` and the plots are
written from the JSONL at the end (`--report-only` redoes just that).

A config with `"study": "fidelity"` runs the selection-fidelity study instead (`run_fidelity_study`).

Contexts are cut to exactly the requested number of tokens, so every context of one length has the same index
shapes and all of them share one compilation per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from squeeze_jax.eval import metrics, tasks

TASK_KINDS = ("passkey", "needle", "multi_needle", "variable_tracking", "many_facts")
BUILTIN_METHODS: dict[str, dict[str, Any]] = {
    "dense": {"policy": "dense"},
    "squeezed": {"policy": "squeezed", "score": "mean"},  # centroid-mean cluster scores, as published
    "squeezed_box": {"policy": "squeezed", "score": "box", "box_weight": 0.25},  # the library default
    # the default, with the question's last token attending the whole context exactly (prefill only)
    "squeezed_box_tail": {"policy": "squeezed", "score": "box", "box_weight": 0.25, "exact_tail": 1},
    "squeezed_hier": {"policy": "squeezed", "hierarchical": True, "score": "mean"},
    "oracle": {"policy": "oracle"},
    "oracle_key": {"policy": "oracle_key"},
    "oracle_mass": {"policy": "oracle_mass"},  # the recall upper bound at a key count
    "streaming": {"policy": "streaming"},
    "quest": {"policy": "quest"},
    "random": {"policy": "random"},
}
BACKEND_OPTIONS = ("policy", "block_k", "block_q", "score", "radius_weight", "box_weight", "agg", "hierarchical",
                   "coarse_keep_fraction", "allocation", "max_head_share", "exact_tail", "exact_decode",
                   "question_prior", "prior_pin")
RESULTS_FILE = "results.jsonl"


# ============================================================================================ configuration


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A named attention method: `ContextAttention` options (policy, block_k, score, ...)."""

    name: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def parse(cls, item: str | dict[str, Any]) -> MethodSpec:
        if isinstance(item, str):
            if item not in BUILTIN_METHODS:
                raise ValueError(f"unknown method {item!r}; built-in methods are {sorted(BUILTIN_METHODS)} "
                                 "(or give an object with name and policy)")
            return cls(item, tuple(sorted(BUILTIN_METHODS[item].items())))
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"a method must be a name or an object with a 'name', got {item!r}")
        opts = {k: v for k, v in item.items() if k != "name"}
        base = dict(BUILTIN_METHODS.get(item["name"], {}))
        base.update(opts)
        unknown = set(base) - set(BACKEND_OPTIONS)
        if unknown:
            raise ValueError(f"method {item['name']!r} has unknown options {sorted(unknown)}; "
                             f"allowed: {BACKEND_OPTIONS}")
        if "policy" not in base:
            raise ValueError(f"method {item['name']!r} needs a 'policy'")
        return cls(str(item["name"]), tuple(sorted(base.items())))

    @property
    def policy(self) -> str:
        return dict(self.options)["policy"]

    @property
    def budget_independent(self) -> bool:
        """Dense attention ignores the budget: run once, record it at every budget."""
        return self.policy == "dense"

    def backend(self, max_budget: float, fidelity: bool):
        from squeeze_jax.attention.context import ContextAttention

        return ContextAttention(max_budget=max_budget, use_pallas=False, fidelity=fidelity, **dict(self.options))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task kind at several lengths (tokens of fixed context) and seeds."""

    kind: str
    lengths: tuple[int, ...]
    seeds: tuple[int, ...]
    n_questions: int = 1
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, item: dict[str, Any]) -> TaskSpec:
        if not isinstance(item, dict):
            raise ValueError(f"a task must be an object, got {item!r}")
        known = {"kind", "lengths", "seeds", "n_questions", "options"}
        unknown = set(item) - known
        if unknown:
            raise ValueError(f"task has unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        kind = item.get("kind")
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
        lengths = tuple(int(x) for x in item.get("lengths", ()))
        seeds = tuple(int(x) for x in item.get("seeds", (0,)))
        if not lengths or any(n < 256 for n in lengths):
            raise ValueError(f"task {kind}: lengths must be a non-empty list of ints >= 256, got {lengths}")
        if not seeds:
            raise ValueError(f"task {kind}: seeds is empty")
        n_q = int(item.get("n_questions", 1))
        if n_q < 1:
            raise ValueError(f"task {kind}: n_questions must be >= 1, got {n_q}")
        options = item.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"task {kind}: options must be an object")
        return cls(kind, lengths, seeds, n_q, tuple(sorted(options.items())))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """A sweep: tasks x methods x budgets on one model, with one index configuration."""

    name: str
    tasks: tuple[TaskSpec, ...]
    methods: tuple[MethodSpec, ...]
    budgets: tuple[float, ...]
    model: str = "smollm2-135m"
    index: tuple[tuple[str, Any], ...] = ()
    max_new_tokens: int = 10
    fidelity: bool = True
    teacher_forced: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        if not isinstance(data, dict):
            raise ValueError("an eval config must be a JSON object")
        known = {"name", "tasks", "methods", "budgets", "model", "index", "max_new_tokens", "fidelity",
                 "teacher_forced", "description"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"eval config has unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        for field in ("name", "tasks", "methods", "budgets"):
            if field not in data:
                raise ValueError(f"eval config lacks the field {field!r}")
        budgets = tuple(float(b) for b in data["budgets"])
        if not budgets or any(not 0.0 < b <= 1.0 for b in budgets) or len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets must be distinct fractions in (0, 1], got {list(budgets)}")
        methods = tuple(MethodSpec.parse(m) for m in data["methods"])
        names = [m.name for m in methods]
        if not methods or len(set(names)) != len(names):
            raise ValueError(f"methods must be non-empty with distinct names, got {names}")
        task_specs = tuple(TaskSpec.parse(t) for t in data["tasks"])
        if not task_specs:
            raise ValueError("tasks is empty")
        index = data.get("index", {})
        if not isinstance(index, dict):
            raise ValueError("index must be an object of IndexConfig fields")
        cfg = cls(name=str(data["name"]), tasks=task_specs, methods=methods, budgets=budgets,
                  model=str(data.get("model", "smollm2-135m")), index=tuple(sorted(index.items())),
                  max_new_tokens=int(data.get("max_new_tokens", 10)), fidelity=bool(data.get("fidelity", True)),
                  teacher_forced=bool(data.get("teacher_forced", True)))
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        cfg.index_config()  # validates the IndexConfig fields before any work
        return cfg

    def index_config(self):
        """The IndexConfig: the bundled default preset, calibration budgets = the eval budgets, overrides."""
        from squeeze_jax.index import IndexConfig

        base = IndexConfig.load("default").to_dict()
        base.update({"budgets": list(self.budgets), "progress": False})
        base.update(dict(self.index))
        return IndexConfig.from_dict(base)

    @property
    def max_budget(self) -> float:
        return max(self.budgets)


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a bundled config in configs/eval/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    root = resources.files("configs") / "eval"
    stem = p.name[:-5] if p.name.endswith(".json") else p.name
    candidate = root / f"{stem}.json"
    if candidate.is_file():
        return Path(str(candidate))
    names = sorted(x.name[:-5] for x in root.iterdir() if x.name.endswith(".json")) if root.is_dir() else []
    raise FileNotFoundError(f"eval config {str(name_or_path)!r} is neither a file nor a bundled config "
                            f"(bundled: {names})")


def load_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw JSON of an eval or study config (file path or bundled name)."""
    path = resolve_config_path(name_or_path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"eval config {path} is not valid JSON: {e}") from e


# ================================================================================================ contexts


@dataclasses.dataclass(frozen=True)
class Context:
    """One fixed context cut to exactly `len(ids)` tokens, with its questions."""

    kind: str
    length: int
    seed: int
    ids: tuple[int, ...]
    questions: tuple[tasks.Question, ...]
    meta: dict

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.length}-s{self.seed}"


def _generate_task(kind: str, n_tokens: int, seed: int, count, options: dict[str, Any]) -> tasks.Task:
    if kind == "passkey":
        depth = options.get("depth")
        if depth is None:
            depth = random.Random(1000 + seed).uniform(0.1, 0.9)
        return tasks.passkey(n_tokens, float(depth), seed, count)
    if kind == "needle":
        return tasks.needles(n_tokens, seed, count)
    if kind == "multi_needle":
        return tasks.needles(n_tokens, seed, count, n_keys=int(options.get("n_keys", 4)),
                             n_queries=int(options.get("n_queries", 1)))
    if kind == "variable_tracking":
        return tasks.variable_tracking(n_tokens, seed, count, n_hops=int(options.get("n_hops", 3)))
    if kind == "many_facts":
        return tasks.many_facts(n_tokens, seed, count, n_facts=int(options.get("n_facts", 20)))
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def _pick_questions(questions: Sequence[tasks.Question], n: int) -> tuple[tasks.Question, ...]:
    """`n` questions spread evenly over the list (facts are planted in question order)."""
    if n >= len(questions):
        return tuple(questions)
    idx = np.unique(np.linspace(0, len(questions) - 1, n).round().astype(int))
    return tuple(questions[i] for i in idx)


def make_context(kind: str, length: int, seed: int, tokenizer, *, n_questions: int = 1,
                 options: dict[str, Any] | None = None, max_tries: int = 6) -> Context:
    """Generate a seeded task and cut its context to exactly `length` tokens (from the end).

    The generator is asked for a little more than `length` tokens; the surplus (a few tokens of haystack) is
    dropped from the end. Every planted sentence must survive the cut, else a ValueError.
    """
    from squeeze_jax.api import context_tokens

    if length < 256:
        raise ValueError(f"context length must be >= 256 tokens, got {length}")
    options = dict(options or {})

    def count(s: str) -> int:
        return len(tokenizer.encode(s))

    target = length + 16
    for _ in range(max_tries):
        task = _generate_task(kind, target, seed, count, options)
        ids = context_tokens(tokenizer, task.context)
        if len(ids) >= length:
            break
        target += length - len(ids) + 16
    else:
        raise ValueError(f"could not generate a {kind} context of {length} tokens (got {len(ids)})")
    ids = ids[:length]
    text = tokenizer.decode(ids)
    missing = [s for s in task.meta.get("needles", []) if s not in text]
    if missing:
        raise ValueError(f"cutting the {kind} context (seed {seed}) to {length} tokens dropped planted "
                         f"sentences: {missing}")
    questions = _pick_questions(task.questions, n_questions)
    meta = {k: v for k, v in task.meta.items() if k != "needles"}
    return Context(kind, length, seed, tuple(int(i) for i in ids), questions, meta)


def answer_rows(tokenizer, questions: Sequence[tasks.Question]) -> tuple[list[list[int]], list[int]]:
    """Teacher-forced rows `question + " " + answer` (user-part tokens) and where each answer starts."""
    from squeeze_jax.api import prompt_parts, question_tokens

    rows, starts = [], []
    for q in questions:
        q_ids = question_tokens(tokenizer, q.text)
        full = tokenizer.encode(prompt_parts("", q.text)[1] + " " + q.answer)
        if full[: len(q_ids)] != q_ids or len(full) == len(q_ids):
            full = q_ids + tokenizer.encode(" " + q.answer)
        rows.append(full)
        starts.append(len(q_ids))
    return rows, starts


# ================================================================================================== index


def index_cache_path(cache_dir: Path, label: str, ids: Sequence[int], index_cfg, fingerprint: str) -> Path:
    """Cache directory of one context's index: keyed by the tokens, the IndexConfig and the model."""
    from squeeze_jax.index import token_hash

    cfg = {k: v for k, v in index_cfg.to_dict().items() if k != "progress"}
    key = json.dumps({"tokens": token_hash(np.asarray(ids, np.int32)), "config": cfg, "model": fingerprint},
                     sort_keys=True)
    return cache_dir / "index" / f"{label}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def get_index(model, ids: Sequence[int], index_cfg, cache_dir: Path | None, label: str,
              log=None) -> tuple[Any, bool]:
    """(index, loaded_from_cache): load the cached index of these tokens/config/model, else build and save."""
    from squeeze_jax.index import IndexFormatError, build_index, load_index, model_fingerprint, save_index

    fp = model_fingerprint(model)
    tokens = np.asarray(ids, np.int32)
    path = None
    if cache_dir is not None:
        path = index_cache_path(cache_dir, label, ids, index_cfg, fp)
        if path.is_dir():
            try:
                from squeeze_jax.index import token_hash

                return load_index(path, expected_model_fingerprint=fp,
                                  expected_token_hash=token_hash(tokens)), True
            except IndexFormatError as e:  # an interrupted save: rebuild
                if log:
                    log(f"rebuilding cached index {path}: {e}")
    index = build_index(model, tokens, index_cfg)
    if path is not None:
        save_index(index, path, overwrite=True)
    return index, False


def default_index_cache() -> Path:
    """`<squeeze_jax cache>/eval_indexes` (`$SQUEEZE_JAX_CACHE_DIR` or ~/.cache/squeeze_jax): indexes are
    hundreds of MB, so they never go next to the results."""
    from models.pretrained import default_cache_dir

    return default_cache_dir() / "eval_indexes"


def context_state(index, batch: int, budget: float, exact_end: Sequence[int] | None = None):
    """`ContextState` for `batch` rows at one budget (leaves carry the layer axis); `exact_end`: per row, where
    the rows an exact tail covers end (teacher forcing: the answer's start)."""
    from squeeze_jax.attention.context import ContextState

    ends = None
    if exact_end is not None:
        padded = list(exact_end) + [1] * (batch - len(exact_end))
        ends = jnp.broadcast_to(jnp.asarray(padded, jnp.int32), (index.n_layers, batch))
    return ContextState(index=index, budget_B=jnp.full((index.n_layers, batch), budget, jnp.float32),
                        exact_end_LB=ends)


# ================================================================================================ results


def entry_key(task: str, length: int, seed: int, method: str, budget: float) -> tuple:
    return (str(task), int(length), int(seed), str(method), round(float(budget), 8))


def record_key(rec: dict[str, Any]) -> tuple:
    return entry_key(rec["task"], rec["length"], rec["seed"], rec["method"], rec["budget"])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; a torn last line (interrupted write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records (one JSON object per line), flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        if torn:  # an interrupted write left a partial line: end it so the next record is parseable
            f.write("\n")
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def done_keys(path: Path) -> set[tuple]:
    return {record_key(r) for r in read_jsonl(path) if {"task", "length", "seed", "method", "budget"} <= set(r)}


def plan_entries(cfg: EvalConfig) -> list[tuple[TaskSpec, int, int, MethodSpec, float]]:
    """Every (task, length, seed, method, budget) of the sweep, contexts outermost."""
    out = []
    for spec in cfg.tasks:
        for length in spec.lengths:
            for seed in spec.seeds:
                for m in cfg.methods:
                    for b in cfg.budgets:
                        out.append((spec, length, seed, m, b))
    return out


def pending_entries(cfg: EvalConfig, path: Path) -> list[tuple[TaskSpec, int, int, MethodSpec, float]]:
    done = done_keys(path)
    return [e for e in plan_entries(cfg) if entry_key(e[0].kind, e[1], e[2], e[3].name, e[4]) not in done]


# ================================================================================================= runner


def evaluate_method(model, tokenizer, index, ctx: Context, method: MethodSpec, budgets: Sequence[float], *,
                    cfg: EvalConfig, ref_logits: np.ndarray | None, rows, starts) -> list[dict[str, Any]]:
    """Records of one method on one context at `budgets` (dense: run once, one record per budget)."""
    from squeeze_jax.api import ask

    backend = method.backend(cfg.max_budget, cfg.fidelity)
    tf_backend = method.backend(cfg.max_budget, False)
    questions = [q.text for q in ctx.questions]
    run_budgets = budgets[:1] if method.budget_independent else budgets
    out = []
    for b in run_budgets:
        t0 = time.perf_counter()
        res = ask(model, tokenizer, index, questions, policy=method.policy, budget=b,
                  max_new_tokens=cfg.max_new_tokens, backend=backend)
        rec: dict[str, Any] = {
            "answers": list(res.texts or []),
            "expected": [q.answer for q in ctx.questions],
            "correct": [metrics.exact_match(t, q.answer) for t, q in zip(res.texts or [], ctx.questions)],
            "prefill_s": res.prefill_s,
            "decode_s": res.decode_s,
        }
        rec["em"] = float(np.mean(rec["correct"]))
        if method.policy == "dense" and ref_logits is not None:
            q_rows = [row[:s] for row, s in zip(rows, starts)]  # the question tokens of the teacher-forced rows
            rec["dense_margin"] = greedy_answer_margins(model, tokenizer, index, ctx, q_rows, res.tokens, tf_backend)
        rec.update(metrics.fidelity_summary(res.stats))
        if ref_logits is not None:
            from squeeze_jax.generate import batch_bucket

            state = context_state(index, batch_bucket(len(rows)), b, exact_end=starts)  # question exact, answer
            # tokens at the budget, as in decode
            logits, lens, _ = metrics.teacher_forced_logits(model, rows, backend=tf_backend, backend_state=state,
                                                            position_offset=index.context_len)
            rec.update(metrics.logits_agreement(ref_logits, logits, lens, starts))
        rec["time_s"] = time.perf_counter() - t0
        out.append(rec)
    if method.budget_independent:
        out = [dict(out[0]) for _ in budgets]
    for rec, b in zip(out, budgets):
        rec.update({"task": ctx.kind, "length": ctx.length, "seed": ctx.seed, "method": method.name,
                    "budget": float(b), "policy": method.policy, "options": dict(method.options),
                    "context_len": index.context_len, "n_questions": len(ctx.questions),
                    "n_clusters": int(index.n_clusters), "n_fixed": int(index.n_fixed)})
    return out


def greedy_answer_margins(model, tokenizer, index, ctx: Context, q_rows: Sequence[Sequence[int]],
                          tokens: Sequence[Sequence[int]], backend) -> list[float | None]:
    """Per question (`q_rows`: its tokens), how near the greedy generation `tokens` was to another token before
    its answer was complete: the smallest log-probability gap between each generated token and the next best,
    teacher-forced over the generated tokens up to the answer (all of them when the answer never appears)."""
    from squeeze_jax.generate import batch_bucket

    rows = [list(q) + list(t) for q, t in zip(q_rows, tokens)]
    ends = [len(q) + metrics.answer_prefix_length(tokenizer, t, q_.answer)
            for q, t, q_ in zip(q_rows, tokens, ctx.questions)]
    logits, _, _ = metrics.teacher_forced_logits(model, rows, backend=backend,
                                                 backend_state=context_state(index, batch_bucket(len(rows)), 1.0),
                                                 position_offset=index.context_len)
    return metrics.answer_margins(logits, rows, [len(q) for q in q_rows], ends)


def run_eval(cfg: EvalConfig, out_dir: Path, *, cache_dir: Path | None = None, progress: bool = True,
             model_bundle=None, log=print) -> list[dict[str, Any]]:
    """Run every pending entry of the sweep, appending to `<out_dir>/results.jsonl`; returns all records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_FILE
    pending = pending_entries(cfg, results)
    if not pending:
        log(f"{results}: all {len(plan_entries(cfg))} entries done")
        return read_jsonl(results)
    if model_bundle is None:
        from models.pretrained import load_pretrained

        model_bundle = load_pretrained(cfg.model)
    _, model, tokenizer = model_bundle
    index_cfg = cfg.index_config()
    cache_dir = cache_dir if cache_dir is not None else default_index_cache()

    by_context: dict[tuple, list] = {}
    for e in pending:
        by_context.setdefault((e[0], e[1], e[2]), []).append(e)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc=f"eval {cfg.name}", unit="entry", disable=not progress, file=sys.stderr)
    try:
        for (spec, length, seed), entries in by_context.items():
            ctx = make_context(spec.kind, length, seed, tokenizer, n_questions=spec.n_questions,
                               options=dict(spec.options))
            bar.set_postfix_str(f"{ctx.label}: index")
            t0 = time.perf_counter()
            index, cached = get_index(model, ctx.ids, index_cfg, cache_dir, ctx.label, log=log)
            index_s = time.perf_counter() - t0
            rows, starts = answer_rows(tokenizer, ctx.questions)
            ref_logits = None
            if cfg.teacher_forced:
                dense = MethodSpec.parse("dense").backend(cfg.max_budget, False)
                ref_logits, _, _ = metrics.teacher_forced_logits(
                    model, rows, backend=dense, backend_state=context_state(index, _bucket(len(rows)), 1.0),
                    position_offset=index.context_len)
            for method in cfg.methods:
                budgets = [e[4] for e in entries if e[3].name == method.name]
                if not budgets:
                    continue
                bar.set_postfix_str(f"{ctx.label}: {method.name}")
                recs = evaluate_method(model, tokenizer, index, ctx, method, budgets, cfg=cfg,
                                       ref_logits=ref_logits, rows=rows, starts=starts)
                for r in recs:
                    r["index_s"] = index_s
                    r["index_cached"] = cached
                append_jsonl(results, recs)
                bar.update(len(recs))
    finally:
        bar.close()
    return read_jsonl(results)


def _bucket(n: int) -> int:
    from squeeze_jax.generate import batch_bucket

    return batch_bucket(n)


# ====================================================================================== fidelity study


@dataclasses.dataclass(frozen=True)
class RecordQueries:
    """Attention backend wrapper that adds the post-RoPE queries and the user's keys/values
    (`{"q": q_BTHqD, "k": k_BTHD, "v": v_BTHD}`) to the inner backend's aux."""

    inner: Any

    def __call__(self, q_BTHqD, k_BTHD, v_BTHD, layer_kv, lengths_B, seq_lens_B, positions_BT, layer_state):
        out, kv, aux = self.inner(q_BTHqD, k_BTHD, v_BTHD, layer_kv, lengths_B, seq_lens_B, positions_BT,
                                  layer_state)
        aux = dict(aux or {})
        aux.update({"q": q_BTHqD, "k": k_BTHD, "v": v_BTHD})
        return out, kv, aux


@dataclasses.dataclass(frozen=True)
class StudyContext:
    """A study prompt: exact-length context tokens and the user rows (question + answer, or continuation)."""

    label: str
    ids: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...]


def make_study_context(item: dict[str, Any], tokenizer) -> StudyContext:
    """`{"kind": passkey|needle|many_facts|..., "length", "seed"}` or `{"kind": "text", "length", "seed",
    "continuation": n}` (plain text: the user part is the next n tokens of the same text)."""
    kind, length, seed = item.get("kind"), int(item.get("length", 0)), int(item.get("seed", 0))
    if kind == "text":
        n_cont = int(item.get("continuation", 48))
        if n_cont < 1 or length < 256:
            raise ValueError(f"text study context needs length >= 256 and continuation >= 1, got {item}")
        hay = tasks.haystack_text()
        start = random.Random(2000 + seed).randrange(0, len(hay) // 2)
        text = hay[start:] + hay[:start]
        ids = tokenizer.encode(text[: 8 * (length + n_cont)])
        if len(ids) < length + n_cont:
            raise ValueError(f"the haystack is too short for {length} + {n_cont} tokens")
        return StudyContext(f"text-{length}-s{seed}", tuple(ids[:length]), (tuple(ids[length:length + n_cont]),))
    ctx = make_context(kind, length, seed, tokenizer, n_questions=int(item.get("n_questions", 1)),
                       options=item.get("options"))
    rows, _ = answer_rows(tokenizer, ctx.questions)
    return StudyContext(ctx.label, ctx.ids, tuple(tuple(r) for r in rows))


def dense_user_queries(model, index, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Post-RoPE queries `[L, B, T, Hq, D]` of the user rows run with dense attention over the context."""
    q, _, _, lens = dense_user_qkv(model, index, rows)
    return q, lens


def dense_user_qkv(model, index, rows: Sequence[Sequence[int]]):
    """(q `[L, B, T, Hq, D]`, k, v `[L, B, T, H, D]`, lengths) of the user rows run with dense attention."""
    dense = RecordQueries(MethodSpec.parse("dense").backend(1.0, False))
    _, lens, aux = metrics.teacher_forced_logits(model, rows, backend=dense,
                                                 backend_state=context_state(index, _bucket(len(rows)), 1.0),
                                                 position_offset=index.context_len)
    n = len(rows)
    return np.asarray(aux["q"])[:, :n], np.asarray(aux["k"])[:, :n], np.asarray(aux["v"])[:, :n], lens


def _layer_fidelity_impl(index, q_LBTHqD, k_LBTHD, v_LBTHD, cache_k_LBSHD, cache_v_LBSHD, lengths_B, seq_lens_B,
                         budget, *, backend):
    """Per-layer (recall, recall_total, out_rel_err, kept_fraction) of `backend`'s context selection for fixed
    queries; the user part attends the cache rows `[0, lengths_B)` plus the new keys `k_LBTHD`."""
    from models.kv_cache import LayerKV
    from squeeze_jax.attention.context import ContextState

    B, T = q_LBTHqD.shape[1:3]
    budget_B = jnp.full((B,), budget, jnp.float32)

    def one(xs):
        layer_index, q, k, v, ck, cv = xs
        _, _, aux = backend(q, k, v, LayerKV(ck, cv), lengths_B, seq_lens_B, jnp.zeros((B, T), jnp.int32),
                            ContextState(layer_index, budget_B))
        return aux["recall"], aux["recall_total"], aux["out_rel_err"], aux["kept_fraction"]

    return jax.lax.map(one, (index, q_LBTHqD, k_LBTHD, v_LBTHD, cache_k_LBSHD, cache_v_LBSHD))


_layer_fidelity = jax.jit(_layer_fidelity_impl, static_argnames=("backend",))


def selection_fidelity(index, q_LBTHqD: np.ndarray, seq_lens: np.ndarray, backend, budget: float,
                       mode: str, k_LBTHD: np.ndarray | None = None,
                       v_LBTHD: np.ndarray | None = None) -> dict[str, Any]:
    """Recall / output error per layer of a backend's selection for dense-run user queries.

    mode "prefill": each row's tokens share the selection of their query block (as in the user prefill);
    mode "decode": every token selects on its own (as in a decode step), with the row's earlier tokens cached.
    `recall` is the context-only attention-mass recall; with the user rows' keys/values `k_LBTHD`, `v_LBTHD`
    the result also holds `recall_total` (mass over context + user tokens; see attention/context.py).
    """
    q = jnp.asarray(q_LBTHqD)
    L, B, T, Hq, D = q.shape
    H = index.keys_LHND.shape[1]
    have_kv = k_LBTHD is not None and v_LBTHD is not None
    k = jnp.asarray(k_LBTHD) if have_kv else jnp.zeros((L, B, T, H, D), q.dtype)
    v = jnp.asarray(v_LBTHD) if have_kv else jnp.zeros((L, B, T, H, D), q.dtype)
    if mode == "decode":
        keep = [(b, t) for b in range(B) for t in range(int(seq_lens[b]))]
        n_pad = -(-len(keep) // 32) * 32  # a token-count bucket: one compilation for many prompts
        rows_b = np.asarray([b for b, _ in keep] + [keep[0][0]] * (n_pad - len(keep)))
        ts = np.asarray([t for _, t in keep] + [keep[0][1]] * (n_pad - len(keep)))
        q = q[:, rows_b, ts][:, :, None]  # [L, n_tokens, 1, Hq, D]
        cache_k, cache_v = k[:, rows_b], v[:, rows_b]  # the row's tokens; token t attends cache [0, t] only
        k, v = k[:, rows_b, ts][:, :, None], v[:, rows_b, ts][:, :, None]
        lengths = jnp.asarray(ts, jnp.int32)
        lens = jnp.asarray(np.arange(n_pad) < len(keep), jnp.int32)  # padding tokens weigh 0
    elif mode == "prefill":
        cache_k, cache_v = jnp.zeros_like(k), jnp.zeros_like(v)
        lengths = jnp.zeros((B,), jnp.int32)
        lens = jnp.asarray(seq_lens, jnp.int32)
    else:
        raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
    rec, tot, err, kept = _layer_fidelity(index, q, k, v, cache_k, cache_v, lengths, lens, jnp.float32(budget),
                                          backend=backend)
    rec, tot, err, kept = (np.asarray(x, np.float64) for x in (rec, tot, err, kept))
    out = {"recall": float(rec.mean()), "recall_per_layer": rec.tolist(), "out_rel_err": float(err.mean()),
           "out_rel_err_per_layer": err.tolist(), "kept_fraction": float(kept.mean())}
    if have_kv:
        out.update({"recall_total": float(tot.mean()), "recall_total_per_layer": tot.tolist()})
    return out


def centroid_reads(index, options: dict[str, Any]) -> float:
    """Metadata rows (one K row each) read per selection and KV head: all fine centroids (flat squeezed; two rows
    per cluster for the box score's 2D table, stored in the keys' dtype), or
    the coarse centroids plus the fine ones under the kept coarse clusters (hierarchical; estimated as keep
    fraction x fine), or Quest's per-page min and max keys (2 rows per page). The oracles and streaming
    read none (the oracles are unimplementable references)."""
    from squeeze_jax.attention.context import QUEST_PAGE

    policy = options.get("policy", "squeezed")
    if policy == "quest":
        return 2.0 * math.ceil(index.context_len / QUEST_PAGE)
    if policy != "squeezed":
        return 0.0
    C = float(index.n_clusters)
    if options.get("hierarchical") and index.hierarchical:
        keep = float(options.get("coarse_keep_fraction", 0.25))
        Cc = float(index.n_coarse)
        return Cc + C * max(1, round(keep * Cc)) / Cc
    return 2.0 * C if options.get("score", "box") == "box" else C  # the box table is 2D wide per cluster


def interpolate_at_bytes(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Recall at `target` bytes fraction by linear interpolation of (bytes, recall) points; None outside."""
    pts = sorted(points)
    if not pts or target < pts[0][0] or target > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= target <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
    return pts[-1][1]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The selection-fidelity study: variants (index + backend options) x contexts x budgets x modes."""

    name: str
    contexts: tuple[dict[str, Any], ...]
    variants: tuple[dict[str, Any], ...]
    budgets: tuple[float, ...]
    targets: tuple[float, ...]
    index: tuple[tuple[str, Any], ...] = ()
    modes: tuple[str, ...] = ("decode", "prefill")
    model: str = "smollm2-135m"
    goals: tuple[tuple[float, float], ...] = ()
    reference: str | None = None
    max_gap: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyConfig:
        known = {"name", "study", "contexts", "variants", "budgets", "targets", "index", "modes", "model",
                 "description", "goals", "reference", "max_gap"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"study config has unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        for field in ("name", "contexts", "variants", "budgets"):
            if not data.get(field):
                raise ValueError(f"study config lacks a non-empty {field!r}")
        budgets = tuple(sorted(float(b) for b in data["budgets"]))
        if any(not 0 < b <= 1 for b in budgets):
            raise ValueError(f"budgets must be in (0, 1], got {budgets}")
        variants = tuple(data["variants"])
        names = [v.get("name") for v in variants]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"variants need distinct non-empty names, got {names}")
        for v in variants:
            extra = set(v) - {"name", "index", "backend"}
            if extra:
                raise ValueError(f"variant {v['name']!r} has unknown fields {sorted(extra)}")
            bad = set(v.get("backend", {})) - set(BACKEND_OPTIONS)
            if bad:
                raise ValueError(f"variant {v['name']!r}: unknown backend options {sorted(bad)}")
        modes = tuple(data.get("modes", ("decode", "prefill")))
        if not modes or any(m not in ("decode", "prefill") for m in modes):
            raise ValueError(f"modes must be a subset of ('decode', 'prefill'), got {modes}")
        cfg = cls(name=str(data["name"]), contexts=tuple(data["contexts"]), variants=variants, budgets=budgets,
                  targets=tuple(float(t) for t in data.get("targets", (0.125, 0.0625))),
                  index=tuple(sorted(data.get("index", {}).items())), modes=modes,
                  model=str(data.get("model", "smollm2-135m")),
                  goals=tuple(sorted((float(k), float(v)) for k, v in data.get("goals", {}).items())),
                  reference=data.get("reference"),
                  max_gap=None if data.get("max_gap") is None else float(data["max_gap"]))
        if cfg.reference is not None and cfg.reference not in names:
            raise ValueError(f"reference {cfg.reference!r} is not one of the variants {names}")
        for v in variants:
            cfg.variant_index_config(v)
        return cfg

    def variant_index_config(self, variant: dict[str, Any]):
        from squeeze_jax.index import IndexConfig

        base = IndexConfig.load("default").to_dict()
        base.update({"budgets": list(self.budgets), "progress": False})  # calibrated at every study budget
        base.update(dict(self.index))
        base.update(variant.get("index", {}))
        return IndexConfig.from_dict(base)

    def variant_build_config(self, variant: dict[str, Any]):
        """The variant's IndexConfig with the calibration-only fields of the study's base config: indexes that
        differ only there share one K-means build and are recalibrated (`recalibrate_index`)."""
        from squeeze_jax.index.build import CALIBRATION_FIELDS

        base = self.variant_index_config({}).to_dict()
        cfg = self.variant_index_config(variant)
        return cfg.replace(**{f: base[f] for f in CALIBRATION_FIELDS if f not in ("budgets", "block_k")})


def run_fidelity_study(cfg: StudyConfig, out_dir: Path, *, cache_dir: Path | None = None, progress: bool = True,
                       model_bundle=None, log=print) -> dict[str, Any]:
    """Measure every variant's selection fidelity; rows are appended to `<out>/<name>.jsonl` (resumable),
    the summary goes to `<out>/<name>.json`, `.md` and `.png`. Indexes are cached under `cache_dir` (default
    `default_index_cache()`, the same keys as `run_eval`'s); variants differing only in calibration fields
    share one K-means build."""
    from squeeze_jax.attention.context import ContextAttention
    from squeeze_jax.index import build_index_from_kv, save_index, token_hash
    from squeeze_jax.index.build import recalibrate_index

    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir if cache_dir is not None else default_index_cache()
    rows_path = out_dir / f"{cfg.name}.jsonl"
    done = {(r["context"], r["variant"]) for r in read_jsonl(rows_path)}
    if model_bundle is None:
        from models.pretrained import load_pretrained

        model_bundle = load_pretrained(cfg.model)
    _, model, tokenizer = model_bundle
    from squeeze_jax.index import model_fingerprint

    fingerprint = model_fingerprint(model)
    from tqdm.auto import tqdm

    total = len(cfg.contexts) * len(cfg.variants)
    bar = tqdm(total=total, initial=len(done), desc=f"study {cfg.name}", unit="variant", disable=not progress,
               file=sys.stderr)
    try:
        for item in cfg.contexts:
            sctx = make_study_context(item, tokenizer)
            todo = [v for v in cfg.variants if (sctx.label, v["name"]) not in done]
            if not todo:
                continue
            cap = None
            indexes: dict[str, Any] = {}
            q_cache: dict[str, Any] = {}
            for v in todo:
                icfg = cfg.variant_index_config(v)
                bcfg = cfg.variant_build_config(v)
                ikey = json.dumps(icfg.to_dict(), sort_keys=True)
                bkey = json.dumps(bcfg.to_dict(), sort_keys=True)
                if bkey not in indexes:
                    bar.set_postfix_str(f"{sctx.label}: index for {v['name']}")
                    t0 = time.perf_counter()
                    path = index_cache_path(cache_dir, sctx.label, sctx.ids, bcfg, fingerprint) if cache_dir else None
                    built = _load_cached_index(path, fingerprint, sctx.ids)
                    if built is None:
                        cap = cap or _study_capture(model, sctx, cfg)
                        built = build_index_from_kv(cap.k_LHSD, cap.v_LHSD, _window_q(cap, bcfg), bcfg,
                                                    model_fingerprint=fingerprint,
                                                    context_token_hash=token_hash(np.asarray(sctx.ids, np.int32)))
                        if path is not None:
                            save_index(built, path, overwrite=True)
                    indexes[bkey] = (built, time.perf_counter() - t0)
                if ikey not in indexes:
                    cap = cap or _study_capture(model, sctx, cfg)
                    t0 = time.perf_counter()
                    recal, _ = recalibrate_index(indexes[bkey][0], _window_q(cap, icfg), icfg)
                    indexes[ikey] = (recal, indexes[bkey][1] + time.perf_counter() - t0)
                index, build_s = indexes[ikey]
                if "q" not in q_cache:
                    q_cache["q"] = dense_user_qkv(model, index, sctx.rows)
                q, k_user, v_user, lens = q_cache["q"]
                opts = {"policy": "squeezed"} | dict(v.get("backend", {}))
                backend = ContextAttention(max_budget=max(cfg.budgets), use_pallas=False, fidelity=True, **opts)
                bar.set_postfix_str(f"{sctx.label}: {v['name']}")
                c_reads = centroid_reads(index, opts)
                per_mode: dict[str, list[dict[str, Any]]] = {}
                for mode in cfg.modes:
                    pts = []
                    for b in cfg.budgets:
                        r = selection_fidelity(index, q, lens, backend, b, mode, k_user, v_user)
                        kept_keys = r["kept_fraction"] * index.context_len
                        r.update({"budget": b, "kept_keys": kept_keys, "centroid_reads": c_reads,
                                  "bytes_fraction": metrics.bytes_read_fraction(kept_keys, c_reads,
                                                                                index.context_len)})
                        pts.append(r)
                    per_mode[mode] = pts
                append_jsonl(rows_path, [{"context": sctx.label, "variant": v["name"], "options": opts,
                                          "index": dict(v.get("index", {})), "context_len": index.context_len,
                                          "n_clusters": int(index.n_clusters), "n_fixed": int(index.n_fixed),
                                          "index_build_s": build_s, "modes": per_mode}])
                bar.update(1)
    finally:
        bar.close()
    summary = summarize_study(cfg, read_jsonl(rows_path))
    (out_dir / f"{cfg.name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=_json_default))
    _write_study_outputs(cfg, summary, read_jsonl(rows_path), out_dir)
    return summary


def _write_study_outputs(cfg: StudyConfig, summary: dict[str, Any], rows: Sequence[dict[str, Any]],
                         out_dir: Path) -> None:
    """`<name>.md` (recall tables per context length, then the study report) and the plots."""
    from squeeze_jax.eval import plots, report, study_table

    (out_dir / f"{cfg.name}.md").write_text(study_table.length_tables_markdown(cfg, rows) + "\n"
                                            + report.study_markdown(summary))
    plots.plot_study(summary, out_dir / f"{cfg.name}.png")
    plots.plot_recall_vs_budget(rows, out_dir / f"{cfg.name}_recall_vs_budget.png", title=cfg.name)


def _load_cached_index(path: Path | None, fingerprint: str, ids: Sequence[int]):
    """The index saved at `path` for these tokens and model, or None (missing or unreadable)."""
    from squeeze_jax.index import IndexFormatError, load_index, token_hash

    if path is None or not path.is_dir():
        return None
    try:
        return load_index(path, expected_model_fingerprint=fingerprint,
                          expected_token_hash=token_hash(np.asarray(ids, np.int32)))
    except IndexFormatError:
        return None


def _study_capture(model, sctx: StudyContext, cfg: StudyConfig):
    """Dense capture of a study context with the largest window any variant calibrates on."""
    from squeeze_jax.index.capture import capture_context

    window = max(cfg.variant_index_config(v).window for v in cfg.variants)
    return capture_context(model, np.asarray(sctx.ids, np.int32), window=max(window, 1))


def _window_q(cap, icfg):
    """The captured window queries of the last `icfg.window` tokens (None: no calibration)."""
    if icfg.window < 1:
        return None
    return cap.q_window_LTHqD[:, cap.q_window_LTHqD.shape[1] - icfg.window:]


def _mean_or_none(xs: Sequence[float | None]) -> float | None:
    """Mean of the values when every one is present, else None."""
    return float(np.mean(xs)) if xs and all(x is not None for x in xs) else None


def summarize_study(cfg: StudyConfig, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over contexts per (variant, mode, budget), plus recall at the target key and byte budgets."""
    variants: dict[str, Any] = {}
    names = [v["name"] for v in cfg.variants]
    for name in names:
        vrows = [r for r in rows if r["variant"] == name]
        if not vrows:
            continue
        entry: dict[str, Any] = {"n_contexts": len(vrows), "options": vrows[0]["options"],
                                 "index": vrows[0]["index"], "modes": {}}
        for mode in cfg.modes:
            curve = []
            for b in cfg.budgets:
                pts = [p for r in vrows if mode in r["modes"] for p in r["modes"][mode] if abs(p["budget"] - b) < 1e-9]
                if not pts:
                    continue
                curve.append({
                    "budget": b,
                    "recall": float(np.mean([p["recall"] for p in pts])),
                    "recall_min_context": float(np.min([p["recall"] for p in pts])),
                    "recall_total": _mean_or_none([p.get("recall_total") for p in pts]),
                    "out_rel_err": float(np.mean([p["out_rel_err"] for p in pts])),
                    "kept_fraction": float(np.mean([p["kept_fraction"] for p in pts])),
                    "bytes_fraction": float(np.mean([p["bytes_fraction"] for p in pts])),
                    "recall_per_layer": np.mean([p["recall_per_layer"] for p in pts], axis=0).tolist(),
                })
            at_key = {str(t): next((c["recall"] for c in curve if abs(c["budget"] - t) < 1e-9), None)
                      for t in cfg.targets}
            pts = [(c["bytes_fraction"], c["recall"]) for c in curve]
            at_bytes = {str(t): interpolate_at_bytes(pts, t) for t in cfg.targets}
            entry["modes"][mode] = {"curve": curve, "recall_at_key_budget": at_key,
                                    "recall_at_bytes": at_bytes}
        variants[name] = entry
    return {"name": cfg.name, "budgets": list(cfg.budgets), "targets": list(cfg.targets), "modes": list(cfg.modes),
            "contexts": sorted({r["context"] for r in rows}), "variants": variants,
            "goals": {str(b): r for b, r in cfg.goals}, "reference": cfg.reference, "max_gap": cfg.max_gap}


# ===================================================================================================== CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squeeze-jax eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file or bundled name (configs/eval/<name>.json)")
    p.add_argument("--out", required=True, help="output directory (results.jsonl, report.md, plots)")
    p.add_argument("--cache-dir", help="where indexes are cached (default ~/.cache/squeeze_jax/eval_indexes)")
    p.add_argument("--report-only", action="store_true", help="only rewrite report and plots from the JSONL")
    p.add_argument("--no-progress", action="store_true")
    return p


def eval_main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run (or resume) the sweep or study of `--config`, then write the report and plots."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    data = load_config(args.config)
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else None
    t0 = time.perf_counter()
    if data.get("study") == "fidelity":
        scfg = StudyConfig.from_dict(data)
        if args.report_only:
            rows = read_jsonl(out / f"{scfg.name}.jsonl")
            summary = summarize_study(scfg, rows)
            (out / f"{scfg.name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
            _write_study_outputs(scfg, summary, rows, out)
        else:
            run_fidelity_study(scfg, out, cache_dir=cache, progress=not args.no_progress)
        print(f"study {scfg.name}: wrote {out / (scfg.name + '.md')} in {time.perf_counter() - t0:.1f} s")
        return 0
    if "study" in data:
        raise ValueError(f"unknown study {data['study']!r}; expected 'fidelity'")
    cfg = EvalConfig.from_dict(data)
    if args.report_only:
        records = read_jsonl(out / RESULTS_FILE)
        if not records:
            raise FileNotFoundError(f"no results in {out / RESULTS_FILE}")
    else:
        records = run_eval(cfg, out, cache_dir=cache, progress=not args.no_progress)
    from squeeze_jax.eval import plots, report

    names = [m.name for m in cfg.methods]
    report.write_report(records, out, title=cfg.name, methods=names)
    plots.plot_curves(report.comparable_records(records, names), out, methods=names)
    print(f"eval {cfg.name}: {len(records)} records, report {out / 'report.md'}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


__all__ = [
    "BUILTIN_METHODS",
    "Context",
    "EvalConfig",
    "MethodSpec",
    "RecordQueries",
    "StudyConfig",
    "TaskSpec",
    "answer_rows",
    "append_jsonl",
    "centroid_reads",
    "done_keys",
    "eval_main",
    "get_index",
    "interpolate_at_bytes",
    "load_config",
    "make_context",
    "pending_entries",
    "plan_entries",
    "read_jsonl",
    "run_eval",
    "run_fidelity_study",
    "selection_fidelity",
    "summarize_study",
]

if __name__ == "__main__":
    sys.exit(eval_main())
