"""Prefix-store benchmarks of the remote tier (issue #14): load and save through
Redis against what the client alone does with the same bytes.

Shape 32 x 8 x 128, float16 cache, ``block_tokens`` 256 (test_prefix.py's): a
token is 128 KiB and the 1024-token prefix 128 MiB, 4 records of 32 MiB.  The
server is Debian's ``redis-server`` on loopback, started by the module
(tests/redis_servers.py's ``RedisServer``: ``--save "" --appendonly no``) and
stopped at its end; the benchmarks skip without it or without redis-py.

* ``load`` of the prefix into an empty cache (emptied outside the timing) by a
  store with no local tier holding anything (``ram_bytes=0``, no ``disk_dir``):
  every step fetches the 4 records from Redis in one pipelined round trip,
  checks each (header, key, parent, token ids, CRC32C) and copies its rows;
  vs a plain redis-py pipelined GET of the same keys (``transaction=False``),
  which only receives the values: the client's limit.
* ``save`` of the prefix into an empty server (FLUSHALL before every step of
  either side, untimed) by a store with no local tier: the records are read
  out of the cache, sealed and sent (an EXISTS round trip, then SET NX); vs a
  plain pipelined SET of the same record bytes.
* ``load`` by 1, 2 and 4 threads at once, each with its own store and cache,
  from the same server: aggregate GB/s vs as many threads each running the
  plain pipelined GET with its own client.

Both sides use clients built from the same URL (redis-py picks hiredis's
parser when installed) with the tier's default timeouts.  After each
benchmark the store's counters show that every timed load was served by the
remote tier, and the loaded rows are compared with the source cache.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import kvcache
from _bench import measure
from kvcache._benchkit import Side
from test_prefix import BLOCK, TOKEN_BYTES, filled_cache, new_cache, same_rows

redis = pytest.importorskip("redis")
# Last on the path: the test suite's modules named like benchmarks' (test_prefix...) must not
# shadow them.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from redis_servers import RedisServer  # noqa: E402

from kvcache.prefix.remote import DEFAULT_TIMEOUT, redis_key  # noqa: E402

PREFIX = 1024
BLOCKS = PREFIX // BLOCK
MODEL = "bench/model"
TARGET = 0.8
GET, SET = "redis-py pipelined GET", "redis-py pipelined SET"
# The same client tuned by hand, reported to show what it can reach (no target): 1 MiB
# socket reads instead of 64 KiB; redis-py's pure-Python command packer, which sends a
# large value as it is, where the hiredis one (the default with hiredis) copies it twice.
GET_1M, SET_ZERO_COPY = f"{GET}, 1 MiB reads", f"{SET}, Python packer"


CLIENTS = []  # the baselines' clients, closed with the server


@pytest.fixture(scope="module")
def server():
    with RedisServer.start() as s:
        yield s
        while CLIENTS:
            CLIENTS.pop().close()


@pytest.fixture(scope="module")
def source():
    """A float16 cache holding PREFIX + 1 positions of random KV, and the prompt's ids."""
    c, ids = filled_cache(PREFIX)
    yield c, ids
    c.close()


def plain_client(server, **options):
    """A client as the tier makes one from the URL (the same timeouts); ``options`` go to it."""
    c = redis.Redis.from_url(server.url, socket_timeout=DEFAULT_TIMEOUT,
                             socket_connect_timeout=DEFAULT_TIMEOUT, **options)
    CLIENTS.append(c)
    return c


def zero_copy_packer():
    """redis-py's Python command packer (its default buffer cutoff, 6000 bytes): a memoryview
    or large bytes argument goes to ``sendall`` as it is."""
    from redis.connection import Encoder, PythonRespSerializer
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def remote_store(cache, server):
    """A store whose only tier holding anything is Redis: every hit is a round trip."""
    return kvcache.PrefixStore.for_cache(cache, MODEL, ram_bytes=0, remote=server.url,
                                         remote_errors="raise")


def saved(server, cache, ids):
    """Save the prefix into the emptied server: its Redis keys and record bytes, in chain order."""
    server.client().flushall()
    with remote_store(cache, server) as store:
        assert store.save(cache, ids) == BLOCKS
        keys = [redis_key(k) for k in
                kvcache.prefix_hashes(ids[:PREFIX], model=MODEL, n_layers=cache.config.n_layers,
                                      n_kv_heads=cache.config.n_kv_heads,
                                      head_dim=cache.config.head_dim, block_tokens=BLOCK,
                                      dtype=cache.config.dtype)]
    values = server.client().mget(keys)
    assert all(v is not None for v in values)
    return keys, values


