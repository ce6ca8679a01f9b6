"""TieredKVCache under concurrent use: the README's thread-safety contract.

Every test is deterministic in outcome: what the threads store is planned in
advance (or tagged with ids the test can decode), so the final contents and
the counters have one right answer whatever the interleaving.  Nothing is
timed.  Worker errors surface through ``Future.result()``; a barrier is
aborted when a worker fails so that no thread waits forever.
"""
import gc
import sys
import threading
import time

import numpy as np
import pytest

import kvcache
from kvcache import CacheClosedError, CacheFullError
from helpers import bits, random_bits, run_threads
from kvcache._arena import allocator_live

def filled(ids, heads, dim):
    """Tokens [len(ids), heads, dim] whose every float is the token's id."""
    col = np.asarray(ids, np.float64).astype(np.float32)[:, None, None]
    return np.ascontiguousarray(np.broadcast_to(col, (len(col), heads, dim)))


def assert_whole_tokens(k):
    """Every row of ``k`` is one token: all of its floats are equal (no torn row)."""
    assert (k == k[:, :1, :1]).all(), "a row mixes two tokens (torn read)"


def expected_stats(row_bytes, stored, read):
    return {
        "tokens_stored": stored,
        "bytes_stored": 2 * row_bytes * stored,
        "tokens_read": read,
        "bytes_read": 2 * row_bytes * read,
        "hot_hits": read,
        "cold_hits": 0,
        "evictions": 0,
        **NO_COLD_TRAFFIC,
    }


# An all-in-RAM cache never touches the cold tier.
NO_COLD_TRAFFIC = dict.fromkeys(["eviction_blocks", "promotions", "promotion_blocks", "bytes_to_cold",
                                 "bytes_from_cold", "cold_bytes_on_disk"], 0)


# ---------------------------------------------------------------------------
# 1. Many writers and readers over every layer, ending byte-exact.
# ---------------------------------------------------------------------------

