"""Shared machinery of the benchmark suite: shapes, fixtures' helpers, ``measure()``, the table.

The baselines (the hand-written numpy cache, the copy limit) and the
interleaved measuring loop are ``kvcache._benchkit``'s, which ``kvcache bench``
uses too.  Every benchmark compares the project ("proj") with one or more
baselines in the same run.  ``measure()`` drives pytest-benchmark's
``pedantic`` mode through ``_benchkit.Interleaved.pedantic``: pytest-benchmark
times one step of the project per round, and the baselines' steps are timed
(with the same clock) in the round's ``setup`` on even rounds and in its
``teardown`` on odd rounds, so the measurements go B A | A B | B A ... and a
slow phase of the shared machine hits both sides alike.  Medians of each side
give the ratio (baseline time / project time, i.e. >1 means the project is
faster).  Nothing is asserted about timings.

A "token" is one position's keys AND values for every layer:
32 layers x 8 heads x 128 dims x 4 bytes x 2 = 256 KiB.  Every benchmark
step moves a whole number of tokens, so tokens/s and GB/s (1 GB = 1e9 bytes,
bytes copied, counted once) describe the same quantity.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from kvcache._benchkit import (Arena, Interleaved, NumpyCache, Side, clock, gb_per_s, ratio,
                               reset_arenas, seconds, tokens_per_s)

N_LAYERS = 32
N_HEADS = 8
HEAD_DIM = 128
ROW_FLOATS = N_HEADS * HEAD_DIM
ROW_BYTES = ROW_FLOATS * 4  # one token, one layer, keys only: 4 KiB
TOKEN_BYTES = 2 * N_LAYERS * ROW_BYTES  # 256 KiB
MAX_SEQ_LEN = 4096  # positions per arena: 1 GiB for the cache, the numpy cache, the limit each

try:
    CORES = len(os.sched_getaffinity(0))
except AttributeError:  # pragma: no cover - not Linux
    CORES = os.cpu_count() or 1

# Seconds of measuring (all sides together) per benchmark, and bounds on rounds.
BUDGET_S = float(os.environ.get("KVCACHE_BENCH_BUDGET", "4.0"))
MIN_ROUNDS, MAX_ROUNDS = 15, 3000
WARMUP_ROUNDS = 3
ROUND_OVERHEAD_S = 60e-6  # pytest-benchmark's and the harness's own work per round

RESULTS: list[dict] = []  # rows for the terminal summary and results.json


def make_kv(tokens: int, seed: int = 0):
    """Random keys and values ``[n_layers, tokens, n_heads, head_dim]``, C-contiguous float32."""
    rng = np.random.default_rng(seed + tokens)
    shape = (N_LAYERS, tokens, N_HEADS, HEAD_DIM)
    return (rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(shape, dtype=np.float32))


# -- what gets filled ----------------------------------------------------------

class CacheArena(Arena):
    """The project's cache as what a side fills (the baselines' arenas are _benchkit's)."""

    def __init__(self, cache):
        self.cache = cache
        self.capacity = cache.config.max_seq_len

    def used(self):  # every benchmark fills all layers alike
        return max(self.cache.layer_len(0), self.cache.layer_len(N_LAYERS - 1))

    def reset(self):
        self.cache.reset()


NUMPY_COPY = "numpy copy"


def whole_context_sides(cache, numpy_cache: NumpyCache, n: int):
    """A step reading every layer's whole context (``n`` positions) into reused
    outputs ``(ko, vo)``: the cache's 32 ``get(l, 0, None, out=(ko, vo))`` calls,
    and the baseline's ``np.copyto`` of the same bytes from the numpy cache.
    Returns the two sides and the outputs."""
    ko = np.empty((n, N_HEADS, HEAD_DIM), np.float32)
    vo = np.empty_like(ko)
    out = (ko, vo)
    get = cache.get
    kc = [a[:n] for a in numpy_cache.k]
    vc = [a[:n] for a in numpy_cache.v]

    def proj():
        for l in range(N_LAYERS):
            get(l, 0, None, out=out)

    def numpy_copy():
        for l in range(N_LAYERS):
            np.copyto(ko, kc[l])
            np.copyto(vo, vc[l])

    return Side("kvcache", proj, n), Side(NUMPY_COPY, numpy_copy, n), out


