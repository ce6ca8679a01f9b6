"""Real Redis servers for the tests: Debian's ``redis-server`` on loopback, and a 3-master cluster.

This module owns the server processes the tests start (spawn, readiness, faults, stop)
and the pytest fixtures over them; it must not touch kvcache (the tier under test is
the tests' business) and imports redis-py only when a server is asked for, so that a
machine without it collects the suite and skips these tests.  tests/conftest.py imports
the fixtures, so every test file can use them.

Servers
    ``RedisServer.start(password=None, unixsocket=False, args=())`` runs ``redis-server``
    in the foreground on a free 127.0.0.1 port with ``--save "" --appendonly no``
    (nothing persists: a restart is an empty server) in a temporary directory of its
    own, and returns once it answers PING.  Faults: ``kill()`` (SIGKILL), ``pause()`` /
    ``resume()`` (SIGSTOP / SIGCONT: the kernel still accepts connections, replies
    never come, so clients time out), ``restart()`` (a fresh empty server on the same
    port).  ``RedisClusterServers.start()`` runs three ``--cluster-enabled`` masters (no
    replicas, ``--cluster-node-timeout 2000``) joined by ``redis-cli --cluster create``.

Ports
    Picked at random in 10000-21999, below Linux's ephemeral range (32768-60999), so
    that a client's outgoing connection never takes a port a killed server is restarted
    on; a cluster node's bus port (port + 10000) is then below it too.  A port some
    other process takes between the check and the server's bind is retried with
    another one.

Missing servers
    Without ``redis-server`` (and ``redis-cli`` for the cluster) on PATH or the redis
    Python module, a fixture skips its test with a message naming what is missing
    ("Redis not available: ..."); with ``KVCACHE_REQUIRE_REDIS=1`` (set by .ci/run) it
    fails the test instead, so CI cannot pass by skipping them.

Fixtures
    ``redis_server`` (a fresh server per test), ``redis_server_auth`` (the same with a
    password), ``redis_unix_server`` (also listening on a unix socket), ``redis_cluster``
    and ``redis_cluster_fresh``.  ``redis_cluster`` is one cluster for the session,
    emptied (FLUSHALL) before each test that uses it; a test may kill or pause its nodes:
    after it, a paused node is resumed and a cluster with a dead node is replaced by a
    new one (a killed master cannot rejoin with its slots, since nothing persisted), so
    later tests always get three healthy masters.  ``redis_cluster_fresh`` is a cluster of
    the test's own, stopped after it: for a test that must not depend on what ran before.

Every process is stopped by its fixture's finalizer (also when the test fails) and, as a
last resort, at interpreter exit (only in the process that started it, not in a forked
child).  The servers get an environment without the sanitizer preloads of .ci/sanitize
(LD_PRELOAD, ASAN_OPTIONS...): those are for the Python process, not for redis-server.
"""
import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

HOST = "127.0.0.1"
PORT_RANGE = (10000, 22000)  # see Ports in the docstring
CLUSTER_BUS_OFFSET = 10000  # Redis's cluster bus listens on port + 10000
START_TIMEOUT = 20.0  # seconds for a server to answer PING (slow under a loaded machine)
CLUSTER_TIMEOUT = 30.0  # seconds for every node to say cluster_state:ok
NODE_TIMEOUT_MS = 2000  # --cluster-node-timeout: a killed master fails its slots after ~2 s
REQUIRE_ENV = "KVCACHE_REQUIRE_REDIS"
MISSING_PREFIX = "Redis not available: "
# Inherited by our subprocesses from .ci/sanitize's Python; not for redis-server.
_ENV_DROP = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "PYTHONMALLOC")

_live = {}  # pid -> RedisServer, for the exit hook
_owner_pid = os.getpid()


def missing(cluster=False, path=None):
    """What the Redis tests need and this machine lacks: a list of descriptions (empty: all there).

    Parameters
    ----------
    cluster : bool
        Also require ``redis-cli`` (``redis-cli --cluster create`` builds the cluster).
    path : str, optional
        The PATH to look the binaries up in (default: the environment's).
    """
    lack = [f"{b} (not on PATH; apt-get install {pkg})"
            for b, pkg in (("redis-server", "redis-server"), ("redis-cli", "redis-tools"))
            if (cluster or b == "redis-server") and shutil.which(b, path=path) is None]
    try:
        import redis  # noqa: F401
    except ImportError:
        lack.append("the redis Python module (pip install 'kvcache[redis]')")
    return lack


