"""The prefix store's remote tier (issue #14, items 1-3) against real Redis servers.

Every server is Debian's ``redis-server`` started by the fixtures of
tests/redis_servers.py (a fresh one per test; one 3-master cluster for the session).
The references are independent of the library: keys and records are recomputed and
parsed by tests/prefix_reader.py (written from docs/format.md §7), the server is read
with plain redis-py commands (KEYS, GET, TTL, DBSIZE, INFO), and the KV a store loads is
compared byte for byte with what the source cache's own ``get`` returns.  Faults are
real: servers are killed (SIGKILL), paused (SIGSTOP) and restarted empty; the backoff's
clock is the only thing replaced (``kvcache.prefix.remote._now``), so that no test waits
for it.
"""

import logging
import re
import threading
import time

import numpy as np
import pytest

import kvcache
import kvcache.prefix.remote as remote_mod
import prefix_reader as pr
from helpers import SHAPE, contents, run_python, run_threads
from redis_servers import require_redis
from test_prefix import (B, DTYPES, MODEL, REMOTE_STATS, assert_same, cache, prompt, record_size,
                         ref_keys, shape_of, source)

KEY_RE = re.compile(rb"^kvcache:v1:[0-9a-f]{64}$")


# ---- helpers ---------------------------------------------------------------------------

def rkey(key):
    """The Redis key of a record, as docs/format.md §7.5 spells it."""
    return b"kvcache:v1:" + key.hex().encode()


def store(src, remote, **kw):
    return kvcache.PrefixStore.for_cache(src, MODEL, remote=remote, **kw)


def loads(src, s, tokens, n, dtype="float32"):
    """``s.load`` of ``tokens`` into a new cache gives ``n`` positions: exactly ``src``'s."""
    c = cache(dtype)
    assert s.load(c, tokens) == n
    assert_same(c, src, n)
    return c


def stored_keys(client):
    return set(client.keys(b"*"))


def remote_counts(s):
    return {k: v for k, v in s.stats().items() if k in REMOTE_STATS}


