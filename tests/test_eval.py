"""Evaluation harness: metrics against hand-computed values, resumable JSONL runs, configs, reports, and the
teacher-forced / selection-fidelity paths on a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import DenseAttention
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.llama import init_model
from squeeze_jax.eval import metrics, plots, report, runner
from squeeze_jax.index import IndexConfig, build_index

# ----------------------------------------------------------------------------------------------- metrics


def test_attention_recall_hand_computed():
    p = np.array([[0.5, 0.3, 0.2], [1.0, 1.0, 2.0]])  # second row unnormalised: mass 4
    kept = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_allclose(metrics.attention_recall(p, kept), [0.7, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.attention_recall(-p, kept)
    with pytest.raises(ValueError, match="positive attention mass"):
        metrics.attention_recall(np.zeros((1, 3)), kept[:1])


def test_output_rel_error_hand_computed():
    ref = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(metrics.output_rel_error(ref, np.array([[3.0, 5.0]])), [0.2])
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.output_rel_error(ref, np.zeros((1, 3)))


def test_kl_hand_computed():
    ref = np.log(np.array([[0.5, 0.25, 0.25]]))
    got = np.log(np.array([[0.25, 0.5, 0.25]]))
    want = 0.5 * math.log(2.0) + 0.25 * math.log(0.5)  # sum p log(p/q)
    np.testing.assert_allclose(metrics.kl_per_position(ref, got), [want], rtol=1e-12)
    # shifting logits by a constant changes nothing; KL of a distribution with itself is 0
    np.testing.assert_allclose(metrics.kl_divergence(ref + 7.0, got - 3.0), want, rtol=1e-12)
    assert metrics.kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-15)
    # masked mean over positions
    ref2 = np.concatenate([ref, ref])[None]  # [1, 2, 3]
    got2 = np.concatenate([got, ref])[None]
    assert metrics.kl_divergence(ref2, got2, np.array([[True, True]])) == pytest.approx(want / 2)
    assert metrics.kl_divergence(ref2, got2, np.array([[False, True]])) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="selects no position"):
        metrics.kl_divergence(ref2, got2, np.array([[False, False]]))
    with pytest.raises(ValueError, match="mask shape"):
        metrics.kl_divergence(ref2, got2, np.array([True, True]))


def test_top1_agreement_hand_computed():
    ref = np.array([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    got = np.array([[[0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0], [0.0, 9.0, 0.0]]])
    assert metrics.top1_agreement(ref, got) == pytest.approx(0.5)
    assert metrics.top1_agreement(ref, got, np.array([[True, False, True, False]])) == 1.0
    with pytest.raises(ValueError, match="logits shapes differ"):
        metrics.top1_agreement(ref, got[:, :2])


def test_position_masks_and_agreement():
    valid, answer = metrics.position_masks([5, 3], [3, 2], T=6)
    np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    # row 0: answer tokens at 3, 4 -> predicted by logits 2, 3; row 1: token 2 -> logit 1
    np.testing.assert_array_equal(answer, [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="answer_start"):
        metrics.position_masks([3], [4], T=6)
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 6, 5))
    out = metrics.logits_agreement(ref, ref.copy(), [5, 3], [3, 2])
    assert out["top1"] == 1.0 and out["top1_answer"] == 1.0
    assert out["kl"] == pytest.approx(0.0, abs=1e-12) and out["kl_answer"] == pytest.approx(0.0, abs=1e-12)


def test_answer_margins_hand_computed():
    # row 0: answer tokens [2, 0] predicted by positions 1, 2; row 1: answer token [1] predicted by position 0
    logits = np.full((2, 4, 3), -50.0)
    logits[0, 1] = [0.0, 0.0, np.log(3.0)]  # right token 2 at p=3/5 vs 1/5: margin log 3
    logits[0, 2] = [0.0, np.log(2.0), 0.0]  # right token 0 at 1/4 vs token 1 at 2/4: margin -log 2
    logits[1, 0] = [0.0, 1.0, 0.5]
    got = metrics.answer_margins(logits, [[5, 5, 2, 0], [7, 1]], [2, 1])
    assert got == pytest.approx([-np.log(2.0), 0.5])
    # a span that stops before the second answer token; an empty span has no margin
    assert metrics.answer_margins(logits, [[5, 5, 2, 0], [7, 1]], [2, 1], [3, 1]) == [pytest.approx(np.log(3.0)),
                                                                                     None]
    with pytest.raises(ValueError, match="answer span"):
        metrics.answer_margins(logits, [[5, 5]], [3])
    with pytest.raises(ValueError, match="rows"):
        metrics.answer_margins(logits, [[5, 5, 2]], [1, 2])


def test_answer_prefix_length():
    from tests.test_api import CharTokenizer

    tok = CharTokenizer()
    ids = tok.encode(" it is 4321.")
    assert metrics.answer_prefix_length(tok, ids, "4321") == len(" it is 4321")
    assert metrics.answer_prefix_length(tok, ids, "kiwi") == len(ids)
    assert metrics.answer_prefix_length(tok, [], "kiwi") == 0


def test_fidelity_summary_and_bytes():
    stats = {"prefill": {"recall": np.array([1.0, 0.5]), "out_rel_err": np.array([0.0, 0.2]),
                         "kept_fraction": np.array([0.125, 0.125])},
             "decode_mean": {"recall": np.array([0.9, 0.7])}}
    s = metrics.fidelity_summary(stats)
    assert s["prefill_recall"] == pytest.approx(0.75) and s["prefill_recall_per_layer"] == [1.0, 0.5]
    assert s["prefill_out_rel_err"] == pytest.approx(0.1) and s["prefill_kept_fraction"] == 0.125
    assert s["decode_recall"] == pytest.approx(0.8) and "decode_out_rel_err" not in s
    assert metrics.fidelity_summary({}) == {}
    # 100 keys kept of 1000 (K+V) plus 50 centroids (K only): (200 + 50) / 2000
    assert metrics.bytes_read_fraction(100, 50, 1000) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="context_len"):
        metrics.bytes_read_fraction(1, 0, 0)


def test_exact_match():
    assert metrics.exact_match(" 76048. Remember", "76048")
    assert not metrics.exact_match(" 76043.", "76048")
    with pytest.raises(ValueError, match="empty"):
        metrics.exact_match("x", " ")
    with pytest.raises(TypeError):
        metrics.exact_match(None, "1")


def test_interpolate_at_bytes():
    pts = [(0.1, 0.8), (0.2, 0.9)]
    assert runner.interpolate_at_bytes(pts, 0.15) == pytest.approx(0.85)
    assert runner.interpolate_at_bytes(pts, 0.05) is None


# ------------------------------------------------------------------------------------------------ configs


def test_smoke_and_full_configs_parse():
    smoke = runner.EvalConfig.from_dict(runner.load_config("smoke"))
    assert [m.name for m in smoke.methods] == ["dense", "squeezed"] and smoke.budgets == (0.125,)
    assert len(runner.plan_entries(smoke)) == 2
    icfg = smoke.index_config()
    assert icfg.budgets == (0.125,) and icfg.window == 28
    full = runner.EvalConfig.from_dict(runner.load_config("full"))
    assert {m.policy for m in full.methods} >= {"dense", "squeezed", "oracle", "oracle_key", "streaming",
                                                "quest", "random"}
    study = runner.StudyConfig.from_dict(runner.load_config("fidelity_smollm2"))
    assert study.variants[0]["name"] == "uniform" and study.variants[1]["backend"]["allocation"] == "calibrated"
    for name in ("fidelity_smollm2_7680", "fidelity_smollm2_index"):
        runner.StudyConfig.from_dict(runner.load_config(name))
    for seed in (0, 1, 2):
        answers = runner.EvalConfig.from_dict(runner.load_config(f"fidelity_answers_s{seed}"))
        assert answers.index_config().seed == seed and answers.budgets == (0.125, 0.0625)


def test_bad_configs_raise():
    base = runner.load_config("smoke")
    with pytest.raises(ValueError, match="unknown method"):
        runner.EvalConfig.from_dict({**base, "methods": ["nope"]})
    with pytest.raises(ValueError, match="budgets"):
        runner.EvalConfig.from_dict({**base, "budgets": [0.0]})
    with pytest.raises(ValueError, match="unknown task kind"):
        runner.EvalConfig.from_dict({**base, "tasks": [{"kind": "x", "lengths": [1024]}]})
    with pytest.raises(ValueError, match="unknown fields"):
        runner.EvalConfig.from_dict({**base, "extra": 1})
    with pytest.raises(ValueError, match="unknown IndexConfig"):
        runner.EvalConfig.from_dict({**base, "index": {"windowz": 3}})
    with pytest.raises(ValueError, match="unknown options"):
        runner.MethodSpec.parse({"name": "x", "policy": "squeezed", "blockk": 8})
    with pytest.raises(FileNotFoundError, match="bundled"):
        runner.load_config("no_such_config")


# ---------------------------------------------------------------------------------------- JSONL / resume


def _fake_record(task, length, seed, method, budget, **extra):
    return {"task": task, "length": length, "seed": seed, "method": method, "budget": budget,
            "context_len": length, "n_questions": 1, **extra}


def test_jsonl_resume_skips_finished_entries(tmp_path):
    cfg = runner.EvalConfig.from_dict(runner.load_config("smoke"))
    path = tmp_path / runner.RESULTS_FILE
    assert len(runner.pending_entries(cfg, path)) == 2
    runner.append_jsonl(path, [_fake_record("many_facts", 1216, 0, "dense", 0.125, em=np.float32(1.0))])
    with path.open("a") as f:
        f.write('{"task": "many_facts", "len')  # a torn line from an interrupted write
    pending = runner.pending_entries(cfg, path)
    assert [(e[3].name, e[4]) for e in pending] == [("squeezed", 0.125)]
    runner.append_jsonl(path, [_fake_record("many_facts", 1216, 0, "squeezed", 0.125, em=0.0)])
    assert runner.pending_entries(cfg, path) == []
    # a rerun with nothing pending returns the records without loading a model or building an index
    logs = []
    recs = runner.run_eval(cfg, tmp_path, model_bundle=None, progress=False, log=logs.append)
    assert len(recs) == 2 and "all 2 entries done" in logs[0]


def test_report_and_plots(tmp_path):
    recs = []
    for m, base in (("dense", 1.0), ("squeezed", 0.8), ("streaming", 0.5)):
        for b in (0.125, 0.0625):
            for seed in (0, 1):
                recs.append(_fake_record("passkey", 2048, seed, m, b, em=float(seed == 0 or m == "dense"),
                                         decode_recall=base * (1 if m == "dense" else 1 - b), kl=1 - base))
    rows = report.summary_rows(recs)
    sq = next(r for r in rows if r["method"] == "squeezed" and r["budget"] == 0.125)
    assert sq["em"] == 0.5 and sq["decode_recall"] == pytest.approx(0.7) and sq["n_contexts"] == 2
    md = report.report_markdown(recs, "t")
    assert "| squeezed | 1/8 | 0.50 |" in md and "passkey 2048" in md
    runner_out = report.write_report(recs, tmp_path, title="t")
    assert runner_out.is_file() and json.loads((tmp_path / "summary.json").read_text())
    made = plots.plot_curves(recs, tmp_path)
    assert {p.name for p in made} >= {"accuracy_vs_budget.png", "recall_vs_budget.png"}
    assert all(p.stat().st_size > 1000 for p in made)


# ----------------------------------------------------------------------------------------------- contexts


class _CharTokenizer:
    """One token per byte: enough to test exact-length contexts without the real tokenizer."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