def require_redis(cluster=False, path=None):
    """Skip the calling test when Redis is not available, or fail it under ``KVCACHE_REQUIRE_REDIS=1``.

    Returns the redis module.  The message starts with "Redis not available: " and names
    each missing piece (see :func:`missing`).
    """
    lack = missing(cluster, path)
    if lack:
        msg = MISSING_PREFIX + "; ".join(lack)
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{msg} ({REQUIRE_ENV}=1: these tests must run)", pytrace=False)
        pytest.skip(msg)
    import redis
    return redis


def _server_env():
    return {k: v for k, v in os.environ.items() if k not in _ENV_DROP}


def _port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_port(cluster):
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        if _port_free(port) and (not cluster or _port_free(port + CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError(f"no free port pair in {PORT_RANGE} on {HOST} after 200 tries")


def _ping(host, port, password, timeout=0.5):
    """True when a server on (host, port) answers a command: +PONG, or -NOAUTH when it wants a password."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            cmd = b"*1\r\n$4\r\nPING\r\n"
            if password is not None:
                pw = password.encode()
                cmd = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw) + cmd
            s.sendall(cmd)
            reply = b""
            while b"PONG" not in reply and not reply.startswith(b"-NOAUTH"):
                chunk = s.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return True
    except OSError:
        return False



def _close_all(clients):
    """Close the clients a server object handed out (best effort: their server may be dead)."""
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
    clients.clear()

class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 (see the module docstring); use :meth:`start`.

    Attributes: ``host``, ``port``, ``password``, ``pid``, ``url``
    (``redis://[:pw@]127.0.0.1:PORT/0``), ``unix_url`` (``unix:///.../redis.sock?db=0``
    or None), ``dir`` (its temporary directory, holding ``redis.log``).
    """

    def __init__(self, password, unixsocket, args, cluster):
        self.host = HOST
        self.port = None
        self.password = password
        self.cluster = cluster
        self._unixsocket = unixsocket
        self._args = tuple(str(a) for a in args)
        self.dir = tempfile.mkdtemp(prefix="kvcache-redis-")
        self._proc = None
        self._paused = False
        self._clients = []

    @classmethod
    def start(cls, password=None, unixsocket=False, args=(), cluster=False):
        """Start a server and wait until it answers PING.

        Parameters
        ----------
        password : str, optional
            ``--requirepass``: clients must AUTH (NOAUTH otherwise).
        unixsocket : bool
            Also listen on ``<dir>/redis.sock`` (mode 700); its URL is ``unix_url``.
        args : sequence of str
            More ``redis-server`` arguments, e.g. ``("--maxmemory", "1mb")``.
        cluster : bool
            A cluster node (``--cluster-enabled yes``); :class:`RedisClusterServers` joins them.

        Raises
        ------
        RuntimeError
            The server did not answer within START_TIMEOUT seconds (its log in the message).
        """
        require_redis()
        server = cls(password, unixsocket, args, cluster)
        try:
            for _ in range(10):  # another process may take the port before redis-server binds it
                server.port = _pick_port(cluster)
                if server._spawn(retry_bind_for=0):
                    return server
            raise RuntimeError(f"redis-server could not bind a free port in 10 tries:\n{server.log()}")
        except BaseException:
            server.stop()
            raise

    @property
    def pid(self):
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self):
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def socket_path(self):
        return os.path.join(self.dir, "redis.sock") if self._unixsocket else None

    @property
    def unix_url(self):
        return f"unix://{self.socket_path}?db=0" if self._unixsocket else None

    def log(self):
        """The server's log (stdout and stderr of every run on this port)."""
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return "(no log)"

    def _command(self):
        cmd = [shutil.which("redis-server"), "--port", str(self.port), "--bind", self.host,
               "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", "",
               "--daemonize", "no"]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        if self._unixsocket:
            cmd += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.cluster:
            conf = os.path.join(self.dir, f"nodes-{self.port}.conf")
            if os.path.exists(conf):
                os.unlink(conf)  # a restarted node starts a new identity, empty
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", conf,
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        return cmd + list(self._args)

    def _spawn(self, retry_bind_for):
        """Run redis-server on self.port until it answers PING: True; False if the port was taken
        (after retrying for ``retry_bind_for`` seconds).  Raises RuntimeError on any other failure."""
        bind_deadline = time.monotonic() + retry_bind_for
        while True:
            with open(os.path.join(self.dir, "redis.log"), "ab") as log:
                log.write(f"==== redis-server on port {self.port}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=_server_env(),
                                              cwd=self.dir)
            self._paused = False
            _live[self._proc.pid] = self
            deadline = time.monotonic() + START_TIMEOUT
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _ping(self.host, self.port, self.password) and self._socket_ready():
                    return True
                time.sleep(0.02)
            if self._proc.poll() is None:
                self.kill()
                raise RuntimeError(f"redis-server on {self.host}:{self.port} did not answer PING within "
                                   f"{START_TIMEOUT} s; its log ({self.dir}/redis.log):\n{self.log()}")
            _live.pop(self._proc.pid, None)
            text = self.log().rsplit("==== redis-server on port", 1)[-1]
            if "Address already in use" not in text:
                raise RuntimeError(f"redis-server exited with status {self._proc.returncode} at start; "
                                   f"its log:\n{self.log()}")
            if time.monotonic() >= bind_deadline:
                return False
            time.sleep(0.1)

    def _socket_ready(self):
        return not self._unixsocket or os.path.exists(self.socket_path)

    def client(self, **kw):
        """A ``redis.Redis`` connected to this server (over TCP; ``unix=True`` for the socket).

        ``kw`` goes to ``redis.Redis`` (e.g. ``socket_timeout=0.2``).  The client is closed
        when the server is stopped.
        """
        c = self._new_client(**kw)
        self._clients.append(c)
        return c

    def _new_client(self, **kw):
        redis = require_redis()
        if kw.pop("unix", False):
            kw.setdefault("unix_socket_path", self.socket_path)
        else:
            kw.setdefault("host", self.host)
            kw.setdefault("port", self.port)
        kw.setdefault("password", self.password)
        return redis.Redis(**kw)

    def config_set(self, name, value):
        """``CONFIG SET name value`` (e.g. ``maxmemory``, ``maxmemory-policy``) on the running server."""
        with self._new_client() as c:
            return c.config_set(name, value)

    def alive(self):
        """True while the process runs (paused included)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self):
        return self._paused and self.alive()

    def kill(self):
        """SIGKILL the server and reap it (no-op when it is not running)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._paused = False
        _live.pop(self._proc.pid, None)

    def pause(self):
        """SIGSTOP: the server holds its connections and answers nothing until :meth:`resume`."""
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self):
        """SIGCONT after :meth:`pause`."""
        if self.alive():
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self):
        """Kill the server if alive, then start a fresh, empty one on the same port.

        A port left in TIME_WAIT or briefly held is retried for up to 10 s.  A cluster
        node comes back as a new node outside the cluster.
        """
        self.kill()
        for c in self._clients:
            c.close()  # their connections are to the dead process
        if not self._spawn(retry_bind_for=10.0):
            raise RuntimeError(f"port {self.port} still in use 10 s after the server was killed:\n{self.log()}")
        return self

    def stop(self):
        """Stop the server (resumed first if paused; SIGTERM, SIGKILL after 5 s) and remove
        its directory; closes the clients of :meth:`client`.  Idempotent."""
        _close_all(self._clients)
        if self._proc is not None and self._proc.poll() is None:
            if self._paused:
                self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = "paused" if self.paused else "alive" if self.alive() else "stopped"
        return f"<RedisServer {self.host}:{self.port} pid={self.pid} {state}>"


