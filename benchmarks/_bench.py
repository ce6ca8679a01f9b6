"""Shared machinery of the benchmark suite: shapes, baselines, the interleaving harness.

Every benchmark compares the project ("proj") with one or more baselines in
the same run.  ``measure()`` drives pytest-benchmark's ``pedantic`` mode:
pytest-benchmark times one step of the project per round, and the baselines' steps are
timed (with the same clock) in the round's ``setup`` on even rounds and in
its ``teardown`` on odd rounds, so the measurements go B A | A B | B A ...
and a slow phase of the shared machine hits both sides alike.  Medians of
each side give the ratio (baseline time / project time, i.e. >1 means the
project is faster).  Nothing is asserted about timings.

A "token" is one position's keys AND values for every layer:
32 layers x 8 heads x 128 dims x 4 bytes x 2 = 256 KiB.  Every benchmark
step moves a whole number of tokens, so tokens/s and GB/s (1 GB = 1e9 bytes,
bytes copied, counted once) describe the same quantity.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

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

clock = time.perf_counter  # pytest-benchmark's default timer too


def make_kv(tokens: int, seed: int = 0):
    """Random keys and values ``[n_layers, tokens, n_heads, head_dim]``, C-contiguous float32."""
    rng = np.random.default_rng(seed + tokens)
    shape = (N_LAYERS, tokens, N_HEADS, HEAD_DIM)
    return (rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(shape, dtype=np.float32))


# -- what gets filled ----------------------------------------------------------

class Arena:
    """Something a side appends to, with ``capacity`` positions; reset when full."""

    capacity: int

    def used(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class CacheArena(Arena):
    def __init__(self, cache):
        self.cache = cache
        self.capacity = cache.config.max_seq_len

    def used(self):  # every benchmark fills all layers alike
        return max(self.cache.layer_len(0), self.cache.layer_len(N_LAYERS - 1))

    def reset(self):
        self.cache.reset()


class NumpyCache(Arena):
    """The hand-written baseline: preallocated per-layer arrays, slice assignment."""

    def __init__(self, capacity: int = MAX_SEQ_LEN):
        self.capacity = capacity
        self.k = [np.empty((capacity, N_HEADS, HEAD_DIM), np.float32) for _ in range(N_LAYERS)]
        self.v = [np.empty((capacity, N_HEADS, HEAD_DIM), np.float32) for _ in range(N_LAYERS)]
        for a in self.k + self.v:  # commit every page now, like the cache's prefault
            a.fill(0)
        self.pos = 0

    def used(self):
        return self.pos

    def reset(self):
        self.pos = 0

    def store_batch(self, ks, vs, t):
        """Append ``t`` tokens; ``ks[l]`` / ``vs[l]`` are ``[t, H, D]`` views."""
        p = self.pos
        kc, vc = self.k, self.v
        for l in range(N_LAYERS):
            kc[l][p:p + t] = ks[l]
            vc[l][p:p + t] = vs[l]
        self.pos = p + t

    def store_one(self, ks, vs):
        """Append one token; ``ks[l]`` / ``vs[l]`` are ``[H, D]``."""
        p = self.pos
        kc, vc = self.k, self.v
        for l in range(N_LAYERS):
            kc[l][p] = ks[l]
            vc[l][p] = vs[l]
        self.pos = p + 1


class LimitBuffer(Arena):
    """The limit: ``np.copyto`` of the same bytes into the next fresh region of one
    preallocated buffer as large as the cache's arenas (so the destination is not
    the same cache-hot 256 KiB every step)."""

    def __init__(self, capacity: int = MAX_SEQ_LEN):
        self.capacity = capacity
        self.buf = np.empty(capacity * TOKEN_BYTES // 4, np.float32)
        self.buf.fill(0)
        self.pos = 0

    def used(self):
        return self.pos

    def reset(self):
        self.pos = 0

    def store(self, kflat, vflat, t):
        """Copy ``t`` tokens' keys then values (``kflat``/``vflat`` 1-D, contiguous)."""
        n = kflat.shape[0]
        off = self.pos * (TOKEN_BYTES // 4)
        np.copyto(self.buf[off:off + n], kflat)
        np.copyto(self.buf[off + n:off + 2 * n], vflat)
        self.pos += t


LIMIT = "limit (np.copyto)"


def limit_side(limit: LimitBuffer, k, v, tokens) -> Side:
    """The limit's side for a step storing ``k``, ``v`` ``[n_layers, T, H, D]``."""
    kflat, vflat = k.reshape(-1), v.reshape(-1)
    assert kflat.base is not None and vflat.base is not None  # views, no copy
    return Side(LIMIT, lambda: limit.store(kflat, vflat, tokens), tokens, limit)


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


# -- the harness -----------------------------------------------------------------

@dataclass
class Side:
    """One contestant: ``step()`` moves ``tokens`` tokens into ``arena`` (if any);
    ``enter``/``exit`` run around each timed step, outside the timing (e.g. to force
    a SIMD path or a thread count)."""

    name: str
    step: Callable[[], None]
    tokens: int
    arena: Optional[Arena] = None
    enter: Optional[Callable[[], None]] = None
    exit: Optional[Callable[[], None]] = None
    times: list = field(default_factory=list)  # seconds per step, one per measured round


def _time_once(side: Side) -> float:
    if side.enter:
        side.enter()
    t0 = clock()
    side.step()
    dt = clock() - t0
    if side.exit:
        side.exit()
    return dt


def _ensure_room(sides):
    """Reset (outside the timing) every arena that cannot take one more round."""
    need: dict[int, list] = {}
    for s in sides:
        if s.arena is not None:
            need.setdefault(id(s.arena), [s.arena, 0])[1] += s.tokens
    for arena, n in need.values():
        if n > arena.capacity:
            raise ValueError(f"a round needs {n} positions but the arena holds {arena.capacity}")
        if arena.used() + n > arena.capacity:
            arena.reset()


def _reset_all(sides):
    for s in sides:
        if s.arena is not None:
            s.arena.reset()


def measure(benchmark, *, name: str, proj: Side, baselines: list[Side],
            targets: Optional[dict] = None, budget_s: float = BUDGET_S,
            stat: str = "median", rounds: Optional[int] = None,
            token_bytes: int = TOKEN_BYTES) -> dict:
    """Time one step of ``proj`` per round with pytest-benchmark, and one step of
    every baseline in the same round, alternating which goes first.

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
    summarize = {"median": statistics.median, "mean": statistics.fmean}[stat]
    sides = [proj, *baselines]

    # Warm up (and size the run): a few steps of each side.
    _reset_all(sides)
    t0 = clock()
    for _ in range(3):
        _ensure_room(sides)
        for s in sides:
            _time_once(s)
    round_s = (clock() - t0) / 3 + ROUND_OVERHEAD_S
    if rounds is None:
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / round_s)))
    _reset_all(sides)

    state = {"round": -1}
    for b in baselines:
        b.times.clear()

    def run_baselines():
        r = state["round"]
        for b in (baselines if r % 4 < 2 else baselines[::-1]):
            dt = _time_once(b)
            if r >= WARMUP_ROUNDS:
                b.times.append(dt)

    def setup():  # even rounds: baselines, then the project
        state["round"] += 1
        _ensure_room(sides)
        if state["round"] % 2 == 0:
            run_baselines()
        if proj.enter:
            proj.enter()

    def teardown():  # odd rounds: the project, then the baselines
        if proj.exit:
            proj.exit()
        if state["round"] % 2 == 1:
            run_baselines()

    benchmark.pedantic(proj.step, setup=setup, teardown=teardown,
                       rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return {}
    proj_s = getattr(stats.stats, stat)
    nbytes = proj.tokens * token_bytes
    info = benchmark.extra_info
    info.update({
        "tokens_per_step": proj.tokens,
        "bytes_per_step": nbytes,
        "rounds": rounds,
        "stat": stat,
        "proj_max_s": stats.stats.max,
        f"proj_{stat}_s": proj_s,
        "proj_tokens_per_s": proj.tokens / proj_s,
        "proj_GBps": nbytes / proj_s / 1e9,
    })
    rows = []
    for b in baselines:
        b_s = summarize(b.times)
        ratio = b_s / proj_s
        target = targets.get(b.name)
        info[f"{b.name}_{stat}_s"] = b_s
        info[f"{b.name}_GBps"] = b.tokens * token_bytes / b_s / 1e9
        info[f"ratio_vs_{b.name}"] = ratio
        if target is not None:
            info[f"target_vs_{b.name}"] = target
            info[f"met_vs_{b.name}"] = ratio >= target
        row = {
            "benchmark": name,
            "test": benchmark.name,
            "tokens_per_step": proj.tokens,
            "tokens_per_s": proj.tokens / proj_s,
            "GBps": nbytes / proj_s / 1e9,
            "baseline": b.name,
            "baseline_tokens_per_s": b.tokens / b_s,
            "baseline_GBps": b.tokens * token_bytes / b_s / 1e9,
            "ratio": ratio,
            "target": target,
            "met": None if target is None else ratio >= target,
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