@pytest.mark.parametrize("kind", ["passkey", "needle", "many_facts"])
def test_make_context_exact_length(kind):
    ctx = runner.make_context(kind, 3000, 1, _CharTokenizer(), n_questions=3)
    assert len(ctx.ids) == 3000
    again = runner.make_context(kind, 3000, 1, _CharTokenizer(), n_questions=3)
    assert again.ids == ctx.ids and again.questions == ctx.questions  # seeded, deterministic
    assert len(ctx.questions) == (3 if kind == "many_facts" else 1)
    text = _CharTokenizer().decode(ctx.ids)
    if kind != "many_facts":
        assert ctx.questions[0].answer in text
    with pytest.raises(ValueError, match=">= 256"):
        runner.make_context(kind, 100, 0, _CharTokenizer())


def test_answer_rows_mark_answer_start():
    tok = _CharTokenizer()
    from squeeze_jax.eval.tasks import Question

    rows, starts = runner.answer_rows(tok, [Question("What? It is", "42")])
    assert tok.decode(rows[0]) == " What? It is 42" and starts == [len(" What? It is")]


# ------------------------------------------------------------------------- tiny model: TF and selection


def _tiny_model():
    cfg = ModelConfig(name="tiny-eval", vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, ffn_dim=96, max_context=512)
    return init_model(cfg, 3)