def _cluster_info(client):
    """CLUSTER INFO as {str: str} (redis-py parses it into a dict of str or int values)."""
    reply = client.execute_command("CLUSTER INFO")
    if isinstance(reply, bytes):
        reply = dict(line.split(":", 1) for line in reply.decode().split() if ":" in line)
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in reply.items()}


class RedisClusterServers:
    """A Redis Cluster of ``n_masters`` masters and no replicas on 127.0.0.1; use :meth:`start`.

    ``nodes``: the :class:`RedisServer` of each master (kill / pause / resume them);
    ``url``: ``redis+cluster://127.0.0.1:P1`` (the first node).
    """

    def __init__(self):
        self.nodes = []
        self._clients = []

    @classmethod
    def start(cls, n_masters=3, args=()):
        """Start the nodes, join them with ``redis-cli --cluster create``, and wait for
        ``cluster_state:ok`` on every node.  ``args``: more ``redis-server`` arguments for
        every node, e.g. ``("--cluster-require-full-coverage", "no")``."""
        require_redis(cluster=True)
        if n_masters < 3:
            raise ValueError(f"redis-cli --cluster create needs at least 3 masters, got {n_masters}")
        self = cls()
        try:
            for _ in range(n_masters):
                self.nodes.append(RedisServer.start(args=args, cluster=True))
            addrs = [f"{n.host}:{n.port}" for n in self.nodes]
            p = subprocess.run([shutil.which("redis-cli"), "--cluster", "create", *addrs, "--cluster-yes"],
                               capture_output=True, text=True, env=_server_env(), timeout=CLUSTER_TIMEOUT)
            if p.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create {' '.join(addrs)} failed "
                                   f"(status {p.returncode}):\n{p.stdout}\n{p.stderr}")
            self._wait_ok()
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_ok(self):
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        pending = list(self.nodes)
        while pending:
            node = pending[0]
            with node._new_client(socket_timeout=2) as c:
                info = _cluster_info(c)
            ok = (info.get("cluster_state") == "ok"
                  and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
                  and int(info.get("cluster_slots_assigned", 0)) == 16384)
            if ok:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.port} not ready after {CLUSTER_TIMEOUT} s: {info}\n{node.log()}")
            time.sleep(0.05)

    @property
    def url(self):
        return f"redis+cluster://{self.nodes[0].host}:{self.nodes[0].port}"

    def healthy(self):
        """Every node running and not paused."""
        return all(n.alive() and not n.paused for n in self.nodes)

    def client(self, **kw):
        """A ``redis.cluster.RedisCluster`` over the nodes (``kw`` goes to it); closed at :meth:`stop`."""
        require_redis(cluster=True)
        from redis.cluster import ClusterNode, RedisCluster
        kw.setdefault("startup_nodes", [ClusterNode(n.host, n.port) for n in self.nodes])
        c = RedisCluster(**kw)
        self._clients.append(c)
        return c

    def flushall(self):
        """Empty every master."""
        for n in self.nodes:
            with n._new_client() as c:
                c.flushall()

    def stop(self):
        """Stop every node (idempotent) and close the clients of :meth:`client`."""
        _close_all(self._clients)
        for n in self.nodes:
            n.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@atexit.register
