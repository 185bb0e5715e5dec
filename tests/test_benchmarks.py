"""The GPU benchmark runner in its CPU smoke mode (tiny shapes, interpret-mode kernels), so it cannot rot."""

from __future__ import annotations

import json

from benchmarks import run_all


def test_runner_smoke_writes_results_and_report(tmp_path):
    out, md = tmp_path / "smoke.json", tmp_path / "BENCH.md"
    assert run_all.main(["--smoke", "--sections", "e2e,breakdown,kernels", "--out", str(out), "--md", str(md)]) == 0
    result = json.loads(out.read_text())
    e2e = result["sections"]["e2e"]["rows"]
    methods = {r["method"] for r in e2e if "us" in r}
    assert {"dense_xla", "squeezed_flat", "squeezed_hier", "squeezed_box"} <= methods
    for r in e2e:
        if r["method"].startswith("squeezed"):
            assert r["selection_exact"] and r["rel_err_vs_ref"] < 2e-2, r
    stages = {r["method"] for r in result["sections"]["breakdown"]["rows"]}
    assert {"lookup_flat", "select_fused", "sparse_attention"} <= stages
    tail = [r for r in result["sections"]["kernels"]["rows"] if r.get("op") == "exact_tail"]
    assert tail and all("s" in r and r["rel_err_vs_ref"] < 1e-2 for r in tail), tail
    text = md.read_text()
    assert "Decode pipeline" in text and "select_fused" in text


def test_variant_timings_smoke(tmp_path):
    """The stage-variant profiler runs on CPU (interpret mode): every floor/select variant times without error."""
    import json

    from benchmarks import bench_variants

    out = tmp_path / "variants.json"
    assert bench_variants.main(["--smoke", "--sections", "floor,select,prior", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == {"floor", "select", "prior"}
    assert all("error" not in r and r["us"] > 0 for r in rows), rows


def test_model_decode_rows_smoke():
    """bench_e2e.model_rows (whole-model decode latency, dense vs squeezed) runs on CPU with a small preset."""
    from benchmarks import bench_e2e
    from benchmarks.timing import Budget

    rows = bench_e2e.model_rows(2048, 2, 0.125, 4, Budget(900), implementations=("xla",), preset="smollm2-135m")
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"dense_xla", "squeezed"}, rows
    assert all("error" not in r and r["ms_per_token"] > 0 for r in rows), rows
    assert by_method["dense_xla"]["speedup_vs_best_dense"] == 1.0


def test_decode_hlo_report_smoke(tmp_path):
    """benchmarks/decode_hlo.py compiles one whole-model decode step per backend on CPU and accounts for its
    launches: the layer loop's instructions count once per layer."""
    from benchmarks import decode_hlo

    out = tmp_path / "decode_hlo.json"
    assert decode_hlo.main(["--preset", "smollm2-135m", "--layers", "2", "--context", "2048", "--reps", "1",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "squeezed"]
    for r in rows:
        assert r["ms_per_step"] > 0 and sum(r["launches_per_step"].values()) > 0
        assert any(w["per_step"] == 2 for w in r["largest"]), r["largest"]  # inside the layer loop


def test_hlo_parser_weights_loop_bodies_by_trip_count():
    from benchmarks.decode_hlo import shape_bytes, summarize

    text = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %c = f32[4,8]{1,0} copy(%x)
  %v = f32[32]{0} bitcast(%c)
  %k = f32[4,8]{1,0} custom-call(%v), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %k)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]) parameter(0)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %f = bf16[2,2]{1,0} fusion(%a), kind=kLoop, calls=%fused
}

%fused (x: f32[4,8]) -> bf16[2,2] {
  %x = f32[4,8]{1,0} parameter(0)
  ROOT %s = bf16[2,2]{1,0} dynamic-slice(%x, %i, %j), dynamic_slice_sizes={2,2}
}
"""
    r = summarize(text, default_trips=7)
    assert r["launches_per_step"] == {"copy": 3, "custom-call:__gpu$xla.gpu.triton": 3, "compare": 3,
                                      "fusion:kLoop:dynamic-slice": 1}
    assert r["bytes_written_per_step"]["copy"] == 3 * 4 * 8 * 4
    copy_row = next(w for w in r["largest"] if w["name"] == "c")  # read through a bitcast
    assert copy_row["read_by_custom_call"] and copy_row["per_step"] == 3
    assert shape_bytes("(bf16[2,3], s32[5])") == 2 * 6 + 4 * 5
