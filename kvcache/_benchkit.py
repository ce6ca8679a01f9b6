"""The benchmark harness of ``kvcache bench`` and of the ``benchmarks/`` suite.

This module owns what both report their figures against, so that there is
one copy of it:

* the two **baselines**: `NumpyCache`, the cache one would write by hand
  (preallocated per-layer arrays, slice assignment), and `CopyLimit`, the
  copy limit (``np.copyto`` of the same bytes into the next fresh region of
  one preallocated, faulted-in buffer);
* the **interleaved measuring loop**: `Interleaved` runs one step of every
  `Side` per round, the last side (the project) after the others on even
  rounds and before them on odd ones (B A | A B | B A ...), so that a slow
  phase of a shared machine hits every side alike.  It times the steps itself
  (`Interleaved.run`, used by the command) or leaves the project's timing to
  pytest-benchmark's pedantic mode (`Interleaved.pedantic`, used by the
  suite);
* the **statistics**: `seconds` (median, or mean, of a side's step times),
  `tokens_per_s`, `gb_per_s` and `ratio` (baseline time per token / project
  time per token: above 1, the project is faster).

A "token" is one position's keys and values for every layer, so tokens/s
and GB/s describe the same quantity.  Nothing here asserts a timing.

Only numpy is imported.  pytest-benchmark is driven through the fixture
object it hands a benchmark, never imported.  ``import kvcache`` does not
import this module; ``kvcache.cli`` imports it for ``bench``.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Dict, List
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LIMIT", "STATS", "Arena", "CopyLimit", "Interleaved", "NumpyCache", "Side",
           "clock", "gb_per_s", "ratio", "reset_arenas", "seconds", "tokens_per_s"]

clock = time.perf_counter  # pytest-benchmark's default timer too

LIMIT = "limit (np.copyto)"  # the copy limit's name in the suite's tables

STATS: Dict[str, Callable[[List[float]], float]] = {"median": statistics.median, "mean": statistics.fmean}


# -- what the sides fill ----------------------------------------------------------------
class Arena:
    """Storage a side appends to, reset (outside the timing) when a step would overflow it.

    Attributes
    ----------
    capacity : int
        Positions it holds.
    """

    capacity: int

    def used(self) -> int:
        """Positions filled so far.

        Returns
        -------
        int
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Make it empty again (so that the next steps write fresh memory)."""
        raise NotImplementedError


class _Appended(Arena):
    """An arena that counts what was appended to it in ``pos``."""

    pos = 0

    def used(self):
        return self.pos

    def reset(self):
        self.pos = 0


def _faulted(shape, dtype):
    """A new array of ``shape`` whose pages are all committed (``np.zeros`` maps them lazily)."""
    a = np.empty(shape, dtype)
    a.fill(0)
    return a


class NumpyCache(_Appended):
    """The baseline written by hand: preallocated per-layer arrays, slice assignment.

    Parameters
    ----------
    n_layers, n_kv_heads, head_dim : int
        The shape of one layer's position.
    capacity : int
        Positions of every layer.
    dtype : numpy dtype, optional
        What it stores (float32 by default).

    Attributes
    ----------
    k, v : list of ndarray
        Per layer, ``[capacity, n_kv_heads, head_dim]``, every page committed up
        front (like the cache's prefaulted arenas).
    pos : int
        Positions stored in every layer.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype=np.float32):
        self.capacity = capacity
        shape = (capacity, n_kv_heads, head_dim)
        self.k = [_faulted(shape, dtype) for _ in range(n_layers)]
        self.v = [_faulted(shape, dtype) for _ in range(n_layers)]
        self.pos = 0

    def store_batch(self, ks, vs, t: int) -> None:
        """Append ``t`` tokens: ``kc[l][pos:pos + t] = ks[l]`` (and values) for every layer.

        Parameters
        ----------
        ks, vs : sequence of ndarray, or ndarray
            ``ks[l]`` / ``vs[l]`` are layer ``l``'s ``[t, n_kv_heads, head_dim]``
            (a list of per-layer views, or one ``[n_layers, t, ...]`` array).
        t : int
            Tokens appended.
        """
        p = self.pos
        kc, vc = self.k, self.v
        for l in range(len(kc)):
            kc[l][p:p + t] = ks[l]
            vc[l][p:p + t] = vs[l]
        self.pos = p + t

    def store_one(self, ks, vs) -> None:
        """Append one token: ``kc[l][pos] = ks[l]`` (and values) for every layer.

        Parameters
        ----------
        ks, vs : sequence of ndarray, or ndarray
            ``ks[l]`` / ``vs[l]`` are layer ``l``'s ``[n_kv_heads, head_dim]``.
        """
        p = self.pos
        kc, vc = self.k, self.v
        for l in range(len(kc)):
            kc[l][p] = ks[l]
            vc[l][p] = vs[l]
        self.pos = p + 1