def warnings_of(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


class Clock:
    """The backoff's clock, moved by hand."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(remote_mod, "_now", c)
    return c


def local_prefix_store(src, tokens, blocks, tmp_path):
    """A disk directory holding the first ``blocks`` blocks of ``tokens``: the local
    tier of the fault tests (what a load returns when the remote fails)."""
    d = tmp_path / "local"
    with kvcache.PrefixStore.for_cache(src, MODEL, disk_dir=d) as s:
        assert s.save(src, tokens[:blocks * B]) == blocks
    return d


def seeded(redis_server, tmp_path, n_blocks, local_blocks):
    """A source and prompt of ``n_blocks`` blocks, all saved on the server; a disk
    directory holding the first ``local_blocks`` of them."""
    src, tokens = source(n_blocks * B + 1), prompt(n_blocks * B + 1)
    local = local_prefix_store(src, tokens, local_blocks, tmp_path)
    with store(src, redis_server.url, ram_bytes=0) as w:
        assert w.save(src, tokens) == n_blocks
    return src, tokens, local


def in_thread(fn):
    """Run ``fn`` on a thread; returns (thread, result holder)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    return t, out


# ---- import, options ------------------------------------------------------------------------

def test_import_kvcache_does_not_import_redis():
    code = ("import sys, kvcache\n"
            "s = kvcache.PrefixStore('m', n_layers=1, n_kv_heads=1, head_dim=2, block_tokens=2)\n"
            "s.stats()\n"
            "import kvcache.prefix.remote\n"
            "assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)\n"
            "assert issubclass(kvcache.RemoteTierError, OSError)\n"
            "assert issubclass(kvcache.RemoteTierError, kvcache.KVCacheError)\n")
    run_python("-c", code)


def test_without_redis_py_the_message_says_what_to_install():
    code = ("import sys\n"
            "sys.modules['redis'] = None  # as if not installed\n"
            "import kvcache\n"
            "try:\n"
            "    kvcache.PrefixStore('m', n_layers=1, n_kv_heads=1, head_dim=2, block_tokens=2,\n"
            "                        remote='redis://127.0.0.1:1/0')\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = run_python("-c", code).stdout
    assert "pip install kvcache[redis]" in out


BAD_OPTIONS = [
    (dict(remote=42), TypeError, r"expected a URL, a redis\.Redis or a redis\.cluster\.RedisCluster, got builtins\.int"),
    (dict(remote=b"redis://127.0.0.1:1"), TypeError, r"got builtins\.bytes"),
    (dict(remote="http://127.0.0.1:1/"), ValueError, r"expected a URL redis://host:port/db.*got 'http://127\.0\.0\.1:1/'"),
    (dict(remote="127.0.0.1:6379"), ValueError, r"expected a URL"),
    (dict(remote=""), ValueError, r"got ''"),
    (dict(remote="redis+cluster://127.0.0.1:1/3"), ValueError, r"no database number in a cluster URL"),
    (dict(remote="redis://127.0.0.1:1/0", remote_ttl=0), ValueError, r"remote_ttl: expected an int >= 1, got 0"),
    (dict(remote="redis://127.0.0.1:1/0", remote_ttl=1.5), TypeError, r"remote_ttl: expected an int or None, got float"),
    (dict(remote="redis://127.0.0.1:1/0", remote_ttl=True), TypeError, r"remote_ttl: expected an int or None, got bool"),
    (dict(remote="redis://127.0.0.1:1/0", remote_errors="ignore"), ValueError, r"remote_errors: expected 'miss' or 'raise', got 'ignore'"),
    (dict(remote="redis://127.0.0.1:1/0", remote_errors=None), TypeError, r"remote_errors: expected 'miss' or 'raise', got NoneType"),
    (dict(remote="redis://127.0.0.1:1/0", remote_timeout=0), ValueError, r"remote_timeout: expected seconds > 0, got 0"),
    (dict(remote="redis://127.0.0.1:1/0", remote_timeout=float("nan")), ValueError, r"remote_timeout: expected seconds > 0, got nan"),
    (dict(remote="redis://127.0.0.1:1/0", remote_timeout="2"), TypeError, r"remote_timeout: expected seconds .*got str"),
    (dict(remote="redis://127.0.0.1:1/0", remote_backoff=(1.0, 0.5)), ValueError, r"remote_backoff: expected first <= longest, got \(1\.0, 0\.5\)"),
    (dict(remote="redis://127.0.0.1:1/0", remote_backoff=(0, 1)), ValueError, r"remote_backoff: expected seconds > 0, got 0"),
    (dict(remote="redis://127.0.0.1:1/0", remote_backoff=5), TypeError, r"remote_backoff: expected \(first, longest\)"),
    (dict(remote_ttl=60), ValueError, r"remote_ttl: given without remote="),
    (dict(remote_errors="raise"), ValueError, r"remote_errors: given without remote="),
    (dict(remote_timeout=1.0), ValueError, r"remote_timeout: given without remote="),
]


@pytest.mark.parametrize("options, exc, message", BAD_OPTIONS)
def test_bad_options_are_refused(options, exc, message):
    remote = options.get("remote")
    if remote is not None and (not isinstance(remote, str) or "+cluster" in remote):
        require_redis()  # told apart by redis-py's classes or its URL parser
    src = cache()
    with pytest.raises(exc, match=message):
        kvcache.PrefixStore.for_cache(src, MODEL, **options)


def test_bad_clients_are_refused(redis_server):
    import redis
    src = cache()
    with pytest.raises(ValueError, match="remote_timeout: applies to a client built from a URL"):
        store(src, redis_server.client(), remote_timeout=1.0)
    with pytest.raises(ValueError, match="expected a client with decode_responses=False"):
        store(src, redis_server.client(decode_responses=True))
    import redis.asyncio
    with pytest.raises(TypeError, match=r"got redis\.asyncio\.client\.Redis"):
        store(src, redis.asyncio.Redis(port=redis_server.port))


# ---- round trips, layout ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_two_stores_share_one_server_byte_for_byte(redis_server, tmp_path, dtype):
    """Store A (RAM + disk A) saves; store B (no RAM, disk B) loads exactly what A's
    cache holds; every block came from Redis."""
    n = 5 * B
    src, tokens = source(n + 2, dtype), prompt(n + 2)
    size = record_size(src)
    with store(src, redis_server.url, disk_dir=tmp_path / "a") as a:
        assert a.save(src, tokens) == 5
        st = a.stats()
        assert (st["records_saved_remote"], st["bytes_sent_remote"], st["blocks_saved"]) == (5, 5 * size, 5)
    with store(src, redis_server.url, ram_bytes=0, disk_dir=tmp_path / "b") as b:
        assert b.match(tokens) == n
        loads(src, b, tokens, n, dtype)
        st = b.stats()
        assert (st["hit_tokens_remote"], st["bytes_read_remote"], st["hit_tokens_disk"]) == (2 * n, 5 * size, 0)
        assert st["remote_errors"] == 0 and st["integrity_failures"] == 0
        # Remote hits go to RAM (none here: ram_bytes=0), not to the disk tier.
        assert st["promotions_remote"] == 0 and pr.record_files(tmp_path / "b") == []
    assert redis_server.client().dbsize() == 5


def test_the_layout_is_one_key_per_record_holding_its_bytes(redis_server, tmp_path):
    n = 4 * B
    src, tokens = source(n + 1, "float16"), prompt(n + 1)
    keys = ref_keys(tokens, src)
    d = tmp_path / "d"
    with store(src, redis_server.url, disk_dir=d) as s:
        s.save(src, tokens)
    r = redis_server.client()
    assert stored_keys(r) == {rkey(k) for k in keys}
    for i, k in enumerate(keys):
        name = rkey(k)
        assert KEY_RE.match(name)  # hashes only: no token text, no model name
        value = r.get(name)
        assert r.type(name) == b"string" and r.ttl(name) == -1  # no TTL asked for
        # The value is the record of §7.2, byte for byte (the disk tier's file too).
        rec = pr.parse_record(value, **shape_of(src), key=k, parent=keys[i - 1] if i else None,
                              tokens=tokens[i * B:(i + 1) * B])
        assert rec.tokens == tokens[i * B:(i + 1) * B]
        assert value == (d / (k.hex() + ".kvp")).read_bytes()


def test_a_block_already_there_is_never_sent_again(redis_server):
    n = 4 * B
    src, tokens = source(n + 1), prompt(n + 1)
    keys = ref_keys(tokens, src)
    size = record_size(src)
    r = redis_server.client()
    planted = b"another writer's value"
    r.set(rkey(keys[1]), planted)  # a concurrent writer got there first
    with store(src, redis_server.url, ram_bytes=0) as a:
        assert a.save(src, tokens) == 3
        st = a.stats()
        assert (st["records_saved_remote"], st["bytes_sent_remote"]) == (3, 3 * size)
    assert r.get(rkey(keys[1])) == planted  # SET NX: never replaced
    # ...even by a writer that found the key missing a moment before (its EXISTS and
    # its SET are two round trips): the tier's SET itself is NX.
    with store(src, redis_server.url, ram_bytes=0) as late:
        assert late.remote.put([(keys[1], memoryview(b"x" * size)), (keys[0], memoryview(b"y"))]) == [
            False, False]
    assert r.get(rkey(keys[1])) == planted and len(r.get(rkey(keys[0]))) == size
    sets = r.info("commandstats")["cmdstat_set"]["calls"]
    with store(src, redis_server.url, ram_bytes=0) as b:  # another host saving the same prompt
        assert b.save(src, tokens) == 0
        st = b.stats()
        assert (st["records_saved_remote"], st["bytes_sent_remote"]) == (0, 0)
    assert r.info("commandstats")["cmdstat_set"]["calls"] == sets


def test_save_sends_blocks_held_locally_but_missing_remotely(redis_server, tmp_path):
    """A block saved while the server was down (or evicted by Redis) reaches it at the
    next save of its prompt, from RAM, from disk, or read anew from the cache."""
    n = 3 * B
    src, tokens = source(n + 1), prompt(n + 1)
    size = record_size(src)
    r = redis_server.client()
    with store(src, redis_server.url, ram_bytes=size, disk_dir=tmp_path / "d") as s:
        assert s.save(src, tokens) == 3      # RAM keeps block 0 only, the disk all three
        r.flushall()
        assert s.save(src, tokens) == 0      # nothing new here...
        assert s.stats()["records_saved_remote"] == 6  # ...but all three sent again
        assert s.stats()["blocks_saved"] == 3
    with store(src, redis_server.url, ram_bytes=0) as other:
        loads(src, other, tokens, n)


def test_ttl_is_set_and_refreshed_by_hits(redis_server):
    n = 3 * B
    src, tokens = source(n + 1), prompt(n + 1)
    names = [rkey(k) for k in ref_keys(tokens, src)]
    r = redis_server.client()
    with store(src, redis_server.url, ram_bytes=0, remote_ttl=1000) as s:
        s.save(src, tokens)
        assert all(900 < r.ttl(k) <= 1000 for k in names)
        for op in ("match", "load", "save"):
            for k in names:
                r.expire(k, 5)
            if op == "match":
                assert s.match(tokens) == n
            elif op == "load":
                assert s.load(cache(), tokens) == n
            else:
                assert s.save(src, tokens) == 0  # found there: refreshed, not sent
            assert all(900 < r.ttl(k) <= 1000 for k in names), op
        assert s.stats()["records_saved_remote"] == 3
    with store(src, redis_server.url, ram_bytes=0) as plain:  # without remote_ttl: left as they are
        for k in names:
            r.expire(k, 5)
        assert plain.load(cache(), tokens) == n
        assert all(r.ttl(k) <= 5 for k in names)


def test_promotion_to_ram_and_no_round_trip_when_local_tiers_hold_all(redis_server):
    n = 3 * B
    src, tokens = source(n + 1), prompt(n + 1)
    size = record_size(src)
    with store(src, redis_server.url, ram_bytes=0) as a:
        a.save(src, tokens)
    with store(src, redis_server.url, ram_bytes=2 * size) as s:
        c = cache()
        assert s.load(c, tokens) == n
        st = s.stats()
        # The chain's head is kept in RAM (its tail would never match without it).
        assert (st["promotions_remote"], st["records_ram"], st["remote_round_trips"]) == (2, 2, 2)
        loads(src, s, tokens, n)          # blocks 0-1 from RAM, 2 from Redis
        assert (s.stats()["hit_tokens_ram"], s.stats()["remote_round_trips"]) == (2 * B, 3)
        # Saves at the RAM budget evict promoted records (immutable bytes: never reused
        # as a save's buffer) without touching what loads read.
        other, other_tokens = source(2 * B + 1, seed=7), prompt(2 * B + 1, seed=7)
        assert s.save(other, other_tokens) == 2
        loads(src, s, tokens, n)
        c = cache()
        assert s.load(c, other_tokens) == 2 * B
        assert_same(c, other, 2 * B)
    with store(src, redis_server.url) as t:
        t.load(cache(), tokens)
        trips = t.stats()["remote_round_trips"]
        assert t.match(tokens) == n and t.load(cache(), tokens) == n  # all in RAM now
        assert t.stats()["remote_round_trips"] == trips


def test_stats_after_a_known_workload(redis_server):
    """Every remote counter, derived from the workload (records of ``size`` bytes)."""
    a, b = prompt(3 * B + 1, seed=1), prompt(2 * B, seed=2)
    ca, cb = source(3 * B + 1, seed=1), source(2 * B, seed=2)
    size = record_size(ca)
    with store(ca, redis_server.url, ram_bytes=0) as s:
        assert s.save(ca, a) == 3             # EXISTS, SET x3
        assert s.save(cb, b) == 2             # EXISTS, SET x2
        assert s.save(ca, a) == 0             # EXISTS only
        assert s.match(a) == 3 * B            # EXISTS
        assert s.match(b + [1]) == 2 * B      # EXISTS
        assert s.load(cache(), a) == 3 * B    # GET x3
        redis_server.client().delete(rkey(ref_keys(b, cb)[1]))
        assert s.load(cache(), b + [9]) == B  # GET x2, the second a miss
        st = s.stats()
    want = dict.fromkeys(REMOTE_STATS, 0)
    want.update(hit_tokens_remote=3 * B + 2 * B + 3 * B + B, records_saved_remote=5,
                bytes_sent_remote=5 * size, bytes_read_remote=4 * size,
                remote_round_trips=1 + 2 + 2 + 1 + 1 + 1 + 1 + 1)  # PING at creation first
    assert {k: st[k] for k in REMOTE_STATS} == want
    assert (st["lookups"], st["query_tokens"], st["blocks_saved"]) == (4, 2 * len(a) + len(b) + 1 + len(b) + 1, 0)


# ---- integrity ----------------------------------------------------------------------------

DAMAGE = ["rows", "trailer", "tokens", "key", "parent", "header", "truncated", "extended",
          "another_block", "another_model", "another_shape", "not_a_string", "empty"]


def damaged(how, value, keys, bad, r, src, tokens, url):
    """The value to plant under block ``bad``'s key, and the check it fails."""
    data = bytearray(value)
    hb = pr.header_bytes(B)
    flips = {"rows": (hb + 9, "checksum"), "trailer": (len(data) - 2, "checksum"),
             "tokens": (128 + 5, "tokens"), "key": (48 + 3, "key"), "parent": (80 + 7, "parent"),
             "header": (20, "header")}
    if how in flips:
        off, why = flips[how]
        data[off] ^= 0x04
        return bytes(data), why
    if how == "truncated":
        return bytes(data[:-1]), "size"
    if how == "extended":
        return bytes(data) + b"\0", "size"
    if how == "empty":
        return b"", "size"
    if how == "another_block":  # the chain's next record, under this key
        return r.get(rkey(keys[bad + 1])), "key"
    if how == "another_model":  # the same tokens and shape, another model's record
        with kvcache.PrefixStore.for_cache(src, "other/model@r", remote=url, ram_bytes=0) as o:
            o.save(src, tokens)
        return r.get(rkey(pr.keys(tokens, "other/model@r", **shape_of(src))[bad])), "key"
    if how == "another_shape":  # a record of another head_dim (another size)
        other = source(len(tokens), head_dim=SHAPE["head_dim"] + 3)
        with kvcache.PrefixStore.for_cache(other, MODEL, remote=url, ram_bytes=0) as o:
            o.save(other, tokens)
        return r.get(rkey(ref_keys(tokens, other)[bad])), "size"
    raise AssertionError(how)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_remote_record_is_a_miss_at_that_block(redis_server, how, caplog):
    n, bad = 5 * B, 2
    src, tokens = source(n + 1, "bfloat16"), prompt(n + 1)
    keys = ref_keys(tokens, src)
    r = redis_server.client()
    with store(src, redis_server.url, ram_bytes=0) as a:
        assert a.save(src, tokens) == 5
    if how == "not_a_string":  # a key of ours holding another type
        r.delete(rkey(keys[bad]))
        r.hset(rkey(keys[bad]), "f", "v")
        why = "size"
    else:
        value, why = damaged(how, r.get(rkey(keys[bad])), keys, bad, r, src, tokens, redis_server.url)
        with pytest.raises(pr.RecordError):  # the independent reader refuses it too
            pr.parse_record(value, **shape_of(src), key=keys[bad], parent=keys[bad - 1],
                            tokens=tokens[bad * B:(bad + 1) * B])
        r.set(rkey(keys[bad]), value)
    others = {k: r.get(rkey(k)) for i, k in enumerate(keys) if i != bad}
    with store(src, redis_server.url) as s:
        assert s.match(tokens) == n  # match checks nothing
        c = cache("bfloat16")
        with caplog.at_level(logging.ERROR, logger="kvcache"):
            assert s.load(c, tokens) == bad * B
        assert_same(c, src, bad * B)
        assert [m for m in (rec.getMessage() for rec in caplog.records)
                if rkey(keys[bad]).decode() in m and f"fails its {why} check" in m and "removed" in m]
        st = s.stats()
        assert (st["integrity_failures"], st["integrity_failures_remote"], st["mac_failures"],
                st["deleted_remote"]) == (1, 1, 0, 1)
        assert st["hit_tokens_remote"] == n + bad * B and st["promotions_remote"] == bad
        assert not r.exists(rkey(keys[bad]))  # deleted; the others untouched
        assert {k: r.get(rkey(k)) for i, k in enumerate(keys) if i != bad} == others
        # Now a plain miss; a save repairs the chain.
        assert s.match(tokens) == bad * B
        assert s.save(src, tokens) == 1 and s.stats()["records_saved_remote"] == 1
    with store(src, redis_server.url, ram_bytes=0) as t:
        loads(src, t, tokens, n, "bfloat16")


def test_hmac_records_and_a_wrong_secret_deletes_nothing(redis_server, caplog):
    n = 3 * B
    src, tokens = source(n + 1, "float16"), prompt(n + 1)
    keys = ref_keys(tokens, src)
    r = redis_server.client()
    with store(src, redis_server.url, ram_bytes=0, secret=b"k1") as a:
        assert a.save(src, tokens) == 3
    snapshot = {k: r.get(rkey(k)) for k in keys}
    for i, k in enumerate(keys):
        assert len(snapshot[k]) == record_size(src, mac=True)
        pr.parse_record(snapshot[k], **shape_of(src), key=k, secret=b"k1")
    for secret in (b"k2", None):
        with store(src, redis_server.url, ram_bytes=0, secret=secret) as s:
            with caplog.at_level(logging.ERROR, logger="kvcache"):
                loads(src, s, tokens, 0, "float16")
            st = s.stats()
            assert (st["mac_failures"], st["integrity_failures_remote"], st["deleted_remote"]) == (1, 1, 0)
        assert {k: r.get(rkey(k)) for k in keys} == snapshot  # kept, byte for byte
    assert sum("fails its HMAC" in m.getMessage() and "kept" in m.getMessage()
               for m in caplog.records) == 2
    # A forged record (rows changed, no secret to seal it) is refused and kept as well.
    forged = bytearray(snapshot[keys[1]])
    forged[pr.header_bytes(B) + 1] ^= 0x80
    r.set(rkey(keys[1]), bytes(forged))
    with store(src, redis_server.url, ram_bytes=0, secret=b"k1") as s:
        loads(src, s, tokens, B, "float16")
        assert (s.stats()["mac_failures"], s.stats()["deleted_remote"]) == (1, 0)
    r.set(rkey(keys[1]), snapshot[keys[1]])
    with store(src, redis_server.url, ram_bytes=0, secret=b"k1") as s:
        loads(src, s, tokens, n, "float16")


def test_redis_eviction_only_shortens_the_prefix(redis_server):
    """maxmemory + allkeys-lru: records evicted by Redis itself are misses, never
    wrong bytes (one key per record: a block is there whole or not at all).  A hot
    prompt, loaded and saved again between the saves of cold ones, keeps its records
    (its GETs make them recent); the cold ones lose theirs; every load is a verified
    prefix of its own prompt's KV."""
    shape = dict(n_layers=2, n_kv_heads=4, head_dim=64)
    bt, blocks = 16, 8

    def prompt_cache(seed):
        c = kvcache.TieredKVCache(max_seq_len=(blocks + 1) * bt, block_tokens=bt, dtype="float32", **shape)
        k = np.random.default_rng(seed).standard_normal((2, blocks * bt, 4, 64), dtype=np.float32)
        c.store_layers(k, -k)
        return c, prompt(blocks * bt + 1, seed=seed)

    def loaded(s, src, tokens):
        got = kvcache.TieredKVCache(max_seq_len=(blocks + 1) * bt, block_tokens=bt, dtype="float32", **shape)
        n = s.load(got, tokens)
        assert n % bt == 0
        for layer in range(2):  # exactly the source's first n positions
            assert [a.tobytes() for a in got.get(layer)] == [a.tobytes() for a in src.get(layer, 0, n)]
        return n

    r = redis_server.client()
    size = pr.record_size(**shape, block_tokens=bt, dtype="float32")
    redis_server.config_set("maxmemory", r.info("memory")["used_memory"] + 60 * size)
    redis_server.config_set("maxmemory-policy", "allkeys-lru")
    hot, hot_tokens = prompt_cache(1)
    colds = [prompt_cache(10 + i) for i in range(10)]
    with kvcache.PrefixStore.for_cache(hot, MODEL, remote=redis_server.url, ram_bytes=0) as s:
        s.save(hot, hot_tokens)
        hot_loads = []
        for src, tokens in colds:
            s.save(src, tokens)
            hot_loads.append(loaded(s, hot, hot_tokens))
            s.save(hot, hot_tokens)  # as after a prefill: what was evicted is sent again
        cold_loads = [loaded(s, src, tokens) for src, tokens in colds]
        assert r.info("stats")["evicted_keys"] > 0 and r.dbsize() < 11 * blocks
        assert max(hot_loads) == blocks * bt         # the hot prompt stayed (mostly) whole
        assert min(cold_loads) < blocks * bt         # the cold ones were cut short
        st = s.stats()
        assert st["integrity_failures"] == 0 and st["remote_errors"] == 0  # misses, not errors


# ---- URLs and clients ------------------------------------------------------------------------

def round_trip(remote, n=3 * B, **kw):
    src, tokens = source(n + 1, "int8"), prompt(n + 1)
    with store(src, remote, ram_bytes=0, **kw) as a:
        assert a.save(src, tokens) == n // B
    with store(src, remote, ram_bytes=0, **kw) as b:
        loads(src, b, tokens, n, "int8")
        assert b.stats()["remote_errors"] == 0


def test_unix_socket_url(redis_unix_server):
    round_trip(redis_unix_server.unix_url)
    round_trip(redis_unix_server.unix_url.replace("db=0", "db=3"))
    assert redis_unix_server.client().dbsize() == 3
    assert redis_unix_server.client(db=3).dbsize() == 3


def test_password_url_and_a_wrong_password(redis_server_auth, caplog):
    server = redis_server_auth
    round_trip(server.url)
    wrong = server.url.replace(server.password, "not-it")
    src = cache()
    with caplog.at_level(logging.WARNING, logger="kvcache"):
        with store(src, wrong) as s:
            assert s.stats()["remote_down"] == 1 and s.stats()["remote_errors_connect"] == 1
            assert "not-it" not in repr(s)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "remote tier" in text and "not-it" not in text and "***" in text
    with pytest.raises(kvcache.RemoteTierError, match="AuthenticationError|WRONGPASS|invalid"):
        store(src, wrong, remote_errors="raise")


def test_ready_clients_are_used_as_they_are(redis_server, redis_cluster):
    r = redis_server.client()
    round_trip(r)
    assert r.ping()  # the caller's client stays open after the stores close
    c = redis_cluster.client()
    round_trip(c)
    assert c.ping()


def test_cluster_spreads_records_over_the_nodes(redis_cluster, tmp_path):
    n = 12 * B
    src, tokens = source(n + 1, "float16"), prompt(n + 1)
    keys = ref_keys(tokens, src)
    with store(src, redis_cluster.url, disk_dir=tmp_path / "a", remote_ttl=500) as a:
        assert a.save(src, tokens) == 12
    per_node = [node.client().dbsize() for node in redis_cluster.nodes]
    assert sum(per_node) == 12 and sum(1 for c in per_node if c) >= 2, per_node
    rc = redis_cluster.client()
    assert {rkey(k) for k in keys} == {k for node in redis_cluster.nodes for k in node.client().keys()}
    assert all(400 < rc.ttl(rkey(k)) <= 500 for k in keys)
    with store(src, redis_cluster.url, ram_bytes=0, disk_dir=tmp_path / "b", remote_ttl=500) as b:
        assert b.match(tokens) == n
        loads(src, b, tokens, n, "float16")
        assert b.stats()["remote_errors"] == 0 and b.stats()["hit_tokens_remote"] == 2 * n
    for k in keys:
        pr.parse_record(rc.get(rkey(k)), **shape_of(src), key=k)


# ---- faults ----------------------------------------------------------------------------------

def test_server_absent_at_start(redis_server, tmp_path, clock, caplog):
    n = 4 * B
    src, tokens = source(n + 1), prompt(n + 1)
    local = local_prefix_store(src, tokens, 2, tmp_path)
    url = redis_server.url
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="kvcache"):
        with store(src, url, ram_bytes=0, disk_dir=local) as s:  # made all the same
            st = remote_counts(s)
            assert (st["remote_down"], st["remote_outages"], st["remote_errors_connect"]) == (1, 1, 1)
            loads(src, s, tokens, 2 * B)          # what the local tier holds
            assert s.stats()["remote_skipped"] == 1    # no round trip while backing off
            redis_server.restart()
            with store(src, url, ram_bytes=0) as writer:
                writer.save(src, tokens)
            clock.t += 0.5                             # the first retry is due
            loads(src, s, tokens, n)
            st = s.stats()
            assert (st["remote_down"], st["remote_outages"], st["hit_tokens_remote"], st["hit_tokens_disk"]) == (
                0, 1, 2 * B, 4 * B)
    assert len(warnings_of(caplog, "is down (ConnectionError during connect")) == 1
    assert len(warnings_of(caplog, "is back after")) == 1
    redis_server.kill()
    with pytest.raises(kvcache.RemoteTierError) as err:
        store(src, url, remote_errors="raise")
    assert isinstance(err.value, OSError) and redis_server.url.split("@")[-1].split("/")[0] in str(err.value)


@pytest.mark.parametrize("errors", ["miss", "raise"])
def test_killed_mid_load(redis_server, tmp_path, errors, caplog):
    n = 6 * B
    src, tokens, local = seeded(redis_server, tmp_path, 6, 2)
    s = store(src, redis_server.url, ram_bytes=0, disk_dir=local, remote_errors=errors, remote_timeout=30)
    with s, caplog.at_level(logging.WARNING, logger="kvcache"):
        c = cache()
        before = contents(c)
        redis_server.pause()
        t, out = in_thread(lambda: s.load(c, tokens))
        time.sleep(0.3)      # the GETs are sent; the load waits for the replies
        redis_server.kill()  # ...and the connection dies under it
        t.join()
        if errors == "raise":
            assert isinstance(out["error"], kvcache.RemoteTierError) and isinstance(out["error"], OSError)
            assert contents(c) == before and c.seq_len == 0
        else:
            assert out["value"] == 2 * B  # the local prefix, nothing of the remote
            assert_same(c, src, 2 * B)
        st = s.stats()
        assert (st["remote_errors_load"], st["remote_outages"], st["remote_down"], st["hit_tokens_remote"]) == (1, 1, 1, 0)
    assert len(warnings_of(caplog, "during load")) == 1


@pytest.mark.parametrize("errors", ["miss", "raise"])
def test_killed_mid_save(redis_server, tmp_path, errors, caplog):
    n = 6 * B
    src, tokens = source(n + 1), prompt(n + 1)
    s = store(src, redis_server.url, disk_dir=tmp_path / "d", remote_errors=errors, remote_timeout=30)
    watch = redis_server.client()
    with s, caplog.at_level(logging.WARNING, logger="kvcache"):
        # Writes wait (reads do not): the save's EXISTS is answered, its SETs are
        # held by the server, which dies while the save waits for their replies.
        watch.client_pause(60000, all=False)
        t, out = in_thread(lambda: s.save(src, tokens))
        deadline = time.monotonic() + 60
        while watch.info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.info("clients")["blocked_clients"] == 1, "the save's SETs never reached the server"
        redis_server.kill()
        t.join()
        if errors == "raise":
            assert isinstance(out["error"], kvcache.RemoteTierError)
        else:
            assert out["value"] == 6
        st = s.stats()
        assert st["blocks_saved"] == 6 and st["records_saved_remote"] == 0
        assert (st["remote_errors_save"], st["remote_outages"], st["remote_down"]) == (1, 1, 1)
        c = cache()  # every block is in the local tiers all the same
        assert s.load(c, tokens) == n
        assert_same(c, src, n)
        assert len(pr.record_files(tmp_path / "d")) == 6
    assert len(warnings_of(caplog, "during save")) == 1


def test_paused_server_times_out_then_recovers_with_backoff(redis_server, tmp_path, clock, caplog):
    n = 4 * B
    src, tokens, local = seeded(redis_server, tmp_path, 4, 1)
    with caplog.at_level(logging.WARNING, logger="kvcache"), \
            store(src, redis_server.url, ram_bytes=0, disk_dir=local, remote_timeout=0.3,
                  remote_backoff=(0.5, 2.0)) as s:
        redis_server.pause()
        loads(src, s, tokens, B)
        assert warnings_of(caplog, "TimeoutError during load")
        trips = s.stats()["remote_round_trips"]
        # Backing off: no round trip, each call counted as skipped.
        assert s.match(tokens) == B and s.load(cache(), tokens) == B
        assert (s.stats()["remote_skipped"], s.stats()["remote_round_trips"]) == (2, trips)
        # Retries fail while it stays paused; the delay doubles up to its cap.
        for delay in (0.5, 1.0, 2.0, 2.0):
            clock.t += delay - 0.0625
            assert s.match(tokens) == B                # still backing off
            clock.t += 0.0625
            assert s.match(tokens) == B                # the retry: times out
        st = s.stats()
        assert (st["remote_errors"], st["remote_errors_load"], st["remote_errors_match"], st["remote_skipped"]) == (
            5, 1, 4, 2 + 4)
        redis_server.resume()
        clock.t += 2.0
        loads(src, s, tokens, n)
        st = s.stats()
        assert (st["remote_down"], st["remote_outages"]) == (0, 1)
    assert len(warnings_of(caplog, "remote tier")) == 2  # one outage, one recovery
    assert len(warnings_of(caplog, "is back after")) == 1


def test_raise_mode_tries_every_call(redis_server, caplog):
    src, tokens = source(2 * B + 1), prompt(2 * B + 1)
    url = redis_server.url
    with store(src, url, remote_errors="raise") as s:
        assert s.save(src, tokens) == 2
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="kvcache"):
            other = cache()
            for call in (lambda: s.match(tokens + [5] * B), lambda: s.load(other, tokens + [5] * B),
                         lambda: s.save(src, tokens)):
                with pytest.raises(kvcache.RemoteTierError, match="ConnectionError"):
                    call()
            assert other.seq_len == 0
        st = s.stats()
        assert (st["remote_errors"], st["remote_skipped"], st["remote_outages"]) == (3, 0, 1)
    assert len(warnings_of(caplog, "remote tier")) == 1


