"""What one whole-model decode step runs once compiled: kernels, fusions and the copies XLA adds around them.

The model scans one layer body over stacked `[L, ...]` arrays (weights, the KV cache, the context index), so each
layer's slice reaches the attention kernels through a dynamic slice. A Pallas kernel is a custom call that reads its
operands from buffers: where the compiler cannot hand it a slice of a larger buffer, it copies the slice first, every
layer of every step. This script compiles one decode step of a random-weight model (`models.llama.apply`, one token)
with a dense or a squeezed backend, walks the optimised HLO (the entry and every loop body, weighted by the loop's
trip count), and reports per step: launches by kind, bytes written by each kind, and the largest writers, with
whether a custom call reads them. It also times the step (the median of repeated jitted calls). On a GPU the
table says whether the context index or the KV cache is copied per layer; on a CPU (smoke test) the kernels run as
their jnp references and the HLO is XLA:CPU's.

    PYTHONPATH=. python3 benchmarks/decode_hlo.py --context 131072 --layers 4 --out benchmarks/results/decode_hlo.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import device_info

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_COND = re.compile(r"\bcondition=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+), "
                       r"false_computation=%?([\w.\-]+))")
_OPERANDS = re.compile(r"%([\w.\-]+)")
# instructions that launch nothing (views, tuples, parameters, constants)
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id",
         "while", "conditional", "call", "opt-barrier", "add-dependency"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (an array, or a tuple of arrays)."""
    return sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _ARRAY.findall(shape))


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    shape: str
    operands: list[str]
    line: str
    root: bool = False


def parse_hlo(text: str) -> dict[str, list[Instr]]:
    """Computations of an HLO module text: name -> its instructions (the entry is named "ENTRY")."""
    comps: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and not line.lstrip().startswith("HloModule"):
                current = "ENTRY" if m.group(1) else m.group(2)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            args = m.group(5).split("), ")[0]
            comps[current].append(Instr(m.group(2), m.group(4), m.group(3), _OPERANDS.findall(args), line,
                                        root=bool(m.group(1))))
    return comps


def executed(comps: dict[str, list[Instr]], default_trips: int) -> list[tuple[Instr, int]]:
    """Every instruction of the entry and of the computations control flow reaches (loop bodies and conditions,
    conditional branches), with how often it runs per call: a loop body's count is its known trip count
    (`default_trips` when the compiler did not annotate one). Fused computations are not walked: a fusion is one
    launch."""
    out: list[tuple[Instr, int]] = []
    stack = [("ENTRY", 1)]
    seen: set[tuple[str, int]] = set()
    while stack:
        name, times = stack.pop()
        if (name, times) in seen or name not in comps:
            continue
        seen.add((name, times))
        for ins in comps[name]:
            out.append((ins, times))
            if ins.opcode == "while":
                trip = _TRIP.search(ins.line)
                n = int(trip.group(1)) if trip else default_trips
                for rx in (_BODY, _COND):
                    m = rx.search(ins.line)
                    if m:
                        stack.append((m.group(1), times * n))
            elif ins.opcode == "conditional":
                m = _BRANCHES.search(ins.line)
                if m:
                    names = m.group(1).split(",") if m.group(1) else [m.group(2), m.group(3)]
                    stack += [(b.strip().lstrip("%"), times) for b in names]
    return out


def _kernel_operands(comps: dict[str, list[Instr]]) -> set[str]:
    """Names of the instructions whose buffers custom calls read, looking through views (bitcasts, tuple
    elements) to the instruction that wrote the buffer."""
    by_name = {i.name: i for body in comps.values() for i in body}
    todo = [op for body in comps.values() for i in body if i.opcode == "custom-call" for op in i.operands]
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        ins = by_name.get(name)
        if ins is not None and ins.opcode in ("bitcast", "get-tuple-element"):
            todo += ins.operands
    return found


def summarize(text: str, default_trips: int, top: int = 12) -> dict:
    """Launches and bytes written per step by kind, and the largest writers (custom-call readers marked)."""
    comps = parse_hlo(text)
    roots = {name: next((i.opcode for i in body if i.root), "?") for name, body in comps.items()}
    runs = [(i, n) for i, n in executed(comps, default_trips) if i.opcode not in _FREE]
    read_by_kernel = _kernel_operands(comps)
    launches: Counter = Counter()
    written: defaultdict = defaultdict(int)
    rows = []
    for ins, n in runs:
        kind = ins.opcode
        if kind == "fusion":  # with its fused computation's root: a `dynamic-slice` root is a copied slice
            m = re.search(r"kind=(k\w+)", ins.line)
            called = re.search(r"calls=%?([\w.\-]+)", ins.line)
            kind = f"fusion:{m.group(1) if m else '?'}:{roots.get(called.group(1), '?') if called else '?'}"
        elif kind == "custom-call":
            m = re.search(r'custom_call_target="([^"]+)"', ins.line)
            kind = f"custom-call:{m.group(1) if m else '?'}"
        b = shape_bytes(ins.shape)
        launches[kind] += n
        written[kind] += b * n
        rows.append({"name": ins.name, "kind": kind, "bytes": b, "per_step": n, "bytes_per_step": b * n,
                     "read_by_custom_call": ins.name in read_by_kernel, "shape": ins.shape[:120]})
    rows.sort(key=lambda r: -r["bytes_per_step"])
    return {"launches_per_step": dict(launches), "bytes_written_per_step": dict(written),
            "largest": rows[:top]}


