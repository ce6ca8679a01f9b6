"""The Redis fixtures of redis_servers.py against the real servers they start.

What the tier's tests rely on: a server answers, wants its password, listens on its
socket; kill, pause and restart do to a client what they would in production; the
cluster spreads keys over its three masters; every process is gone after its test,
passed or failed; and a machine without Redis skips (or, under KVCACHE_REQUIRE_REDIS=1,
fails) naming what is missing.
"""
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

import redis_servers
from redis_servers import MISSING_PREFIX, RedisServer

TESTS = os.path.dirname(os.path.abspath(__file__))


def gone(pid):
    """True when no process has this pid (a zombie counts as gone: it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_set_get_round_trip(redis_server):
    redis = redis_servers.require_redis()
    value = bytes(range(256)) * 64
    c = redis_server.client()
    assert c.set(b"kvcache:v1:\x00\xff", value)
    assert c.get(b"kvcache:v1:\x00\xff") == value
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.unix_url is None
    with redis.Redis.from_url(redis_server.url) as by_url:
        assert by_url.get(b"kvcache:v1:\x00\xff") == value
    # The flags the fixture promises, as the server reports them.
    assert c.config_get("save") == {"save": ""}
    assert c.config_get("appendonly") == {"appendonly": "no"}
    assert c.config_get("bind") == {"bind": "127.0.0.1"}
    assert redis_server.alive() and not gone(redis_server.pid)


def test_password_required(redis_server_auth):
    redis = redis_servers.require_redis()
    pw = redis_server_auth.password
    assert pw and redis_server_auth.url == f"redis://:{pw}@127.0.0.1:{redis_server_auth.port}/0"
    # redis-py 8 opens with HELLO (RESP3), refused before any command; over RESP2 the
    # command itself gets the server's NOAUTH.
    with redis.Redis(host="127.0.0.1", port=redis_server_auth.port) as anonymous:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.set("k", b"v")
    with redis.Redis(host="127.0.0.1", port=redis_server_auth.port, protocol=2) as anonymous:
        with pytest.raises(redis.exceptions.AuthenticationError, match="^Authentication required"):
            anonymous.set("k", b"v")
    with socket.create_connection(("127.0.0.1", redis_server_auth.port), timeout=5) as raw:
        raw.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        assert raw.recv(100).startswith(b"-NOAUTH ")
    with redis.Redis(host="127.0.0.1", port=redis_server_auth.port, password="wrong") as wrong:
        with pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
    assert redis_server_auth.client().set("k", b"v")
    with redis.Redis.from_url(redis_server_auth.url) as by_url:
        assert by_url.get("k") == b"v"


def test_unix_socket(redis_unix_server):
    redis = redis_servers.require_redis()
    path = redis_unix_server.socket_path
    assert redis_unix_server.unix_url == f"unix://{path}?db=0"
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert redis_unix_server.client(unix=True).set("k", b"over the socket")
    assert redis_unix_server.client().get("k") == b"over the socket"  # the same server over TCP
    with redis.Redis.from_url(redis_unix_server.unix_url) as by_url:
        assert by_url.get("k") == b"over the socket"


def test_kill_is_a_connection_error(redis_server):
    redis = redis_servers.require_redis()
    c = redis_server.client(socket_timeout=2)
    c.set("k", b"v")
    pid = redis_server.pid
    redis_server.kill()
    assert not redis_server.alive() and gone(pid)
    with pytest.raises(redis.exceptions.ConnectionError) as e:
        c.get("k")
    assert not isinstance(e.value, redis.exceptions.TimeoutError)  # refused, not waited for
    redis_server.stop()
    redis_server.stop()  # idempotent


def test_pause_times_out_and_resume_answers(redis_server):
    redis = redis_servers.require_redis()
    c = redis_server.client(socket_timeout=0.2)
    c.set("k", b"v")
    redis_server.pause()
    assert redis_server.alive() and redis_server.paused
    with pytest.raises(redis.exceptions.TimeoutError):
        c.get("k")
    redis_server.resume()
    assert not redis_server.paused
    assert redis_server.client(socket_timeout=5).get("k") == b"v"


def test_stop_while_paused(redis_server):
    pid = redis_server.pid
    redis_server.pause()
    redis_server.stop()
    assert gone(pid) and not os.path.exists(redis_server.dir)


def test_restart_is_empty_on_the_same_port(redis_server):
    redis = redis_servers.require_redis()
    c = redis_server.client()
    c.set("k", b"v")
    port, pid = redis_server.port, redis_server.pid
    redis_server.restart()
    assert redis_server.port == port and redis_server.pid != pid and gone(pid)
    with redis.Redis(host="127.0.0.1", port=port) as fresh:
        assert fresh.dbsize() == 0 and fresh.get("k") is None
    redis_server.pause()
    redis_server.restart()  # a paused server is killed too
    assert redis_server.client().ping()


def test_config_set(redis_server):
    redis_server.config_set("maxmemory", "1mb")
    redis_server.config_set("maxmemory-policy", "allkeys-lru")
    c = redis_server.client()
    assert c.config_get("maxmemory") == {"maxmemory": str(2**20)}
    assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}


def test_extra_args():
    with RedisServer.start(args=("--maxmemory", "2mb")) as server:
        assert server.client().config_get("maxmemory") == {"maxmemory": str(2 * 2**20)}


def test_cluster_spreads_keys_and_pipelines_across_slots(redis_cluster):
    assert len(redis_cluster.nodes) == 3
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
    rc = redis_cluster.client()
    keys = [f"kvcache:v1:{i:064x}".encode() for i in range(300)]
    pipe = rc.pipeline()
    for i, k in enumerate(keys):
        pipe.set(k, i.to_bytes(4, "little") * 100)
    assert pipe.execute() == [True] * len(keys)
    pipe = rc.pipeline()
    for k in keys:
        pipe.get(k)
    assert pipe.execute() == [i.to_bytes(4, "little") * 100 for i in range(len(keys))]
    # Each master, asked directly, holds a part, and the parts are the keys.
    held = []
    for node in redis_cluster.nodes:
        with node.client() as direct:
            mine = list(direct.scan_iter(count=1000))
        assert 0 < len(mine) < len(keys)
        held += mine
    assert sorted(held) == sorted(keys)


def test_cluster_is_empty_at_each_test(redis_cluster):
    # Whatever the test before wrote, the fixture flushed it.
    for node in redis_cluster.nodes:
        with node.client() as direct:
            assert direct.dbsize() == 0
    redis_cluster.client().set("left behind", b"x")


_killed = {}


def test_cluster_kill_a_node(redis_cluster):
    _killed["pids"] = [n.pid for n in redis_cluster.nodes]
    redis_cluster.nodes[2].kill()
    redis_cluster.nodes[0].pause()


def test_cluster_next_test_gets_three_healthy_masters(redis_cluster):
    """Runs after test_cluster_kill_a_node (file order): that cluster replaced, its nodes gone."""
    if "pids" in _killed:
        assert not set(_killed["pids"]) & {n.pid for n in redis_cluster.nodes}
        assert all(gone(pid) for pid in _killed["pids"])
    assert redis_cluster.healthy() and len(redis_cluster.nodes) == 3
    for node in redis_cluster.nodes:
        with node.client() as c:
            info = redis_servers._cluster_info(c)
        assert info["cluster_state"] == "ok" and info["cluster_size"] == "3", info
    rc = redis_cluster.client()
    assert rc.set("k", b"v") and rc.get("k") == b"v"


def test_session_cluster_heals_after_a_kill_and_a_pause():
    """The session holder: a paused node is resumed, a dead one gets the cluster replaced."""
    holder = redis_servers._SessionCluster()
    try:
        first = holder.get()
        first.nodes[0].pause()
        assert holder.get() is first and first.healthy()
        first.client().set("k", b"v")
        pid = first.nodes[1].pid
        first.nodes[1].kill()
        second = holder.get()
        assert second is not first and second.healthy()
        assert all(gone(n.pid) for n in first.nodes if n.pid) and gone(pid)
        assert second.client().get("k") is None
        assert second.client().set("k", b"v2") and second.client().get("k") == b"v2"
    finally:
        holder.stop()


def test_cluster_fresh_node_killed(redis_cluster_fresh):
    redis = redis_servers.require_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    rc = redis_cluster_fresh.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    victim = redis_cluster_fresh.nodes[1]
    key = next(k for k in (f"k{i}" for i in range(10000)) if rc.get_node_from_key(k).port == victim.port)
    rc.set(key, b"v")
    victim.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        rc.get(key)


def test_missing_binaries_skip_or_fail(tmp_path, monkeypatch):
    empty = str(tmp_path)
    assert redis_servers.missing(path=empty)[0].startswith("redis-server (not on PATH")
    lack = redis_servers.missing(cluster=True, path=empty)
    assert [m.split()[0] for m in lack[:2]] == ["redis-server", "redis-cli"]
    monkeypatch.delenv("KVCACHE_REQUIRE_REDIS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="^Redis not available: redis-server"):
        redis_servers.require_redis(path=empty)
    monkeypatch.setenv("KVCACHE_REQUIRE_REDIS", "0")
    with pytest.raises(pytest.skip.Exception):
        redis_servers.require_redis(path=empty)
    monkeypatch.setenv("KVCACHE_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="^Redis not available: redis-server.*KVCACHE_REQUIRE_REDIS=1"):
        redis_servers.require_redis(path=empty)


CHILD_TESTS = """
import os