def test_stress_mixed_stores_and_gets():
    """8 writers (one per layer) + rotating store_layers + 4 readers, 4,020 stores.

    Rounds: every writer appends a planned list of store / store_batch calls
    to its own layer, all meet at a barrier, the round's owner appends one
    store_layers call to every layer, and all meet again.  So each layer's
    sequence of appends is fixed in advance, while readers run throughout.
    Keys of layer l at position p are all ``l * 4096 + p + 1`` (so a reader
    can tell whole tokens and exact positions); values are random bits.
    """
    L, H, D = 8, 4, 32
    ROUNDS, OPS = 20, 25
    rng = np.random.default_rng(2024)

    # -- the plan, simulated up front --
    lengths = [0] * L
    boundaries = [{0} for _ in range(L)]  # lengths a reader may observe
    own_ops = [[[] for _ in range(ROUNDS)] for _ in range(L)]  # (start, T, kind, layout)
    whole_ops = []  # per round: (T, [start per layer], layout)
    for r in range(ROUNDS):
        for l in range(L):
            for _ in range(OPS):
                kind = ("one", "store", "batch")[rng.integers(3)]
                t = 1 if kind == "one" else int(rng.integers(1, 9))
                layout = ("contiguous", "strided")[rng.integers(2)]
                own_ops[l][r].append((lengths[l], t, kind, layout))
                lengths[l] += t
                boundaries[l].add(lengths[l])
        # every 3rd round one store_layers of > 1 MiB: large enough to be copied
        # on native threads (smaller ones stay on the calling thread)
        t = 130 if r % 3 == 2 else int(rng.integers(1, 7))
        whole_ops.append((t, list(lengths), ("layer-major", "token-major")[r % 2]))
        for l in range(L):
            lengths[l] += t
            boundaries[l].add(lengths[l])
    capacity = max(lengths)  # the longest layer ends exactly full
    assert capacity < 4096
    ref_k = [filled(l * 4096 + 1 + np.arange(n), H, D) for l, n in enumerate(lengths)]
    ref_v = [random_bits(rng, (n, H, D)) for n in lengths]
    n_stores = L * ROUNDS * OPS + ROUNDS
    assert n_stores == 4020

    cache = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D,
                                  max_seq_len=capacity, threads=2)
    row_bytes = H * D * 4
    barrier = threading.Barrier(L)

    def check_rows(l, a, k, v):
        assert k.shape == v.shape and k.shape[1:] == (H, D)
        assert_whole_tokens(k)
        assert np.array_equal(bits(k), bits(ref_k[l][a:a + len(k)]))
        assert np.array_equal(bits(v), bits(ref_v[l][a:a + len(v)]))

    def strided(chunk):
        buf = np.full((2 * len(chunk),) + chunk.shape[1:], np.nan, np.float32)
        buf[::2] = chunk
        return buf[::2]

    def writer(l):
        def run():
            calls = 0
            for r in range(ROUNDS):
                for start, t, kind, layout in own_ops[l][r]:
                    k, v = ref_k[l][start:start + t], ref_v[l][start:start + t]
                    if layout == "strided":
                        k, v = strided(k), strided(v)
                    if kind == "one":
                        cache.store(l, k[0], v[0])
                    elif kind == "store":
                        cache.store(l, k, v)
                    else:
                        cache.store_batch(l, k, v)
                    calls += 1
                barrier.wait()
                if r % L == l:  # this round's store_layers is ours
                    t, starts, layout = whole_ops[r]
                    ks = [ref_k[m][s:s + t] for m, s in enumerate(starts)]
                    vs = [ref_v[m][s:s + t] for m, s in enumerate(starts)]
                    if layout == "layer-major":
                        K, V = np.stack(ks), np.stack(vs)
                    else:  # [T, L, H, D] in memory, passed as [L, T, H, D]
                        K = np.stack(ks, axis=1).transpose(1, 0, 2, 3)
                        V = np.stack(vs, axis=1).transpose(1, 0, 2, 3)
                    cache.store_layers(K, V)
                    calls += 1
                barrier.wait()
            return calls
        return run

    def reader(seed):
        def run(done):
            rng = np.random.default_rng(seed)
            rows = iterations = 0
            seen = [0] * L  # lengths only grow in this test
            while not done.is_set() or iterations < 200:
                iterations += 1
                l = int(rng.integers(L))
                op = int(rng.integers(4))
                if op == 0:  # everything stored so far
                    k, v = cache.get(l)
                    assert len(k) in boundaries[l] and len(k) >= seen[l]
                    seen[l] = len(k)
                    check_rows(l, 0, k, v)
                    rows += len(k)
                elif op in (1, 2):  # a range inside what is surely stored
                    n = cache.layer_len(l)
                    assert n in boundaries[l] and n >= seen[l]
                    seen[l] = n
                    a = int(rng.integers(0, n + 1))
                    b = int(rng.integers(a, n + 1))
                    if op == 1:
                        k, v = cache.get(l, a, b)
                    else:
                        out = (np.empty((b - a + 1, H, D), np.float32)[:b - a],
                               np.empty((b - a + 1, H, D), np.float32)[1:])
                        res = cache.get(l, start=a, stop=b, out=out)
                        assert res[0] is out[0] and res[1] is out[1]
                        k, v = out
                    check_rows(l, a, k, v)
                    rows += b - a
                else:
                    s = cache.seq_len
                    assert all(cache.layer_len(m) >= s for m in range(L))
                    st = cache.stats()
                    assert 0 <= st["tokens_stored"] <= sum(lengths)
                    assert st["bytes_stored"] % (2 * row_bytes) == 0
            return rows
        return run

    try:
        results = run_threads([writer(l) for l in range(L)],
                              [reader(s) for s in range(4)], barrier=barrier)
        assert sum(results[:L]) == n_stores
        rows_read = sum(results[L:])
        assert [cache.layer_len(l) for l in range(L)] == lengths
        assert cache.seq_len == min(lengths)
        for l in range(L):
            k, v = cache.get(l)
            assert np.array_equal(bits(k), bits(ref_k[l]))
            assert np.array_equal(bits(v), bits(ref_v[l]))
            rows_read += len(k)
        assert cache.stats() == expected_stats(row_bytes, sum(lengths), rows_read)
        with pytest.raises(CacheFullError):  # the longest layer is exactly full
            cache.store(lengths.index(capacity), ref_k[0][0], ref_v[0][0])
    finally:
        cache.close()