def check_stored(cache, k, v, tokens):
    """The cache really holds the inputs (a benchmark of a no-op is worthless)."""
    n = cache.layer_len(N_LAYERS - 1)
    assert n >= tokens
    ko, vo = cache.get(N_LAYERS - 1, n - tokens, n)
    np.testing.assert_array_equal(ko, k[N_LAYERS - 1, -tokens:])
    np.testing.assert_array_equal(vo, v[N_LAYERS - 1, -tokens:])


# -- measuring (the loop is _benchkit's) ------------------------------------------

def measure(benchmark, *, name: str, proj: Side, baselines: list[Side],
            targets: Optional[dict] = None, budget_s: float = BUDGET_S,
            stat: str = "median", rounds: Optional[int] = None,
            token_bytes: int = TOKEN_BYTES) -> dict:
    """Time one step of ``proj`` per round with pytest-benchmark, and one step of
    every baseline in the same round, the order reversed every other round
    (``_benchkit.Interleaved.pedantic``).

    A timed sample is a single step (one decode step, one prefill chunk, ...),
    as an application calls it between other work: consecutive calls are never
    batched into one sample, so per-call costs (Python, waking threads) count.
    ``targets`` maps a baseline's name to the minimum ratio the issue asks for
    (reported, never asserted).  ``stat="mean"`` compares mean step times instead
    of medians: the amortized cost, for steps of which only some do extra work
    (a decode step that spills a block to disk every 256 positions).
    ``rounds`` fixes the number of measured rounds instead of sizing them from
    ``budget_s``.  ``token_bytes`` is the bytes a token moves, for benchmarks of
    another shape.  Returns the rows it records.
    """
    targets = targets or {}
    sides = [*baselines, proj]  # even rounds B.. A, odd rounds A ..B

    # Warm up (and size the run): a few rounds of every side, nothing recorded.
    reset_arenas(sides)
    t0 = clock()
    Interleaved(sides, warmup=3).run(3)
    round_s = (clock() - t0) / 3 + ROUND_OVERHEAD_S
    if rounds is None:
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / round_s)))
    reset_arenas(sides)

    if not Interleaved(sides, warmup=WARMUP_ROUNDS).pedantic(benchmark, proj, rounds):
        return {}  # --benchmark-disable: the step ran once, nothing was timed
    proj_s = seconds(proj, stat)
    info = benchmark.extra_info
    info.update({
        "tokens_per_step": proj.tokens,
        "bytes_per_step": proj.tokens * token_bytes,
        "rounds": rounds,
        "stat": stat,
        "proj_max_s": max(proj.times),
        f"proj_{stat}_s": proj_s,
        "proj_tokens_per_s": tokens_per_s(proj, stat),
        "proj_GBps": gb_per_s(proj, token_bytes, stat),
    })
    rows = []
    for b in baselines:
        b_s, b_gbps, r = seconds(b, stat), gb_per_s(b, token_bytes, stat), ratio(b, proj, stat)
        target = targets.get(b.name)
        info[f"{b.name}_{stat}_s"] = b_s
        info[f"{b.name}_GBps"] = b_gbps
        info[f"ratio_vs_{b.name}"] = r
        if target is not None:
            info[f"target_vs_{b.name}"] = target
            info[f"met_vs_{b.name}"] = r >= target
        row = {
            "benchmark": name,
            "test": benchmark.name,
            "tokens_per_step": proj.tokens,
            "tokens_per_s": info["proj_tokens_per_s"],
            "GBps": info["proj_GBps"],
            "baseline": b.name,
            "baseline_tokens_per_s": tokens_per_s(b, stat),
            "baseline_GBps": b_gbps,
            "ratio": r,
            "target": target,
            "met": None if target is None else r >= target,
            "rounds": rounds,
            "stat": stat,
            f"proj_{stat}_s": proj_s,
            f"baseline_{stat}_s": b_s,
        }
        RESULTS.append(row)
        rows.append(row)
    return {"rows": rows}


# -- the table -------------------------------------------------------------------

def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def format_table(rows: list[dict]) -> list[str]:
    head = ("benchmark", "tokens/s", "GB/s", "baseline", "base GB/s", "ratio", "target", "met?")
    body = []
    for r in rows:
        body.append((
            r["benchmark"], _si(r["tokens_per_s"]), f"{r['GBps']:.2f}", r["baseline"],
            f"{r['baseline_GBps']:.2f}", f"{r['ratio']:.2f}x",
            "-" if r["target"] is None else f">={r['target']:.2f}x",
            "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
        ))
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(b) for b in body]
    return lines
