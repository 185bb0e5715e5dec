"""Device-side timing shared by the benchmarks: chained calls inside one jit, medians, bandwidth ceilings.

A host-timed Python loop over a jitted call measures dispatch as much as the kernel (~10-20 us per call on a
GPU). Here `n` calls run back to back inside one `lax.fori_loop`, each call's input perturbed by the previous
call's output so nothing is hoisted, the loop unrolled so the per-iteration cost of the device loop is
amortised, and the same loop without the call is subtracted.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SMOKE = {"on": False}


def set_smoke(on: bool) -> None:
    """Smoke mode (CPU CI): every timing runs its loop twice, once, no unrolling; numbers are meaningless."""
    _SMOKE["on"] = bool(on)


class Budget:
    """Wall-clock budget for a whole run; later sections are skipped when it runs out."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of `fn()` (blocked until ready) over `reps` calls."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def device_time_stats(step: Callable[..., Any], args: tuple, est_s: float | None = None, reps: int = 5,
                      target_s: float = 0.05, unroll: int = 16,
                      base_step: Callable[..., Any] | None = None) -> dict:
    """Seconds per call of `step(i, x, *rest)` with `x = args[0]`, as chained iterations inside one jit.

    `x` is perturbed by the sum of the previous outputs (so the calls run back to back). The same loop with
    `step` replaced by `base_step` (default: identity on x; pass one doing the same input preparation, e.g.
    picking this iteration's rotated input) is subtracted. `est_s` (a guess of the call time) sets the loop
    length; None measures one call first.
    """
    if _SMOKE["on"]:
        reps, unroll, target_s, est_s = 1, 1, 0.0, 1.0
    if est_s is None:
        one = jax.jit(lambda *a: step(0, *a))
        jax.block_until_ready(one(*args))
        est_s = max(median_time(lambda: one(*args), 3) / 4, 1e-6)  # host timing overestimates small calls
    outer = int(min(50, max(2, target_s / max(est_s, 1e-6) / unroll)))
    n = outer * unroll

    def make(with_step: bool):
        def loop(*a):
            x0 = a[0]

            def body(i, c):
                x = jax.tree.map(lambda t: t + (c * 1e-30).astype(t.dtype), x0)
                if with_step:
                    out = step(i, x, *a[1:])
                else:
                    out = x if base_step is None else base_step(i, x, *a[1:])
                return c + sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out)) * 1e-6

            return lax.fori_loop(0, n, body, jnp.float32(0), unroll=unroll)

        return jax.jit(loop)

    run, base = make(True), make(False)
    jax.block_until_ready(run(*args))
    jax.block_until_ready(base(*args))
    t_run = median_time(lambda: run(*args), reps) / n
    t_base = median_time(lambda: base(*args), reps) / n
    return {"s": max(t_run - t_base, 1e-9), "raw_s": t_run, "loop_overhead_s": t_base, "iters": n}


def device_time(step: Callable[..., Any], args: tuple, **kw) -> float:
    """Seconds per call (see `device_time_stats`)."""
    return device_time_stats(step, args, **kw)["s"]


def torch_time(fn: Callable[[], Any], est_s: float, reps: int = 5, min_calls: int = 8, warmup: int = 3) -> float:
    """Seconds per call of a torch CUDA function, timed with CUDA events over a batch of calls (batch sized
    from the estimate `est_s`, at least `min_calls`)."""
    import torch

    n = int(min(400, max(min_calls, 0.05 / max(est_s, 1e-6))))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / n)
    return statistics.median(ts)


def copy_and_read_bandwidth(gib: float = 1.0) -> tuple[float, float]:
    """(copy, read) bandwidth in bytes/s: an elementwise pass over `gib` GiB of bf16 (read + write) and a sum."""
    n = int(gib * (1 << 30) / 2)
    x = jnp.ones((n // (1 << 20), 1 << 20), jnp.bfloat16)
    f = jax.jit(lambda x: lax.fori_loop(0, 20, lambda i, y: y + jnp.bfloat16(1), x), donate_argnums=0)
    x = jax.block_until_ready(f(x))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        ts.append((time.perf_counter() - t0) / 20)
    copy = 2 * x.size * 2 / statistics.median(ts)

    def rd(x):
        return lax.fori_loop(0, 20, lambda i, c: c + jnp.sum(x + c.astype(x.dtype), dtype=jnp.float32) * 1e-9,
                             jnp.float32(0))

    g = jax.jit(rd)
    jax.block_until_ready(g(x))
    read = x.size * 2 / (median_time(lambda: g(x), 5) / 20)
    return copy, read


def read_bandwidth() -> float:
    """Measured read bandwidth in bytes/s (see `copy_and_read_bandwidth`)."""
    return copy_and_read_bandwidth()[1]


def matmul_rate(n: int = 8192) -> float:
    """Measured bf16 matmul rate in FLOP/s (an n x n x n product chained 10 times)."""
    a = jnp.ones((n, n), jnp.bfloat16) * 0.001

    def loop(a):
        return lax.fori_loop(0, 10, lambda i, x: (x @ a).astype(jnp.bfloat16), a)

    f = jax.jit(loop)
    jax.block_until_ready(f(a))
    return 10 * 2 * n ** 3 / median_time(lambda: f(a), 5)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def device_info() -> dict:
    """Device kind, platform and software versions for a results file."""
    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version()}


def device_slug() -> str:
    """A file-name-safe short name of the device, e.g. 'h100' or 'cpu'."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    words = [w for w in dev.device_kind.split() if w.upper() not in ("NVIDIA", "TESLA")] or ["gpu"]
    return "".join(ch for ch in words[0].lower() if ch.isalnum())
