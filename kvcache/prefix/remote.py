"""The prefix store's remote tier: records in Redis or Redis Cluster, shared by
every host that points a store at the same server.

Owns: the Redis layout (docs/format.md §7.5: one string key per record,
``kvcache:v1:<hex of the record's key>``, whose value is the record's bytes),
the client (built from a URL with timeouts and without redis-py's own
retries, or the caller's, used as it is), the round trips (each one pipeline,
non-transactional, cross-slot on a cluster) and the tier's health: a failed
round trip marks the tier down, logged once per outage; while it is down,
calls skip the server without a round trip until the backoff delay has
passed, the next call is the retry, and the first that succeeds logs the
recovery.
Must not touch: record contents (kvcache.prefix.record checks what comes
back; the store calls it), the local tiers, caches.

redis is imported here only, when a RemoteTier is made: ``import kvcache``
never imports it.  Thread-safe: redis-py's clients are, and one lock guards
the health state and the counters.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from kvcache.errors import RemoteTierError

log = logging.getLogger("kvcache")

KEY_PREFIX = b"kvcache:v1:"
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
DEFAULT_TIMEOUT = 2.0
DEFAULT_BACKOFF = (0.5, 30.0)
INSTALL_HINT = "pip install kvcache[redis]"
OPS = ("connect", "match", "load", "save")
STAT_NAMES = (
    "records_saved_remote", "bytes_sent_remote", "bytes_read_remote", "deleted_remote",
    "remote_round_trips", "remote_errors", *(f"remote_errors_{op}" for op in OPS),
    "remote_outages", "remote_skipped", "remote_down",
)

_now = time.monotonic  # the backoff's clock (tests replace it)


def redis_key(key: bytes) -> bytes:
    """The Redis key of the record of ``key`` (a 32-byte prefix key)."""
    return KEY_PREFIX + key.hex().encode("ascii")


def _redis():
    try:
        import redis
        import redis.cluster
    except ImportError as exc:
        raise ImportError(f"PrefixStore.remote: the remote tier needs redis-py ({INSTALL_HINT})"
                          f": {exc}") from None
    return redis


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(f"PrefixStore.remote: expected a URL redis://host:port/db, rediss://..., "
                         f"unix:///path?db=N or redis+cluster://host:port, got {_safe(url)!r}")
    return scheme


def _safe(url: str) -> str:
    """``url`` without its password (logs and messages name the server, not the secret)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))
    except ValueError:
        return "<an unparsable URL>"


class _Packer:
    """RESP for redis-py's connections that sends a large argument (a record)
    as a buffer of its own, straight from the caller's memory.  redis-py's
    default with hiredis installed copies every argument twice (into bytes,
    then into one protocol string): for a save, that is more time than the
    round trip.  ``pack`` is the interface of a connection's
    ``command_packer``: the chunks to send, in order."""

    CUTOFF = 1 << 14   # smaller arguments are joined into the command's header

    def pack(self, *args) -> List[Any]:
        # A command name holding its subcommand ("CLIENT SETINFO") is split, as
        # redis-py's packers do.
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        out: List[Any] = []
        head = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, bool):
                raise TypeError("a bool is not a Redis argument")
            elif isinstance(arg, (int, float)):
                arg = repr(arg).encode()
            size = arg.nbytes if isinstance(arg, memoryview) else len(arg)
            if size > self.CUTOFF:
                head.append(b"$%d\r\n" % size)
                out.append(b"".join(head))
                out.append(arg)
                head = [b"\r\n"]
            else:
                head += [b"$%d\r\n" % size, arg, b"\r\n"]
        out.append(b"".join(head))
        return out