def _squeezed_state(model, context: int, keep: float, backend, seed: int = 0):
    """A context index over random keys and values of the model's shapes (the HLO and the time do not depend on
    the values), and the backend's state for one request."""
    from squeeze_jax.attention.context import ContextState
    from squeeze_jax.index import IndexConfig, build_index_from_kv

    cfg = model.config
    key = jax.random.key(seed)
    shape = (cfg.n_layers, cfg.n_kv_heads, context, cfg.head_dim)
    k = jax.random.normal(key, shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
    q = jax.random.normal(jax.random.fold_in(key, 2), (cfg.n_layers, 64, cfg.n_heads, cfg.head_dim), jnp.bfloat16)
    index = build_index_from_kv(k, v, q, IndexConfig(budgets=(keep,), window=64, iters=3, progress=False))
    return ContextState.for_backend(index, jnp.full((cfg.n_layers, 1), keep, jnp.float32), backend)


def decode_step_report(preset: str, n_layers: int, context: int, method: str, keep: float, user: int,
                       reps: int) -> dict:
    """Compile one decode step (one token, batch 1) of a random-weight `preset` with `n_layers` layers and report
    `summarize` of its HLO and its median time. `method`: "dense" (the KV cache holds context + user tokens,
    cuDNN on the GPU, XLA elsewhere) or "squeezed" (an index of `context` keys, `user` tokens in the cache)."""
    from flax import nnx

    from models.attention import DenseAttention
    from models.config import load_preset
    from models.kv_cache import KVCache
    from models.llama import apply, init_model
    from squeeze_jax.attention.context import ContextAttention

    cfg = dataclasses.replace(load_preset(preset), n_layers=n_layers, max_context=max(context + 2 * user, 4096))
    model = init_model(cfg, 0, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    if method == "dense":
        backend = DenseAttention(implementation="cudnn" if jax.default_backend() == "gpu" else "xla")
        state, filled, offset = None, context + user, 0
    elif method == "squeezed":
        backend = ContextAttention(policy="squeezed", max_budget=keep)
        state, filled, offset = _squeezed_state(model, context, keep, backend), user, context
    else:
        raise ValueError(f"method must be 'dense' or 'squeezed', got {method!r}")
    cache = KVCache.init(cfg, 1, -(-(filled + 1) // 64) * 64, jnp.bfloat16)
    cache = dataclasses.replace(cache, lengths_B=jnp.full((1,), filled, jnp.int32))

    def step(params, cache, state, token_B1):
        positions = offset + cache.lengths_B[:, None]
        logits, cache, _ = apply(graphdef, params, token_B1, positions, jnp.ones((1,), jnp.int32), cache, backend,
                                 state, logits_mode="last")
        return jnp.argmax(logits, -1).astype(jnp.int32)[:, None], cache

    fn = jax.jit(step, donate_argnums=(1,))
    token = jnp.ones((1, 1), jnp.int32)
    compiled = fn.lower(params, cache, state, token).compile()
    report = summarize(compiled.as_text(), n_layers)
    times = []
    for _ in range(reps + 1):  # the first call is a warm-up; the cache is donated and handed back
        t0 = time.perf_counter()
        token, cache = jax.block_until_ready(fn(params, cache, state, token))
        times.append(time.perf_counter() - t0)
    return {"method": method, "preset": preset, "layers": n_layers, "context": context, "user": user,
            "keep": keep if method == "squeezed" else 1.0, "ms_per_step": 1e3 * float(np.median(times[1:])),
            **report}


def _print(r: dict) -> None:
    print(f"\n{r['method']}: {r['ms_per_step']:.3f} ms per step ({r['preset']} x{r['layers']} layers, context "
          f"{r['context']}, keep {r['keep']})")
    print(f"{'kind':<44} {'launches/step':>13} {'MB written/step':>16}")
    for kind, n in sorted(r["launches_per_step"].items(), key=lambda kv: -r["bytes_written_per_step"][kv[0]]):
        print(f"{kind:<44} {n:>13} {r['bytes_written_per_step'][kind] / 1e6:>16.2f}")
    print("largest writers (x per step, MB each, read by a custom call):")
    for row in r["largest"]:
        print(f"  {row['name']:<40} {row['kind']:<28} x{row['per_step']:<4} {row['bytes'] / 1e6:>10.2f} "
              f"{'yes' if row['read_by_custom_call'] else ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--user", type=int, default=64, help="user tokens already in the cache")
    ap.add_argument("--keep", type=float, default=0.125)
    ap.add_argument("--methods", default="dense,squeezed")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for method in args.methods.split(","):
        rows.append(decode_step_report(args.preset, args.layers, args.context, method, args.keep, args.user,
                                       args.reps))
        _print(rows[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_info(), "rows": rows}, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
