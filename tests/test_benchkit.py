"""kvcache._benchkit, the harness of ``kvcache bench`` and benchmarks/: what it measures, with
a fake clock (no real timing decides a result), and what its baselines store."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import kvcache
from kvcache._benchkit import (CopyLimit, Interleaved, NumpyCache, Side, gb_per_s, ratio,
                               seconds, tokens_per_s)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kvcache.__file__)))


class FakeClock:
    """A clock that only the fake sides move: each step costs what its list says."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_side(name, clock, log, costs, tokens=1, **kw):
    """A side whose n-th step logs its name and advances ``clock`` by ``costs[n]``."""
    it = iter(costs)

    def step():
        log.append(name)
        clock.now += next(it)
    return Side(name, step, tokens, **kw)


def test_rounds_alternate_the_order():
    clock, log = FakeClock(), []
    sides = [fake_side(n, clock, log, [1.0] * 4) for n in ("B", "A")]
    Interleaved(sides, clock=clock).run(4)
    assert log == ["B", "A", "A", "B"] * 2
    # with two baselines, each runs next to the project (the last side) equally often
    log.clear()
    sides = [fake_side(n, clock, log, [1.0] * 8) for n in ("B1", "B2", "A")]
    Interleaved(sides, clock=clock).run(8)
    rounds = [log[i:i + 3] for i in range(0, len(log), 3)]
    assert rounds == [["B1", "B2", "A"], ["A", "B1", "B2"], ["B2", "B1", "A"],
                      ["A", "B2", "B1"]] * 2


def test_ratio_is_baseline_over_project_from_medians():
    clock, log = FakeClock(), []
    base = fake_side("base", clock, log, [8.0, 1.0, 6.0, 900.0, 7.0, 6.5], tokens=4)
    proj = fake_side("proj", clock, log, [5.0, 2.0, 3.0, 1.0, 50.0, 1.5], tokens=2)
    # warm-up rounds take nothing: the first round's steps (8 and 5) are left out
    Interleaved([base, proj], warmup=1, clock=clock).run(6)
    assert base.times == [1.0, 6.0, 900.0, 7.0, 6.5]
    assert proj.times == [2.0, 3.0, 1.0, 50.0, 1.5]
    assert seconds(base) == 6.5 and seconds(proj) == 2.0
    assert tokens_per_s(base) == pytest.approx(4 / 6.5)
    assert gb_per_s(proj, token_bytes=10**9) == pytest.approx(1.0)
    # per token: the baseline takes 6.5 / 4, the project 2 / 2
    assert ratio(base, proj) == pytest.approx((6.5 / 4) / (2.0 / 2))
    assert ratio(proj, proj) == 1.0
    assert ratio(base, proj, "mean") == pytest.approx((920.5 / 5 / 4) / (57.5 / 5 / 2))


def test_enter_exit_and_resets_are_not_timed():
    clock, log = FakeClock(), []

    class Counted:
        capacity, pos = 9, 0

        def used(self):
            return self.pos

        def reset(self):
            self.pos = 0
            log.append("reset")
            clock.now += 1000.0

    arena = Counted()

    def appending(name):  # two sides filling one arena, 2 tokens a step each
        side = fake_side(name, clock, log, [1.0] * 4, tokens=2, arena=arena,
                         enter=lambda: setattr(clock, "now", clock.now + 100.0),
                         exit=lambda: setattr(clock, "now", clock.now + 10.0))
        inner = side.step

        def step():
            inner()
            arena.pos += side.tokens
        side.step = step
        return side
    sides = [appending("B"), appending("A")]
    Interleaved(sides, clock=clock).run(4)
    assert sides[0].times == sides[1].times == [1.0] * 4
    # a round needs 4 positions: the third one starts with a reset (8 + 4 > 9)
    assert log == ["B", "A", "A", "B", "reset", "B", "A", "A", "B"]
    too_big = Side("big", lambda: None, 10, arena)
    with pytest.raises(ValueError, match="a round needs 10 positions but the arena holds 9"):
        Interleaved([too_big]).run(1)


class FakeBenchmark:
    """pytest-benchmark's fixture as ``pedantic`` uses it: setup, the timed target,
    teardown, a round at a time, warm-up rounds untimed; or, disabled, setup and
    the target once."""

    def __init__(self, clock, disabled=False):
        self.clock, self.disabled = clock, disabled

    def pedantic(self, target, setup, teardown, rounds, warmup_rounds, iterations):
        assert iterations == 1
        if self.disabled:
            setup()
            target()
            return
        data = []
        for i in range(warmup_rounds + rounds):
            setup()
            t0 = self.clock()
            target()
            if i >= warmup_rounds:
                data.append(self.clock() - t0)
            teardown()
        self.stats = SimpleNamespace(stats=SimpleNamespace(data=data))