@pytest.fixture(scope="module")
def tiny():
    model = _tiny_model()
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, 101, size=320).astype(np.int32)
    icfg = IndexConfig(centroid_fraction=0.1, iters=3, n_sink=4, window=12, budgets=(0.25,), hierarchical=True,
                       progress=False)
    index = build_index(model, ctx, icfg)
    rows = [list(rng.integers(3, 101, size=9)), list(rng.integers(3, 101, size=5))]
    return model, ctx, index, rows


def test_teacher_forced_dense_matches_full_forward(tiny):
    from flax import nnx

    from models.llama import apply

    model, ctx, index, rows = tiny
    dense = runner.MethodSpec.parse("dense").backend(1.0, False)
    logits, lens, _ = metrics.teacher_forced_logits(model, rows, backend=dense,
                                                    backend_state=runner.context_state(index, 2, 1.0),
                                                    position_offset=index.context_len)
    assert list(lens) == [9, 5]
    graphdef, state = nnx.split(model)
    for r, row in enumerate(rows):
        toks = np.concatenate([ctx, np.asarray(row, np.int32)])[None]
        T = toks.shape[1]
        cache = KVCache.init(model.config, 1, T)
        full, _, _ = apply(graphdef, state, jnp.asarray(toks), jnp.arange(T, dtype=jnp.int32)[None],
                           jnp.asarray([T], jnp.int32), cache, DenseAttention(), None, logits_mode="all")
        want = np.asarray(full[0, len(ctx):])
        np.testing.assert_allclose(logits[r, : len(row)], want, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="max_context"):
        metrics.teacher_forced_logits(model, rows, backend=dense, backend_state=runner.context_state(index, 2, 1.0),
                                      position_offset=500)