def test_server(redis_server):
    print("PID", redis_server.pid)
    redis_server.client().set("k", b"v")

def test_cluster(redis_cluster):
    print("PID", *(n.pid for n in redis_cluster.nodes))
    redis_cluster.client().set("k", b"v")

def test_fails_after_starting(redis_server_auth, redis_unix_server):
    print("PID", redis_server_auth.pid, redis_unix_server.pid)
    assert False, "this test fails on purpose"
"""


def run_child(tmp_path, env_extra, conftest_extra=""):
    """pytest in a subprocess on CHILD_TESTS, with the fixtures imported as tests/conftest.py does."""
    (tmp_path / "conftest.py").write_text(conftest_extra + textwrap.dedent("""
        from redis_servers import (  # noqa: F401
            _redis_cluster_session, redis_cluster, redis_server, redis_server_auth, redis_unix_server)
    """))
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "KVCACHE_REQUIRE_REDIS"}
    env.update(PYTHONPATH=os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]), **env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-s",
                           "-o", "addopts=", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_process_stopped_also_when_a_test_fails(tmp_path):
    redis_servers.require_redis(cluster=True)
    p = run_child(tmp_path, {})
    assert p.returncode == 1, p.stdout + p.stderr  # one failure, on purpose
    assert "1 failed, 2 passed" in p.stdout, p.stdout
    # -s prints a test's output after its progress line's prefix ("test_child.py PID ..."): match anywhere.
    pids = [int(w) for m in re.findall(r"PID((?: \d+)+)", p.stdout) for w in m.split()]
    assert len(pids) == 6, p.stdout
    assert all(gone(pid) for pid in pids), [pid for pid in pids if not gone(pid)]


@pytest.mark.parametrize("what", ["binaries", "module"])
def test_missing_in_a_pytest_run(tmp_path, what):
    """A whole pytest run without Redis: every test skipped naming what is missing; failed under
    KVCACHE_REQUIRE_REDIS=1."""
    if what == "binaries":
        (tmp_path / "bin").mkdir()
        # Under .ci/aarch64, sys.executable is a script exec'ing the emulator found on PATH.
        emulator = shutil.which(os.environ.get("KVCACHE_EMULATED") or "-")
        if emulator:
            os.symlink(emulator, tmp_path / "bin" / os.path.basename(emulator))
        env, conftest, expect = {"PATH": str(tmp_path / "bin")}, "", "redis-server (not on PATH"
    else:  # as on .ci/aarch64: the binaries are there, redis-py is not
        env, conftest = {}, "import sys\nsys.modules['redis'] = None  # import redis: ImportError\n"
        expect = "the redis Python module"
    p = run_child(tmp_path, env, conftest)
    assert p.returncode == 0 and "3 skipped" in p.stdout, p.stdout + p.stderr
    skips = [line for line in p.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 3 and all(MISSING_PREFIX + expect in line for line in skips), p.stdout
    p = run_child(tmp_path, {**env, "KVCACHE_REQUIRE_REDIS": "1"}, conftest)
    assert p.returncode == 1 and "3 errors" in p.stdout, p.stdout + p.stderr
    assert p.stdout.count(MISSING_PREFIX + expect) >= 3 and "KVCACHE_REQUIRE_REDIS=1" in p.stdout, p.stdout