def plain_get(client, keys):
    """One pipelined GET of ``keys``: a step of the baseline (the values are kept in ``got``)."""
    got = []

    def step():
        p = client.pipeline(transaction=False)
        for k in keys:
            p.get(k)
        got[:] = p.execute()
    return step, got


class Loader:
    """One loading thread's store, target cache and step, counting its loads."""

    def __init__(self, server, cache, ids):
        self.store, self.target = remote_store(cache, server), new_cache(PREFIX)
        self.ids, self.loads = ids, 0

    def step(self):
        assert self.store.load(self.target, self.ids) == PREFIX
        self.loads += 1

    def check(self, source, values):
        """Every load went to Redis (nothing held locally, nothing refused), and the last one
        holds the source's rows."""
        s = self.store.stats()
        assert s["hit_tokens_remote"] == self.loads * PREFIX
        assert s["hit_tokens_ram"] == s["hit_tokens_disk"] == 0 and s["records_ram"] == 0
        assert s["bytes_read_remote"] == self.loads * sum(len(v) for v in values)
        assert s["integrity_failures"] == 0 and s["remote_errors"] == 0
        same_rows(source, self.target, PREFIX)

    def close(self):
        self.store.close()
        self.target.close()


def concurrently(pool, steps):
    """A step running every one of ``steps`` at once on ``pool``'s threads."""
    def step():
        for f in [pool.submit(s) for s in steps]:
            f.result()
    return step


@pytest.mark.parametrize("n", [1, 2, 4], ids=lambda n: f"{n}-loaders")
def test_load(benchmark, server, source, n):
    """n threads each loading the prefix from Redis (own store, own cache) vs n threads each
    running the plain pipelined GET of the same keys (own client)."""
    cache, ids = source
    keys, values = saved(server, cache, ids)
    loaders = [Loader(server, cache, ids) for _ in range(n)]
    plain = [plain_get(plain_client(server), keys) for _ in range(n)]
    tuned = plain_get(plain_client(server, socket_read_size=1 << 20), keys) if n == 1 else None
    targets = [ld.target for ld in loaders]

    def reset():
        for t in targets:
            t.reset()

    with ThreadPoolExecutor(n) as pool:
        if n == 1:
            proj, what = loaders[0].step, ""
            baselines = [Side(GET, plain[0][0], PREFIX), Side(GET_1M, tuned[0], PREFIX)]
        else:
            proj = concurrently(pool, [ld.step for ld in loaders])
            baselines = [Side(f"{n} x {GET}", concurrently(pool, [step for step, _ in plain]),
                              n * PREFIX)]
            what = f", {n} loaders at once"
        measure(benchmark, name=f"prefix load {PREFIX} tokens from redis{what}",
                proj=Side("kvcache", proj, n * PREFIX, enter=reset), baselines=baselines,
                targets={GET: TARGET} if n == 1 else {}, token_bytes=TOKEN_BYTES)
    for ld in loaders:
        ld.check(cache, values)
        ld.close()
    for _, got in plain + ([tuned] if tuned else []):
        assert got == values  # the baseline really fetched the records


def test_save(benchmark, server, source):
    """save of the prefix into an empty server vs the plain pipelined SET of its records."""
    cache, ids = source
    keys, values = saved(server, cache, ids)
    admin = server.client()
    store = remote_store(cache, server)
    client, fast = plain_client(server), plain_client(server, command_packer=zero_copy_packer())
    saves = [0]

    def step():
        assert store.save(cache, ids) == BLOCKS
        saves[0] += 1

    def plain_set(client):
        def step():
            p = client.pipeline(transaction=False)
            for k, v in zip(keys, values):
                p.set(k, v)
            assert p.execute() == [True] * BLOCKS
        return step

    measure(benchmark, name=f"prefix save {PREFIX} tokens to redis (empty server)",
            proj=Side("kvcache", step, PREFIX, enter=admin.flushall),
            baselines=[Side(SET, plain_set(client), PREFIX, enter=admin.flushall),
                       Side(SET_ZERO_COPY, plain_set(fast), PREFIX, enter=admin.flushall)],
            targets={SET: TARGET}, token_bytes=TOKEN_BYTES)
    admin.flushall()
    step()  # the server holds exactly what the store sent: the records, byte for byte
    assert admin.mget(keys) == values and admin.dbsize() == BLOCKS
    s = store.stats()
    assert s["records_saved_remote"] == saves[0] * BLOCKS and s["remote_errors"] == 0
    store.close()