def _client_from_url(url: str, scheme: str, timeout: float):
    """A redis-py client for ``url`` (a cluster's: a function making it):
    ``timeout`` seconds to connect and per reply, one immediate retry on a
    broken connection (a pooled socket the server closed), none on a timeout
    (the tier's backoff decides)."""
    redis = _redis()
    from redis.backoff import NoBackoff
    from redis.connection import parse_url
    from redis.retry import Retry
    opts: Dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                                decode_responses=False)
    if not scheme.endswith("+cluster"):
        try:
            return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1, supported_errors=(
                redis.ConnectionError,)), command_packer=_Packer(), **opts)
        except ValueError as exc:
            raise ValueError(f"PrefixStore.remote: cannot use {_safe(url)!r}: {exc}") from None
    plain = scheme[:-len("+cluster")] + url[len(scheme):]
    try:
        parsed = parse_url(plain)
    except ValueError as exc:
        raise ValueError(f"PrefixStore.remote: cannot use {_safe(url)!r}: {exc}") from None
    if parsed.get("db", 0) != 0:
        raise ValueError(f"PrefixStore.remote: expected no database number in a cluster URL "
                         f"(a cluster has only db 0), got {_safe(url)!r}")
    # No retry at the cluster level either: a dead or paused node fails the
    # round trip once (and the pipeline's per-command retries are bypassed:
    # RemoteTier._cluster_round_trip).  RedisCluster asks a node for the slot
    # map as it is made: it is made by the first call that finds one up.
    if scheme == "redis+cluster":  # (TLS nodes keep redis-py's SSLConnection and its packer)
        opts["connection_class"] = _packed_connection(redis)
    return lambda: redis.cluster.RedisCluster.from_url(plain, retry=Retry(NoBackoff(), 0), **opts)


def _packed_connection(redis):
    """redis.Connection sending with :class:`_Packer` (RedisCluster passes its
    nodes a connection class, not a packer)."""
    def __init__(self, **kwargs):
        kwargs.setdefault("command_packer", _Packer())
        redis.Connection.__init__(self, **kwargs)
    return type("PackedConnection", (redis.Connection,), {"__init__": __init__})


