"""Time the offline index build at Llama-3.1-8B shapes (32 layers x 8 KV heads x d128, 128K context).

Random keys (topic centres + noise), values and window queries are generated on the device, then
`build_index_from_kv_report` runs K-means (5% centroids, 20 iterations), the optional coarse level, the
cluster-ordered layout and the calibration, layer group by layer group. Writes
benchmarks/results/index_build_<device>.json: time per stage and per layer group, peak device memory.

    python benchmarks/bench_index_build.py                 # full size (GPU)
    python benchmarks/bench_index_build.py --small         # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from squeeze_jax.index.build import IndexConfig, build_index_from_kv_report, describe_report  # noqa: E402
from squeeze_jax.index.kmeans import resolve_impl  # noqa: E402


def _device_name() -> str:
    d = jax.local_devices()[0]
    kind = d.device_kind if d.platform != "cpu" else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def make_inputs(
    layers: int,
    kv_heads: int,
    q_heads: int,
    context: int,
    head_dim: int,
    window: int,
    seed: int,
    n_topics: int = 256,
):
    """bf16 keys with some cluster structure (topic centres + noise), values, and window queries."""
    key = jax.random.PRNGKey(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)

    @jax.jit
    def gen():
        centres = jax.random.normal(k1, (layers, kv_heads, n_topics, head_dim), jnp.float32) * 2.0
        topic = jax.random.randint(k2, (layers, kv_heads, context), 0, n_topics)
        noise = jax.random.normal(k3, (layers, kv_heads, context, head_dim), jnp.bfloat16)
        keys = jnp.take_along_axis(centres, topic[..., None], axis=2).astype(jnp.bfloat16) + noise
        values = jax.random.normal(k4, (layers, kv_heads, context, head_dim), jnp.bfloat16)
        q = jax.random.normal(k5, (layers, window, q_heads, head_dim), jnp.bfloat16) * 2.0
        return keys, values, q

    return gen()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--centroid-fraction", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layer-group", type=int, default=None)
    ap.add_argument(
        "--matmul-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 on GPU, float32 on CPU",
    )
    ap.add_argument(
        "--assign-impl",
        default="auto",
        choices=["auto", "xla", "pallas"],
        help="nearest-centroid pass: auto = fused Pallas kernel on GPU",
    )
    ap.add_argument("--tol", type=float, default=None, help="K-means tolerance (0 = always run --iters)")
    ap.add_argument("--hierarchical", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="builds to run; the last one is reported as warm")
    ap.add_argument(
        "--out", default=None, help="output JSON (default benchmarks/results/index_build_<device>.json)"
    )
    args = ap.parse_args(argv)
    if args.small:
        args.layers, args.kv_heads, args.q_heads, args.head_dim, args.context = 4, 2, 4, 32, 4096

    config = IndexConfig.load("default").replace(
        centroid_fraction=args.centroid_fraction,
        iters=args.iters,
        layer_group=args.layer_group,
        matmul_dtype=args.matmul_dtype,
        assign_impl=args.assign_impl,
        hierarchical=args.hierarchical,
        progress=True,
    )
    if args.tol is not None:
        config = config.replace(tol=args.tol)
    t = time.perf_counter()
    k, v, q = make_inputs(
        args.layers, args.kv_heads, args.q_heads, args.context, args.head_dim, config.window, 0
    )
    jax.block_until_ready((k, v, q))
    t_gen = time.perf_counter() - t

    runs = []
    for r in range(args.repeat):
        t = time.perf_counter()
        index, report = build_index_from_kv_report(k, v, q, config)
        jax.block_until_ready(index)
        total = time.perf_counter() - t
        runs.append(
            {"total_s": total, "stage_seconds": report.stage_seconds, "group_seconds": report.group_seconds}
        )
        print(f"build {r}: {total:.2f} s")
        print(describe_report(report))
        if r + 1 < args.repeat:
            del index

    device = _device_name()
    result = {
        "benchmark": "index_build",
        "device": device,
        "device_kind": jax.local_devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "shapes": {
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "q_heads": args.q_heads,
            "head_dim": args.head_dim,
            "context": args.context,
        },
        "config": config.to_dict(),
        "matmul_dtype": config.resolved_matmul_dtype(),
        "assign_impl": resolve_impl(config.assign_impl, args.head_dim),
        "n_clusters": report.n_clusters,
        "n_coarse": report.n_coarse,
        "layer_group": report.layer_group,
        "kmeans_chunk": report.kmeans_chunk,
        "kmeans_iters": report.kmeans_iters,
        "input_gen_s": t_gen,
        "total_s": runs[-1]["total_s"],
        "first_total_s": runs[0]["total_s"],
        "stage_seconds": runs[-1]["stage_seconds"],
        "group_seconds": runs[-1]["group_seconds"],
        "runs": runs,
        "peak_bytes_in_use": _peak_bytes(),
        "index_bytes": index.summary()["bytes"],
        "calibration": {k_: v_ for k_, v_ in report.calibration.items() if k_ != "kept_fraction_per_layer"},
        "small": args.small,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"index_build_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    peak = result["peak_bytes_in_use"]
    print(
        f"total {result['total_s']:.2f} s, peak memory {peak / 2**30:.2f} GiB"
        if peak
        else f"total {result['total_s']:.2f} s"
    )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