# ---------------------------------------------------------------------------
# 2. store_layers from many threads: every layer gets the same sequence.
# ---------------------------------------------------------------------------

def test_racing_store_layers_keep_layers_in_lockstep():
    """8 threads race store_layers calls of 1-4 tokens (and some of 130), tagged with unique ids.

    The interleaving decides the order of calls, but store_layers appends to
    every layer at once, so every layer must hold the same id sequence, with
    each call's tokens contiguous and complete, each thread's calls in its
    own order, and nothing lost or duplicated.  Readers check the same on
    every snapshot, and that snapshots of different layers are prefixes of
    one another.
    """
    L, H, D = 4, 4, 64
    WRITERS, CALLS = 8, 60
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 5, (WRITERS, CALLS))
    sizes[:, 7::15] = 130  # > 1 MiB per call: copied by the native pool (when it is free)
    total = int(sizes.sum())
    cache = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D,
                                  max_seq_len=total, threads=2)
    row_bytes = H * D * 4

    def token_ids(w, c):  # unique, and decodable to (writer, call, index)
        return [(w * 1000 + c) * 256 + i + 1 for i in range(sizes[w, c])]

    def payload(w, c):
        ids = token_ids(w, c)
        K = np.stack([filled(ids, H, D) + np.float32(l / 8) for l in range(L)])  # id + layer/8
        V = -K
        return K, V

    def decode(l, k, v):
        """Token ids of one layer's snapshot, checking every row is whole."""
        assert_whole_tokens(k)
        assert np.array_equal(bits(v), bits(-k))
        x = k[:, 0, 0].astype(np.float64)
        ids = np.floor(x).astype(np.int64)
        assert np.array_equal(x - ids, np.full(len(ids), l / 8))  # the layer's own data
        return ids.tolist()

    def check_sequence(ids):
        """Calls contiguous and complete, each writer's calls in order."""
        next_call = [0] * WRITERS
        i = 0
        while i < len(ids):
            w, c = divmod((ids[i] - 1) // 256, 1000)
            assert c == next_call[w], "a writer's calls are out of order, lost or repeated"
            want = token_ids(w, c)
            assert ids[i:i + len(want)] == want, "a store_layers call was split or torn"
            next_call[w] += 1
            i += len(want)
        return next_call

    def writer(w):
        def run():
            for c in range(CALLS):
                cache.store_layers(*payload(w, c))
            return CALLS
        return run

    def reader(seed):
        def run(done):
            rng = np.random.default_rng(seed)
            longest, rows, iterations = [], 0, 0
            while not done.is_set() or iterations < 100:
                iterations += 1
                l = int(rng.integers(L))
                k, v = cache.get(l)
                rows += len(k)
                ids = decode(l, k, v)
                check_sequence(ids)
                short, long_ = sorted([ids, longest], key=len)
                assert long_[:len(short)] == short, "layers disagree on the order of calls"
                longest = long_
            return rows
        return run

    try:
        results = run_threads([writer(w) for w in range(WRITERS)], [reader(s) for s in (1, 2)])
        rows_read = sum(results[WRITERS:])
        per_layer = []
        for l in range(L):
            k, v = cache.get(l)
            rows_read += len(k)
            per_layer.append(decode(l, k, v))
        assert all(ids == per_layer[0] for ids in per_layer)
        assert check_sequence(per_layer[0]) == [CALLS] * WRITERS
        assert sorted(per_layer[0]) == sorted(i for w in range(WRITERS) for c in range(CALLS)
                                              for i in token_ids(w, c))
        assert cache.seq_len == total
        assert cache.stats() == expected_stats(row_bytes, L * total, rows_read)
    finally:
        cache.close()


# ---------------------------------------------------------------------------
# 3. The copies run with the GIL released.
# ---------------------------------------------------------------------------

@pytest.fixture
def long_switch_interval():
    """Make the interpreter hand the GIL over only when a thread releases it.

    With a 1000 s switch interval no thread is forced off the GIL during the
    test, so another Python thread can run while a store is in flight only if
    that store released the GIL.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    yield
    sys.setswitchinterval(before)


class InFlight:
    """Shared by a storing thread and an observing thread."""

    def __init__(self):
        self.attempt = 0      # which store call the storing thread is on
        self.inside = False   # True from just before that call to just after it
        self.finished = False
        self.wins = 0         # observer actions that ran entirely inside one call


def _observe_inside(state, action):
    """Observer thread: run ``action()`` whenever the storer is inside a call,
    and count it as a win if the storer was still inside the *same* call
    after ``action`` returned.

    The storer sets ``inside`` with the GIL right before the call and clears
    it right after; with the long switch interval nothing forces it off the
    GIL in between.  So the observer can see ``inside`` at all, and run a
    whole action before it clears, only if the call released the GIL.
    """
    last = -1
    while not state.finished:
        attempt, inside = state.attempt, state.inside
        if inside and attempt != last:
            action()
            if state.inside and state.attempt == attempt:
                state.wins += 1
                last = attempt
        time.sleep(0)  # hand the GIL back to the storer (not a timing assertion)
    return state.wins


def _store_until_observed(state, call, attempts):
    """Storer thread: up to ``attempts`` calls, stopping after the first win."""
    done = 0
    try:
        for i in range(attempts):
            state.attempt = i
            state.inside = True
            call()
            state.inside = False
            done += 1
            if state.wins:
                break
    finally:
        state.inside = False
        state.finished = True
    return done


@pytest.mark.usefixtures("long_switch_interval")
def test_store_batch_releases_gil_so_other_layers_proceed():
    """While a large store_batch copies into layer 0, another thread stores a
    token to layer 1 and reads it back, start to finish.

    If store_batch held the GIL during its copy, the observer could never
    complete an action inside the call: that failure is certain.  Success
    only needs the OS to run the observer during one of up to 20 copies of
    2 x 16 MB into fresh (not yet faulted-in) pages.
    """
    H, D, T, ATTEMPTS = 8, 128, 4096, 20
    cache = kvcache.TieredKVCache(n_layers=2, n_kv_heads=H, head_dim=D,
                                  max_seq_len=ATTEMPTS * T, prefault=False)
    big = np.ones((T, H, D), np.float32)
    state = InFlight()
    tokens = []

    def store_and_read_layer_1():
        tok = np.full((H, D), float(len(tokens) + 1), np.float32)
        cache.store(1, tok, -tok)
        k, v = cache.get(1, -1)
        assert np.array_equal(k[0], tok) and np.array_equal(v[0], -tok)
        tokens.append(tok)

    try:
        batches, wins = run_threads([
            lambda: _store_until_observed(state, lambda: cache.store_batch(0, big, big), ATTEMPTS),
            lambda: _observe_inside(state, store_and_read_layer_1),
        ])
        assert wins >= 1, "no store to layer 1 completed while store_batch(0) was copying"
        assert cache.layer_len(0) == batches * T
        assert cache.layer_len(1) == len(tokens) >= wins
        k, v = cache.get(1)
        assert np.array_equal(k, np.stack(tokens)) and np.array_equal(v, -np.stack(tokens))
        assert cache.stats()["tokens_stored"] == batches * T + len(tokens)
        assert cache.stats()["tokens_read"] == 2 * len(tokens)
    finally:
        cache.close()


@pytest.mark.usefixtures("long_switch_interval")
def test_store_layers_releases_gil():
    """A Python thread makes progress while store_layers copies every layer
    (on its native thread pool).  Same argument as above: if the GIL were
    held during the copy, the counter could never move inside the call."""
    L, H, D, T, ATTEMPTS = 4, 8, 128, 1024, 20
    cache = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D,
                                  max_seq_len=ATTEMPTS * T, prefault=False, threads=2)
    big = np.ones((L, T, H, D), np.float32)
    state = InFlight()
    progress = [0]

    def tick():
        progress[0] += 1

    try:
        calls, wins = run_threads([
            lambda: _store_until_observed(state, lambda: cache.store_layers(big, -big), ATTEMPTS),
            lambda: _observe_inside(state, tick),
        ])
        assert wins >= 1 and progress[0] >= wins, "no Python code ran while store_layers was copying"
        assert cache.seq_len == calls * T
        assert cache.stats()["tokens_stored"] == L * calls * T
    finally:
        cache.close()


# ---------------------------------------------------------------------------
# 4. CacheFullError under concurrency.
# ---------------------------------------------------------------------------

def test_racing_to_fill_a_layer_stores_exactly_capacity():
    """8 threads append tagged chunks of 1-3 tokens to one layer until a
    1-token store is refused.  The layer ends exactly full; it holds exactly
    the chunks whose store returned, each whole and in its thread's order,
    and none of those refused."""
    H, D, CAP, WRITERS = 2, 8, 97, 8
    cache = kvcache.TieredKVCache(n_layers=2, n_kv_heads=H, head_dim=D, max_seq_len=CAP)
    row_bytes = H * D * 4

    def writer(w):
        def run():
            ok, refused = [], []
            c = 0
            while True:
                t = 1 + c % 3
                ids = [(w * 1000 + c) * 4 + i + 1 for i in range(t)]
                k = filled(ids, H, D)
                try:
                    if c % 2:
                        cache.store_batch(0, k, -k)
                    else:
                        cache.store(0, k if t > 1 else k[0], -k if t > 1 else -k[0])
                except CacheFullError:
                    refused.append(ids)
                    if t == 1:  # refused one token: the layer is full for good
                        return ok, refused
                else:
                    ok.append(ids)
                c += 1
        return run

    try:
        results = run_threads([writer(w) for w in range(WRITERS)])
        assert cache.layer_len(0) == CAP and cache.layer_len(1) == 0
        k, v = cache.get(0)
        assert_whole_tokens(k)
        assert np.array_equal(bits(v), bits(-k))
        got = k[:, 0, 0].astype(np.int64).tolist()
        chunks = {tuple(ids): w for w, (ok, _) in enumerate(results) for ids in ok}
        assert sum(len(c) for c in chunks) == CAP
        assert sorted(got) == sorted(i for c in chunks for i in c)  # none lost or duplicated
        refused = {i for _, bad in results for ids in bad for i in ids}
        assert not refused & set(got)
        i, order = 0, {w: [] for w in range(WRITERS)}
        while i < len(got):  # chunks whole and contiguous, in each writer's order
            w, c = divmod((got[i] - 1) // 4, 1000)
            t = 1 + c % 3
            assert tuple(got[i:i + t]) in chunks
            order[w].append(c)
            i += t
        assert all(order[w] == sorted(order[w]) for w in order)
        assert all(len(order[w]) == len(results[w][0]) for w in order)
        assert cache.stats() == expected_stats(row_bytes, CAP, CAP)
    finally:
        cache.close()


def test_racing_store_layers_and_stores_near_capacity():
    """Threads mix store_layers with single-layer stores on a small cache and
    keep going past full.  store_layers is all-or-nothing under the race: its
    tokens are in every layer (in the same relative order) or in none, and
    each layer holds exactly the successful calls that target it."""
    L, H, D, CAP, WRITERS, CALLS = 3, 2, 4, 40, 8, 30
    cache = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D, max_seq_len=CAP, threads=2)
    row_bytes = H * D * 4

    def writer(w):
        def run():
            rng = np.random.default_rng(100 + w)
            ok, refused = [], []
            for c in range(CALLS):
                t = int(rng.integers(1, 4))
                target = int(rng.integers(-1, L))  # -1: store_layers
                ids = [(w * 1000 + c) * 4 + i + 1 for i in range(t)]
                k = filled(ids, H, D)
                try:
                    if target < 0:
                        K = np.stack([k] * L)
                        cache.store_layers(K, -K)
                    else:
                        cache.store_batch(target, k, -k)
                except CacheFullError:
                    refused.append((target, ids))
                else:
                    ok.append((target, ids))
            return ok, refused
        return run

    try:
        results = run_threads([writer(w) for w in range(WRITERS)])
        ok = [op for res in results for op in res[0]]
        refused = [op for res in results for op in res[1]]
        assert refused, "the cache never filled: the test proves nothing"
        whole_ids = {i for target, ids in ok if target < 0 for i in ids}
        rows = 0
        sequences = []
        for l in range(L):
            k, v = cache.get(l)
            rows += len(k)
            assert_whole_tokens(k)
            assert np.array_equal(bits(v), bits(-k))
            got = k[:, 0, 0].astype(np.int64).tolist()
            assert len(got) <= CAP
            want = [i for target, ids in ok if target in (-1, l) for i in ids]
            assert sorted(got) == sorted(want)
            sequences.append([i for i in got if i in whole_ids])
        assert all(s == sequences[0] for s in sequences)
        stored = sum(len(ids) * (L if target < 0 else 1) for target, ids in ok)
        assert stored == rows
        assert cache.stats() == expected_stats(row_bytes, stored, rows)
    finally:
        cache.close()


# ---------------------------------------------------------------------------
# 5. close() while other threads use the cache.
# ---------------------------------------------------------------------------

def assert_every_method_raises_closed(cache, H, D, L):
    for name, call in _all_methods(cache, H, D, L).items():
        try:
            call()
        except CacheClosedError:
            continue
        raise AssertionError(f"{name} did not raise CacheClosedError after close()")


def _all_methods(cache, H, D, L):
    tok = np.zeros((H, D), np.float32)
    batch = np.zeros((2, H, D), np.float32)
    whole = np.zeros((L, 2, H, D), np.float32)
    out = (np.zeros((1, H, D), np.float32), np.zeros((1, H, D), np.float32))
    return {
        "store": lambda: cache.store(0, tok, tok),
        "store T": lambda: cache.store(1, batch, batch),
        "store_batch": lambda: cache.store_batch(0, batch, batch),
        "store_layers": lambda: cache.store_layers(whole, whole),
        "get": lambda: cache.get(0),
        "get range": lambda: cache.get(L - 1, 0, 1),
        "get out": lambda: cache.get(0, 0, 1, out=out),
        "layer_len": lambda: cache.layer_len(0),
        "seq_len": lambda: cache.seq_len,
        "truncate": lambda: cache.truncate(1),
        "reset": lambda: cache.reset(),
        "stats": lambda: cache.stats(),
        "nbytes": lambda: cache.nbytes,
        "enter": lambda: cache.__enter__(),
    }


def test_close_while_threads_store_and_get():
    """close() during stores, gets and store_layers: every call either
    completes or raises CacheClosedError (never another error, never a
    crash), every call that starts after close raises it, and each arena is
    freed exactly once.  Repeated over fresh caches to cover many interleavings."""
    assert issubclass(CacheClosedError, ValueError)
    L, H, D = 4, 8, 64
    ROUNDS, WARMUP = 40, 20
    gc.collect()
    live_before = allocator_live()
    for r in range(ROUNDS):
        cache = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D,
                                      max_seq_len=20_000, prefault=False, threads=2)
        assert allocator_live()[1] == live_before[1] + 2 * L
        cache.store_layers(np.ones((L, 1, H, D), np.float32), np.ones((L, 1, H, D), np.float32))
        warmed = threading.Barrier(7)  # 6 workers + this thread

        def worker(i, cache=cache, warmed=warmed):
            def run():
                rng = np.random.default_rng(r * 10 + i)
                chunk = np.ones((64, H, D), np.float32)
                whole = np.ones((L, 64, H, D), np.float32)
                calls = 0
                while True:
                    if calls == WARMUP:
                        warmed.wait()
                    closed_before = cache.closed
                    try:
                        if i < 2:
                            cache.store_batch(i, chunk, chunk)
                        elif i == 2:
                            cache.store_layers(whole, whole)
                        else:
                            op = int(rng.integers(4))
                            l = int(rng.integers(L))
                            if op == 0:
                                cache.get(l, 0, 1)
                            elif op == 1:
                                cache.get(l)
                            elif op == 2:
                                cache.layer_len(l)
                            else:
                                cache.seq_len
                    except CacheClosedError:
                        break
                    except CacheFullError:
                        pass  # a completed call too (only if close() were very late)
                    assert not closed_before, "a call succeeded after close()"
                    calls += 1
                assert calls >= WARMUP
                assert_every_method_raises_closed(cache, H, D, L)
                return calls
            return run

        def closer(cache=cache, warmed=warmed):
            warmed.wait()  # every worker is in its loop, mid-traffic
            cache.close()
            cache.close()  # idempotent, even racing the workers
            return 0

        run_threads([worker(i) for i in range(6)] + [closer], barrier=warmed)
        assert cache.closed
        assert "closed" in repr(cache)
        assert_every_method_raises_closed(cache, H, D, L)
        cache.close()
        assert allocator_live() == live_before  # every arena freed exactly once
        del cache