def test_selection_fidelity_bounds(tiny):
    model, _, index, rows = tiny
    q, lens = runner.dense_user_queries(model, index, rows)
    assert q.shape[:3] == (2, 2, 64)
    runs = {"dense": ("decode",), "oracle_key": ("decode", "prefill"), "squeezed": ("decode", "prefill"),
            "squeezed_hier": ("prefill",), "random": ("decode",)}
    out = {}
    for name, modes in runs.items():
        backend = runner.MethodSpec.parse(name).backend(0.25, True)
        for mode in modes:
            out[name, mode] = runner.selection_fidelity(index, q, lens, backend, 0.25, mode)
    assert out["dense", "decode"]["recall"] == pytest.approx(1.0, abs=1e-5)
    assert out["dense", "decode"]["out_rel_err"] == pytest.approx(0.0, abs=1e-4)
    for mode in ("decode", "prefill"):
        # the exact top-k keys hold the most mass a selection of that size can
        assert out["oracle_key", mode]["recall"] >= out["squeezed", mode]["recall"] - 1e-6
    assert out["squeezed", "decode"]["recall"] > out["random", "decode"]["recall"]
    assert 0.0 < out["squeezed_hier", "prefill"]["recall"] <= 1.0
    # key-granular policies select per token in both modes: the per-token (decode) reshaping gives the same
    np.testing.assert_allclose(out["oracle_key", "decode"]["recall_per_layer"],
                               out["oracle_key", "prefill"]["recall_per_layer"], rtol=1e-5)
    assert len(out["squeezed", "decode"]["recall_per_layer"]) == 2
    assert runner.centroid_reads(index, {"policy": "squeezed", "score": "mean"}) == index.n_clusters
    assert runner.centroid_reads(index, {"policy": "squeezed"}) == 2 * index.n_clusters  # box table: 2D wide
    assert runner.centroid_reads(index, {"policy": "oracle"}) == 0.0
    assert runner.centroid_reads(index, {"policy": "quest"}) == 2 * (320 // 16)


def test_study_summary_report_and_plot(tmp_path):
    data = {"name": "s", "study": "fidelity", "contexts": [{"kind": "text", "length": 1024}],
            "budgets": [0.0625, 0.125], "targets": [0.125, 0.0625], "modes": ["decode"],
            "goals": {"0.125": 0.8}, "reference": "ref", "max_gap": 0.05,
            "variants": [{"name": "base"}, {"name": "ref", "backend": {"policy": "oracle_key"}}]}
    cfg = runner.StudyConfig.from_dict(data)

    def row(ctx, variant, policy, recalls, centroids):
        pts = [{"budget": b, "recall": r, "recall_per_layer": [r, r], "out_rel_err": 1 - r, "kept_fraction": b,
                "bytes_fraction": metrics.bytes_read_fraction(b * 1000, centroids, 1000)}
               for b, r in zip(cfg.budgets, recalls)]
        return {"context": ctx, "variant": variant, "options": {"policy": policy}, "index": {},
                "modes": {"decode": pts}}

    rows = [row("a", "base", "squeezed", [0.70, 0.80], 50), row("b", "base", "squeezed", [0.72, 0.84], 50),
            row("a", "ref", "oracle_key", [0.80, 0.86], 0), row("b", "ref", "oracle_key", [0.80, 0.86], 0)]
    summary = runner.summarize_study(cfg, rows)
    base = summary["variants"]["base"]["modes"]["decode"]
    assert base["recall_at_key_budget"]["0.125"] == pytest.approx(0.82)
    # base bytes: 0.0625 + 0.025 = 0.0875 -> 0.71, 0.125 + 0.025 = 0.15 -> 0.82; at 0.125 bytes: linear
    assert base["recall_at_bytes"]["0.125"] == pytest.approx(0.71 + 0.11 * (0.125 - 0.0875) / 0.0625)
    assert base["recall_at_bytes"]["0.0625"] is None  # below the measured byte range
    md = report.study_markdown(summary)
    assert "best squeezed variant **base** recall 0.820" in md and "gap +0.040" in md and ": met" in md
    assert plots.plot_study(summary, tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="reference"):
        runner.StudyConfig.from_dict({**data, "reference": "nope"})


def test_smoke_config_end_to_end_on_a_tiny_model(tmp_path):
    """The smoke sweep (context, index, every method, teacher forcing, report, plots) with a tiny random model
    in place of the configured one; a rerun resumes with nothing left to do."""
    from tests.test_api import CharTokenizer

    cfg_model = ModelConfig(name="tiny-smoke", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn_dim=48, max_context=2048, eos_token_ids=(127,))
    bundle = (cfg_model, init_model(cfg_model, 0), CharTokenizer())
    cfg = runner.EvalConfig.from_dict(runner.load_config("smoke"))
    recs = runner.run_eval(cfg, tmp_path, cache_dir=tmp_path / "cache", progress=False, model_bundle=bundle,
                           log=lambda *_: None)
    assert sorted(r["method"] for r in recs) == ["dense", "squeezed"]
    dense = next(r for r in recs if r["method"] == "dense")
    assert dense["top1"] == 1.0 and dense["kl"] == pytest.approx(0.0, abs=1e-9) and dense["prefill_recall"] == 1.0
    squeezed = next(r for r in recs if r["method"] == "squeezed")
    assert 0.0 < squeezed["prefill_recall"] <= 1.0 and len(squeezed["answers"]) == squeezed["n_questions"] == 2
    # dense's own greedy answers: margins >= 0 (or None for an empty generation); other methods carry none
    assert len(dense["dense_margin"]) == 2 and all(m is None or m > -1e-3 for m in dense["dense_margin"])
    assert "dense_margin" not in squeezed
    assert runner.eval_main(["--config", "smoke", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "accuracy_vs_budget.png").is_file()
    assert len(runner.run_eval(cfg, tmp_path, model_bundle=None, progress=False, log=lambda *_: None)) == 2


def test_per_question_report_and_complete_contexts():
    def rec(method, budget, correct, seed=0):
        return _fake_record("many_facts", 4096, seed, method, budget, n_questions=3, em=float(np.mean(correct)),
                            correct=correct, expected=["7", "kiwi", "jazz"],
                            answers=[" 7.\n" if c else " no | way" for c in correct])

    recs = [rec("dense", b, [True, True, False]) for b in (0.125, 0.0625)]
    recs += [rec("squeezed", 0.125, [True, False, True]), rec("squeezed", 0.0625, [False, False, False])]
    recs.append(rec("dense", 0.125, [True, True, True], seed=1))  # a context not every method ran on yet
    assert report.complete_contexts(recs) == {("many_facts", 4096, 0)}
    assert {r["seed"] for r in report.comparable_records(recs)} == {0}
    assert report.kept_of_reference([True, False, True], [True, True, False]) == (1, 2)
    counts = report.answer_counts_table(recs)
    assert "| many_facts 4096 s0 | 2/3 | 2/3 (1/2) | 0/3 (0/2) |" in counts
    assert "| many_facts 4096 s1 | 3/3 | – | – |" in counts
    per_q = report.per_question_table(recs, ("many_facts", 4096, 0))
    assert "| 2 | kiwi | ✓ 7. | ✗ no \\| way | ✗ no \\| way |" in per_q
    md = report.report_markdown(recs, "t")
    assert "left out (not every method run yet): many_facts 4096 s1" in md and "Answers per question" in md
    # dense's right answer 2 ("kiwi") lost at 1/8; answers 1 and 2 lost at 1/16; margins shown when recorded
    lost = report.lost_answers_table(recs)
    assert lost.count("\n") == 1 + 3 and "| squeezed 1/8 | many_facts 4096 s0 | 2 | kiwi | no \\| way | – |" in lost
    for r in recs:
        r["dense_margin"] = [0.5, 0.031, 2.0]
    assert "| squeezed 1/16 | many_facts 4096 s0 | 1 | 7 | no \\| way | 0.50 |" in report.lost_answers_table(recs)
    assert "Answers dense got right and a method lost" in report.report_markdown(recs, "t")
    assert report.lost_answers_table([r for r in recs if r["method"] == "dense"]) is None
    with pytest.raises(ValueError, match="reference"):
        report.kept_of_reference([True], [True, False])


def test_every_bundled_config_parses():
    """Each shipped config (sweeps and studies) is valid and its methods build backends."""
    from configs import __file__ as configs_init

    names = sorted(p.stem for p in (Path(configs_init).parent / "eval").glob("*.json"))
    assert {"full", "many_facts", "many_facts_tail", "many_facts_check"} <= set(names)
    for name in names:
        data = runner.load_config(name)
        if data.get("study") == "fidelity":
            runner.StudyConfig.from_dict(data)
            continue
        cfg = runner.EvalConfig.from_dict(data)
        for method in cfg.methods:
            method.backend(max(cfg.budgets), fidelity=False)