def test_restarted_empty_server_gives_misses_then_fills_again(redis_server, caplog):
    n = 3 * B
    src, tokens = source(n + 1), prompt(n + 1)
    with store(src, redis_server.url, ram_bytes=0) as s:
        s.save(src, tokens)
        redis_server.restart()  # empty, same port: the pooled connection is dead
        with caplog.at_level(logging.WARNING, logger="kvcache"):
            c = cache()
            assert s.load(c, tokens) == 0
            assert c.seq_len == 0
            assert s.save(src, tokens) == 3
            loads(src, s, tokens, n)
        assert s.stats()["remote_errors"] == 0  # a broken pooled connection is retried at once
    assert not warnings_of(caplog, "remote tier")


def test_cluster_node_paused_and_killed(redis_cluster, clock, caplog):
    n = 12 * B
    src, tokens = source(n + 1), prompt(n + 1)
    with store(src, redis_cluster.url, ram_bytes=0) as w:
        assert w.save(src, tokens) == 12
    with caplog.at_level(logging.WARNING, logger="kvcache"), \
            store(src, redis_cluster.url, ram_bytes=0, remote_timeout=0.3) as s:
        victim = redis_cluster.nodes[1]
        victim.pause()
        c = cache()
        assert s.load(c, tokens) == 0
        assert c.seq_len == 0
        assert s.stats()["remote_errors_load"] == 1
        victim.resume()
        clock.t += 0.5
        loads(src, s, tokens, n)
        victim.kill()
        clock.t += 100
        c = cache()
        assert s.load(c, tokens) == 0  # a node holding part of the chain refuses connections
        assert c.seq_len == 0
        assert (s.stats()["remote_errors"], s.stats()["remote_outages"]) == (2, 2)
    assert len(warnings_of(caplog, "is back after")) == 1


def test_threads_share_one_remote_store(redis_server):
    common = prompt(B, seed=50)
    work = []
    for t in range(3):
        tokens = common + prompt(3 * B, seed=60 + t)
        src = cache()
        k = np.random.default_rng(t).standard_normal((3, 4 * B, 2, 5), dtype=np.float32)
        k[:, :B] = np.random.default_rng(99).standard_normal((3, B, 2, 5), dtype=np.float32)
        src.store_layers(k, -k)
        work.append((tokens, src))
    with store(work[0][1], redis_server.url, ram_bytes=0) as s:
        def worker(tokens, src):
            def run():
                for _ in range(3):
                    s.save(src, tokens)
                    c = cache()
                    assert s.load(c, tokens + [1]) == 4 * B
                    assert_same(c, src, 4 * B)
            return run
        run_threads([worker(*w) for w in work])
        assert s.stats()["records_saved_remote"] == 1 + 3 * 3
    assert redis_server.client().dbsize() == 10