def _stop_leftovers():
    # A forked child (tests/isolate.py's, multiprocessing's) inherits _live: not its servers.
    if os.getpid() == _owner_pid:
        for server in list(_live.values()):
            server.stop()


@pytest.fixture
def redis_server():
    """A fresh, empty ``RedisServer`` for the test, stopped after it."""
    with RedisServer.start() as server:
        yield server


@pytest.fixture
def redis_server_auth():
    """A fresh ``RedisServer`` with ``--requirepass`` (``.password``; ``.url`` carries it)."""
    with RedisServer.start(password="kvcache-test-pw") as server:
        yield server


@pytest.fixture
def redis_unix_server():
    """A fresh ``RedisServer`` also listening on a unix socket (``.socket_path``, ``.unix_url``)."""
    with RedisServer.start(unixsocket=True) as server:
        yield server


class _SessionCluster:
    """The session's cluster, replaced when a test left a node dead."""

    def __init__(self):
        self.cluster = None

    def get(self):
        if self.cluster is not None and not self.cluster.healthy():
            for n in self.cluster.nodes:
                if n.alive() and n.paused:
                    n.resume()
            if not self.cluster.healthy():  # a dead node: its slots are gone; a new cluster
                self.cluster.stop()
                self.cluster = None
        if self.cluster is None:
            self.cluster = RedisClusterServers.start()
        return self.cluster

    def stop(self):
        if self.cluster is not None:
            self.cluster.stop()


@pytest.fixture(scope="session")
def _redis_cluster_session():
    holder = _SessionCluster()
    yield holder
    holder.stop()


@pytest.fixture
def redis_cluster(_redis_cluster_session):
    """The session's 3-master cluster (``RedisClusterServers``), emptied before the test.

    A test may kill or pause nodes: the next test that asks gets three healthy masters
    again (paused ones resumed; a cluster with a dead node replaced).
    """
    require_redis(cluster=True)
    cluster = _redis_cluster_session.get()
    cluster.flushall()
    yield cluster
    for c in cluster._clients:  # the test's clients: not carried into the next test
        c.close()
    cluster._clients.clear()
    for n in cluster.nodes:
        n.resume()


@pytest.fixture
def redis_cluster_fresh():
    """A 3-master cluster of the test's own, stopped after it."""
    with RedisClusterServers.start() as cluster:
        yield cluster