def test_pedantic_interleaves_around_the_timed_project():
    clock, log = FakeClock(), []
    base = fake_side("B", clock, log, [9.0, 9.0, 4.0, 5.0, 6.0, 7.0])
    proj = fake_side("A", clock, log, [9.0, 9.0, 2.0, 1.0, 2.0, 3.0])
    events = []
    proj.enter, proj.exit = (lambda: events.append("enter")), (lambda: events.append("exit"))
    bench = FakeBenchmark(clock)
    assert Interleaved([base, proj], warmup=2, clock=clock).pedantic(bench, proj, 4)
    assert log == ["B", "A", "A", "B"] * 3
    assert events == ["enter", "exit"] * 6
    assert base.times == [4.0, 5.0, 6.0, 7.0]
    assert proj.times == [2.0, 1.0, 2.0, 3.0]
    assert ratio(base, proj) == pytest.approx(5.5 / 2.0)


def test_pedantic_under_benchmark_disable():
    clock, log = FakeClock(), []
    base = fake_side("B", clock, log, [1.0])
    events = []
    proj = fake_side("A", clock, log, [1.0], enter=lambda: events.append("enter"),
                     exit=lambda: events.append("exit"))
    assert not Interleaved([base, proj], warmup=3, clock=clock).pedantic(
        FakeBenchmark(clock, disabled=True), proj, 10)
    assert log == ["B", "A"] and events == ["enter", "exit"]
    assert base.times == [] and proj.times == []
    with pytest.raises(ValueError, match="must be the last side"):
        Interleaved([proj, base]).pedantic(FakeBenchmark(clock), proj, 1)


def random_bits(shape, seed):
    """float32 arrays of random bit patterns: NaNs with payloads, infinities, -0, subnormals."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.float32)


def test_numpy_cache_stores_byte_exact():
    layers, heads, dim = 3, 2, 5
    npc = NumpyCache(layers, heads, dim, 8)
    assert npc.capacity == 8 and len(npc.k) == len(npc.v) == layers
    assert all(a.shape == (8, heads, dim) and a.dtype == np.float32 for a in npc.k + npc.v)
    k, v = random_bits((layers, 4, heads, dim), 1), random_bits((layers, 4, heads, dim), 2)
    assert np.isnan(k).any()
    npc.store_batch(list(k), list(v), 4)  # per-layer views
    npc.store_batch(k[:, :2], v[:, :2], 2)  # one [layers, T, H, D] array
    k1, v1 = random_bits((layers, heads, dim), 3), random_bits((layers, heads, dim), 4)
    npc.store_one(k1, v1)
    assert npc.used() == 7
    for l in range(layers):
        want_k = np.concatenate([k[l], k[l, :2], k1[l][None]])
        want_v = np.concatenate([v[l], v[l, :2], v1[l][None]])
        assert npc.k[l][:7].tobytes() == want_k.tobytes()
        assert npc.v[l][:7].tobytes() == want_v.tobytes()
    npc.reset()
    assert npc.used() == 0


def test_copy_limit_copies_the_same_bytes_into_fresh_regions():
    layers, heads, dim, T = 2, 2, 4, 3
    limit = CopyLimit(layers, heads, dim, 8)
    token_floats = 2 * layers * heads * dim
    assert limit.buf.size == 8 * token_floats
    k, v = random_bits((layers, T, heads, dim), 5), random_bits((layers, T, heads, dim), 6)
    side = limit.side(k, v, repeat=2, name="limit")
    assert (side.name, side.tokens, side.arena) == ("limit", 2 * T, limit)
    side.step()
    assert limit.used() == 2 * T
    n = k.size
    chunk = np.concatenate([k.reshape(-1), v.reshape(-1)]).tobytes()
    assert limit.buf[:4 * n].tobytes() == chunk * 2  # keys then values, then the next region
    with pytest.raises(ValueError, match="C-contiguous"):
        limit.side(k[:, :2], v[:, :2])


def test_only_numpy_at_import_and_never_by_import_kvcache():
    code = ("import sys, kvcache; assert 'kvcache._benchkit' not in sys.modules; "
            "import kvcache._benchkit; "
            "assert not {'pytest', 'pytest_benchmark', 'tqdm', 'matplotlib'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT))
