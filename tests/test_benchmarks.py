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