class CopyLimit(_Appended):
    """The copy limit: ``np.copyto`` of a step's bytes into one preallocated buffer.

    Each step copies its keys, then its values, into the next fresh region of
    a buffer as large as a cache's arenas (so the destination is not the same
    cache-hot bytes every step); the buffer's pages are committed up front.
    Single-threaded (numpy's copy is the C library's ``memmove``).

    Parameters
    ----------
    n_layers, n_kv_heads, head_dim : int
        The shape: a token is ``2 * n_layers * n_kv_heads * head_dim`` floats.
    capacity : int
        Tokens the buffer holds.

    Attributes
    ----------
    buf : ndarray
        The float32 buffer, ``capacity`` tokens long.
    pos : int
        Tokens copied since the last reset.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int):
        self.capacity = capacity
        self.token_floats = 2 * n_layers * n_kv_heads * head_dim
        self.buf = _faulted(capacity * self.token_floats, np.float32)
        self.pos = 0

    def store(self, kflat, vflat, t: int) -> None:
        """Copy ``t`` tokens' keys, then their values, into the next region.

        Parameters
        ----------
        kflat, vflat : ndarray
            1-D float32, ``t * token_floats / 2`` each.
        t : int
            Tokens they hold.
        """
        n = kflat.shape[0]
        off = self.pos * self.token_floats
        np.copyto(self.buf[off:off + n], kflat)
        np.copyto(self.buf[off + n:off + 2 * n], vflat)
        self.pos += t

    def side(self, k, v, *, repeat: int = 1, name: str = LIMIT) -> Side:
        """The limit's side for a step storing ``k``, ``v`` (``repeat`` times).

        Parameters
        ----------
        k, v : ndarray
            C-contiguous ``[n_layers, T, n_kv_heads, head_dim]`` float32: what the
            project's step stores.  Copied as the flat views ``k.reshape(-1)``.
        repeat : int, optional
            Copies of ``k``, ``v`` a step makes (one per prefill chunk, say).
        name : str, optional
            The side's name in the tables.

        Returns
        -------
        Side
            Its step moves ``repeat * T`` tokens; its arena is this buffer.

        Raises
        ------
        ValueError
            If ``k`` or ``v`` is not C-contiguous (a flat view would be a copy).
        """
        if not (k.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("the copy limit needs C-contiguous keys and values")
        kflat, vflat, t = k.reshape(-1), v.reshape(-1), k.shape[1]
        store = self.store

        def step():
            for _ in range(repeat):
                store(kflat, vflat, t)
        return Side(name, step, repeat * t, self)


# -- the interleaved rounds ---------------------------------------------------------------
@dataclass(eq=False)
class Side:
    """One contestant of a measurement: ``step()`` moves ``tokens`` tokens.

    Attributes
    ----------
    name : str
        Its name in the tables.
    step : callable
        One timed sample, as an application makes it (one decode step, one
        prefill chunk, a whole context, ...).
    tokens : int
        Tokens a step stores or reads.
    arena : Arena, optional
        What the step appends to: reset (untimed) at the start of a round that
        would not fit (sides may share one).
    enter, exit : callable, optional
        Run just before and just after each step, outside the timing (to force a
        SIMD path or a thread count, reset a cache, drop page-cache pages, ...).
    times : list of float
        Seconds of each measured step (warm-up rounds left out).
    """

    name: str
    step: Callable[[], object]
    tokens: int
    arena: Arena | None = None
    enter: Callable[[], object] | None = None
    exit: Callable[[], object] | None = None
    times: list = field(default_factory=list)


def reset_arenas(sides) -> None:
    """Reset the arena of every side that has one.

    Parameters
    ----------
    sides : iterable of Side
    """
    for s in sides:
        if s.arena is not None:
            s.arena.reset()


class Interleaved:
    """Rounds of one step of every side, the order alternating from round to round.

    The last side (call it A, the project) runs after the others on even rounds
    and before them on odd rounds; the others run in the order given on rounds
    0 and 1 of every 4 and reversed on rounds 2 and 3, so that each of them runs
    next to A equally often.  With ``[B, A]`` the steps go B A | A B | B A ...;
    with ``[B1, B2, A]``, B1 B2 A | A B1 B2 | B2 B1 A | A B2 B1 | ...

    At the start of a round (outside the timing) every arena that cannot take
    the round's steps is reset.  Each step is timed alone with ``clock``; what
    surrounds it (``enter``, ``exit``) is not.

    Parameters
    ----------
    sides : sequence of Side
        Their ``times`` are cleared.
    warmup : int, optional
        Rounds at the start whose times are not recorded.
    clock : callable, optional
        Seconds as a float (``time.perf_counter`` by default).

    Attributes
    ----------
    round : int
        The round under way (-1 before the first).
    """

    def __init__(self, sides, *, warmup: int = 0, clock: Callable[[], float] = clock):
        self.sides = list(sides)
        self.warmup = warmup
        self.clock = clock
        self.round = -1
        for s in self.sides:
            s.times.clear()

    def order(self) -> list:
        """The sides in the order the current round runs them.

        Returns
        -------
        list of Side
        """
        *others, last = self.sides
        if self.round % 4 >= 2:
            others.reverse()
        return [*others, last] if self.round % 2 == 0 else [last, *others]

    def _around(self, side):
        """The sides this round runs before ``side``, and those it runs after."""
        order = self.order()
        i = next(i for i, s in enumerate(order) if s is side)
        return order[:i], order[i + 1:]

    def begin_round(self) -> None:
        """Start the next round: reset every arena that cannot take one more round.

        Raises
        ------
        ValueError
            If a round needs more positions than an arena holds.
        """
        self.round += 1
        need: Dict[int, list] = {}
        for s in self.sides:
            if s.arena is not None:
                need.setdefault(id(s.arena), [s.arena, 0])[1] += s.tokens
        for arena, n in need.values():
            if n > arena.capacity:
                raise ValueError(f"a round needs {n} positions but the arena holds "
                                 f"{arena.capacity}")
            if arena.used() + n > arena.capacity:
                arena.reset()

    def step(self, side) -> float:
        """Run and time one step of ``side``, recording its time unless in warm-up.

        Parameters
        ----------
        side : Side

        Returns
        -------
        float
            Seconds the step took.
        """
        if side.enter:
            side.enter()
        t0 = self.clock()
        side.step()
        dt = self.clock() - t0
        if side.exit:
            side.exit()
        if self.round >= self.warmup:
            side.times.append(dt)
        return dt

    def run(self, rounds: int, progress: Callable[[], object] | None = None) -> None:
        """Run ``rounds`` more rounds, timing every step.

        Parameters
        ----------
        rounds : int
        progress : callable, optional
            Called after each step (to advance a progress bar).
        """
        for _ in range(rounds):
            self.begin_round()
            for s in self.order():
                self.step(s)
                if progress is not None:
                    progress()

    def pedantic(self, benchmark, proj: Side, rounds: int) -> bool:
        """Run ``warmup`` + ``rounds`` rounds with pytest-benchmark timing ``proj``.

        ``benchmark.pedantic`` times one step of ``proj`` per round; the sides that
        the round's order puts before it run (timed here, with the same clock) in
        the round's ``setup``, those after it in its ``teardown``.  With the
        project last in ``sides``, rounds go B A | A B ...: the baselines in
        ``setup`` on even rounds, in ``teardown`` on odd ones.

        Parameters
        ----------
        benchmark : pytest_benchmark.fixture.BenchmarkFixture
            The fixture (or anything with its ``pedantic`` and ``stats``).
        proj : Side
            The last of ``sides``.
        rounds : int
            Measured rounds.

        Returns
        -------
        bool
            Whether pytest-benchmark timed anything (not under ``--benchmark-disable``,
            where the step ran once); if so ``proj.times`` holds its times.

        Raises
        ------
        ValueError
            If ``proj`` is not the last side.
        """
        if not self.sides or self.sides[-1] is not proj:
            raise ValueError("the project must be the last side")
        pending = []

        def setup():
            self.begin_round()
            for s in self._around(proj)[0]:
                self.step(s)
            if proj.enter:
                proj.enter()
            pending.append(proj)

        def teardown():
            pending.clear()
            if proj.exit:
                proj.exit()
            for s in self._around(proj)[1]:
                self.step(s)

        benchmark.pedantic(proj.step, setup=setup, teardown=teardown, rounds=rounds,
                           warmup_rounds=self.warmup, iterations=1)
        if pending and proj.exit:  # a disabled benchmark runs setup and the step only
            proj.exit()
        stats = getattr(benchmark, "stats", None)
        if stats is None:
            return False
        proj.times[:] = stats.stats.data
        return True


# -- statistics ---------------------------------------------------------------------------
def seconds(side: Side, stat: str = "median") -> float:
    """A side's step time: the median (or mean) of its measured times.

    Parameters
    ----------
    side : Side
    stat : {"median", "mean"}, optional
        ``"mean"`` gives the amortized cost, for steps of which only some do
        extra work (one decode step in 256 spilling a block, say).

    Returns
    -------
    float
        Seconds.
    """
    return STATS[stat](side.times)


def tokens_per_s(side: Side, stat: str = "median") -> float:
    """Tokens a second: ``side.tokens / seconds(side, stat)``.

    Parameters
    ----------
    side : Side
    stat : {"median", "mean"}, optional

    Returns
    -------
    float
    """
    return side.tokens / seconds(side, stat)


def gb_per_s(side: Side, token_bytes: int, stat: str = "median") -> float:
    """10^9 bytes a second, a token counting ``token_bytes``.

    Parameters
    ----------
    side : Side
    token_bytes : int
    stat : {"median", "mean"}, optional

    Returns
    -------
    float
    """
    return tokens_per_s(side, stat) * token_bytes / 1e9


def ratio(baseline: Side, proj: Side, stat: str = "median") -> float:
    """Baseline time per token / project time per token (> 1: the project is faster).

    Parameters
    ----------
    baseline, proj : Side
    stat : {"median", "mean"}, optional

    Returns
    -------
    float
    """
    return (seconds(baseline, stat) / baseline.tokens) / (seconds(proj, stat) / proj.tokens)