def _describe(client) -> str:
    """The server a ready client talks to, for logs."""
    redis = _redis()
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_default_node()
        return f"redis+cluster://{node.host}:{node.port}" if node is not None else "a Redis Cluster"
    kw = client.connection_pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RemoteTier:
    """Records on a Redis server or cluster.

    Parameters
    ----------
    remote : str, redis.Redis or redis.cluster.RedisCluster
        A URL (``redis://host:port/db``, ``rediss://...``, ``unix:///path?db=N``,
        ``redis+cluster://host:port``) or a ready client (used as it is: its
        own timeouts and retries; never closed by the tier).
    ttl : int, optional
        Seconds a record lives after it is written or last hit (None: until
        Redis evicts it).
    timeout : float, optional
        Seconds to connect and to wait for each reply, for a client built from
        a URL (default 2.0).
    raise_errors : bool
        A failed round trip raises RemoteTierError (else the call is a miss).
    backoff : (float, float)
        The first retry delay after a failure and its cap: the delay doubles
        with each failed retry.

    Raises
    ------
    TypeError
        ``remote`` is neither a URL nor a redis-py client.
    ValueError
        A URL of another scheme, or one redis-py cannot parse; a client
        decoding replies (``decode_responses=True``).
    ImportError
        redis-py is not installed.
    RemoteTierError
        With ``raise_errors``: the server cannot be reached now.
    """

    def __init__(self, remote, *, ttl: Optional[int] = None, timeout: Optional[float] = None,
                 raise_errors: bool = False, backoff: Tuple[float, float] = DEFAULT_BACKOFF):
        self.ttl = ttl
        self.raise_errors = raise_errors
        self.backoff = backoff
        self._client: Any = None
        self._make: Optional[Callable[[], Any]] = None
        if isinstance(remote, str):
            scheme = _scheme(remote)
            redis = _redis()
            self.where = _safe(remote)
            t = DEFAULT_TIMEOUT if timeout is None else timeout
            self._owned = True
            made = _client_from_url(remote, scheme, t)
            if isinstance(made, redis.Redis):
                self._client = made
            else:
                self._make = made
        else:
            redis = _redis()
            if not isinstance(remote, (redis.Redis, redis.cluster.RedisCluster)):
                raise TypeError(f"PrefixStore.remote: expected a URL, a redis.Redis or a "
                                f"redis.cluster.RedisCluster, got {type(remote).__module__}."
                                f"{type(remote).__qualname__}")
            if remote.get_encoder().decode_responses:
                raise ValueError("PrefixStore.remote: expected a client with decode_responses=False "
                                 "(records are bytes), got one decoding replies")
            self._client, self._owned = remote, False
            self.where = _describe(remote)
        self._errors: Tuple[Type[BaseException], ...] = (
            redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self._cluster = redis.cluster.RedisCluster
        self._redirect = (redis.exceptions.AskError, redis.exceptions.TryAgainError)
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {name: 0 for name in STAT_NAMES}
        self._down_since: Optional[float] = None
        self._delay = backoff[0]
        self._retry_at = 0.0
        self._failed_tries = 0
        self._closed = False
        # A first round trip: an unreachable server shows at once (logged, the
        # tier down) instead of at the first load.
        self._call("connect", [("PING",)])

    # -- health -------------------------------------------------------------------------
    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _may_try(self) -> bool:
        """Whether this call goes to the server: yes while the tier is up; while
        it is down, once the backoff delay has passed (this call is the retry;
        the calls meanwhile skip it)."""
        with self._lock:
            if self._down_since is None or self.raise_errors:
                return True
            now = _now()
            if now >= self._retry_at:
                self._retry_at = now + self._delay  # the others skip while this one tries
                return True
            self._counts["remote_skipped"] += 1
            return False

    def _failed(self, op: str, exc: BaseException, quiet: bool = False) -> None:
        with self._lock:
            self._counts["remote_errors"] += 1
            self._counts["remote_errors_" + op] += 1
            first = self._down_since is None
            if first:
                self._down_since = _now()
                self._delay = self.backoff[0]
                self._counts["remote_outages"] += 1
                self._failed_tries = 1
            else:
                self._delay = min(self._delay * 2, self.backoff[1])
                self._failed_tries += 1
            self._retry_at = _now() + self._delay
        if first:
            log.warning("kvcache prefix store: the remote tier %s is down (%s during %s: %s): calls "
                        "go on with the local tiers; retried after %g s, backing off up to %g s",
                        self.where, type(exc).__name__, op, exc, self.backoff[0], self.backoff[1])
        if self.raise_errors and not quiet:
            raise RemoteTierError(f"the remote tier {self.where} failed during {op}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    def _recovered(self) -> None:
        with self._lock:
            since, tries = self._down_since, self._failed_tries
            if since is None:
                return
            self._down_since = None
            self._delay = self.backoff[0]
        log.warning("kvcache prefix store: the remote tier %s is back after %.1f s down "
                    "(%d failed round trips)", self.where, _now() - since, tries)

    def _call(self, op: str, commands: Sequence[tuple], quiet: bool = False) -> Optional[List[Any]]:
        """The replies of ``commands``, sent as one pipeline; None if the tier is
        skipped or failed (with ``raise_errors``, a failure raises, unless
        ``quiet``)."""
        if self._closed or not self._may_try():
            return None
        try:
            client = self._client
            if client is None:
                assert self._make is not None
                client = self._client = self._make()
            replies = self._round_trip(client, commands)
        except self._errors as exc:
            self._failed(op, exc, quiet)
            return None
        with self._lock:
            self._counts["remote_round_trips"] += 1
        self._recovered()
        return replies

    def _round_trip(self, client, commands: Sequence[tuple]) -> List[Any]:
        """One pipeline of ``commands`` (non-transactional); the replies in order.
        A reply that is an error raises it, except WRONGTYPE (a key of ours
        holding another type: the caller treats it as a damaged record)."""
        if isinstance(client, self._cluster):
            replies = self._cluster_round_trip(client, commands)
        else:
            pipe = client.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command(*args)
            replies = pipe.execute(raise_on_error=False)
        for r in replies:
            if isinstance(r, Exception) and not str(r).startswith("WRONGTYPE"):
                raise r
        return replies

    def _cluster_round_trip(self, client, commands: Sequence[tuple]) -> List[Any]:
        """A cluster pipeline without redis-py's per-command retries: after a
        node's connection fails or times out, ClusterPipeline would resend
        each of its commands alone, waiting the timeout for every one, so a
        paused node would hold the call for minutes.  Here a connection error
        fails the round trip at once; only redirections (MOVED, ASK: slots
        moving between nodes) are followed, one command at a time as redis-py
        does."""
        from redis.cluster import PipelineCommand
        stack = [PipelineCommand(tuple(args), {}, i) for i, args in enumerate(commands)]
        replies = client.pipeline().send_cluster_commands(stack, raise_on_error=False,
                                                          allow_redirections=False)
        for i, r in enumerate(replies):
            if isinstance(r, self._redirect):
                replies[i] = client.execute_command(*commands[i])
        return replies

    # -- records ------------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes], op: str) -> Optional[List[bool]]:
        """Which of ``keys`` have a record (one round trip; with a TTL, EXPIRE
        refreshes the ones there); None if the tier is unavailable."""
        commands: List[tuple]
        if self.ttl is None:
            commands = [("EXISTS", redis_key(k)) for k in keys]
        else:
            commands = [("EXPIRE", redis_key(k), self.ttl) for k in keys]
        replies = self._call(op, commands)
        if replies is None:
            return None
        return [bool(r) for r in replies]

    def get(self, keys: Sequence[bytes]) -> Optional[List[Optional[bytes]]]:
        """The values of ``keys`` (None where there is none; b"" for a key
        holding another type, which no record check passes), one round trip
        (with a TTL, GETEX refreshes them); None if the tier is unavailable."""
        commands: List[tuple]
        if self.ttl is None:
            commands = [("GET", redis_key(k)) for k in keys]
        else:
            commands = [("GETEX", redis_key(k), "EX", self.ttl) for k in keys]
        replies = self._call("load", commands)
        if replies is None:
            return None
        out = [b"" if isinstance(r, Exception) else r for r in replies]
        with self._lock:
            self._counts["bytes_read_remote"] += sum(len(v) for v in out if v is not None)
        return out

    def put(self, records: Sequence[Tuple[bytes, Any]]) -> Optional[List[bool]]:
        """SET NX each (key, record buffer) (with a TTL, EX it), one round trip:
        True where this call wrote it, False where a record was there already
        (another writer's: never replaced); None if the tier is unavailable."""
        ex = () if self.ttl is None else ("EX", self.ttl)
        commands = [("SET", redis_key(k), memoryview(buf).cast("B"), "NX", *ex) for k, buf in records]
        replies = self._call("save", commands)
        if replies is None:
            return None
        done = [bool(r) and not isinstance(r, Exception) for r in replies]
        with self._lock:
            self._counts["records_saved_remote"] += sum(done)
            self._counts["bytes_sent_remote"] += sum(len(c[2]) for c in commands)
        return done

    def delete(self, key: bytes) -> bool:
        """DEL the record of ``key`` (one that failed a check); True if it was
        there.  Never raises: a record not deleted is a miss all the same."""
        replies = self._call("load", [("DEL", redis_key(key))], quiet=True)
        gone = bool(replies and replies[0] == 1)
        if gone:
            with self._lock:
                self._counts["deleted_remote"] += 1
        return gone

    # -- accounting, lifetime -------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        with self._lock:
            out = dict(self._counts)
            out["remote_down"] = int(self._down_since is not None)
        return out

    def close(self) -> None:
        """Close a client this tier made (a caller's client stays open)."""
        self._closed = True
        client, self._client = self._client, None
        if client is None or not self._owned:
            return
        try:
            if isinstance(client, self._cluster):
                # RedisCluster.close leaves the nodes' pools (made for a URL) open.
                for node in client.get_nodes():
                    if node.redis_connection is not None:
                        node.redis_connection.connection_pool.disconnect()
            client.close()
        except self._errors:
            pass

    def __repr__(self) -> str:
        return f"<RemoteTier {self.where}{', down' if self.down else ''}>"
