"""PrefixStore: a content-addressed store of KV blocks shared across requests,
processes, restarts and hosts.

Owns: the store's API (save, match, load, stats, close), its RAM tier (an
LRU of records bounded by ``ram_bytes``), the order of the tiers (RAM, disk,
then the remote tier), the order of a load (fetch the chain, check every
record, then copy) and the counters.  The key spec is kvcache.prefix.keys',
the record format kvcache.prefix.record's, the files kvcache.prefix.disk's,
Redis and its round trips kvcache.prefix.remote's, the copies
kvcache._blocks'.
Must not touch: a cache's internals (it goes through kvcache._blocks and the
cache's public methods) or record bytes outside kvcache.prefix.record.

Thread contract: every method may be called from any thread.  One lock
guards the RAM tier's map and the counters, held only to look up, insert or
count: checks, copies, file I/O and round trips to Redis run outside it (records are immutable,
and a record dropped from RAM while a load copies it stays alive until that
load ends).
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from kvcache._blocks import append_rows, read_rows
from kvcache.errors import CacheClosedError, RemoteTierError
from kvcache.prefix import record as rec
from kvcache.prefix.keys import chain, root_key, token_ids
from kvcache.prefix.options import REMOTE_ERRORS, _int_option, _path_option, _remote_options  # noqa: F401
from kvcache.prefix.ram import RamTier, take_buffer
from kvcache.prefix.remote import DEFAULT_BACKOFF, STAT_NAMES as REMOTE_STAT_NAMES, redis_key  # no redis import

log = logging.getLogger("kvcache")

TIERS = ("ram", "disk", "remote")
DEFAULT_RAM_BYTES = 1 << 30
U32_LIMIT = 2**32  # the record header's shape fields are uint32
STAT_NAMES = (
    "lookups", "query_tokens", "hit_tokens_ram", "hit_tokens_disk", "blocks_saved",
    "records_ram", "bytes_ram", "records_disk", "bytes_disk", "evictions_ram", "evictions_disk",
    "promotions", "integrity_failures", "integrity_failures_ram", "integrity_failures_disk",
    "mac_failures", "hit_tokens_remote", "promotions_remote", "integrity_failures_remote",
)
# The remote tier's own counters follow (kvcache.prefix.remote.STAT_NAMES), zero without one.


class _OnDisk:
    """A disk record a load streams from its file (its rows never sit in a
    buffer of their own): the header bytes, the open fd, the stored CRC32C."""

    __slots__ = ("head", "fd", "size", "crc")

    def __init__(self, head, fd: int, size: int, crc: int):
        self.head, self.fd, self.size, self.crc = head, fd, size, crc


def _kv_of(cache, where: str):
    """The TieredKVCache behind ``cache`` (itself, or an integration's ``.kv``)."""
    from kvcache._cache import TieredKVCache
    if isinstance(cache, TieredKVCache):
        return cache
    kv = getattr(cache, "kv", None)
    if isinstance(kv, TieredKVCache):
        return kv
    raise TypeError(f"{where}: cache expected a TieredKVCache (or a TieredCache), "
                    f"got {type(cache).__name__}")


class PrefixStore:
    """Blocks of KV keyed by the prompt that produced them, reusable by any cache
    of the same model and shape.

    Parameters
    ----------
    model : str
        Names the weights (``"org/name@revision"``): part of every key.
    n_layers, n_kv_heads, head_dim, block_tokens : int
        The shape of the caches it serves (``block_tokens`` is also the
        record size: one record per full block).
    dtype : str
        The caches' (hot) dtype: records hold rows in it.
    ram_bytes : int
        Bound on the records held in RAM (LRU); 0 keeps none there.
    disk_dir : str or os.PathLike, optional
        A directory for the disk tier (one file per record; shared safely by
        several processes).  RAM writes through to it.
    disk_bytes : int, optional
        Bound on the record files under ``disk_dir`` (LRU across every
        process sharing it, when they all use the same bound; the temporary
        file of a write in progress is outside it: kvcache.prefix.disk says
        exactly how it is kept); None: unbounded.
    salt : bytes
        Part of every key: stores with different salts never share records.
    secret : bytes, optional
        Records carry an HMAC-SHA256 under it instead of a CRC32C: whoever
        can write ``disk_dir`` (or the Redis keys) without it cannot inject KV.
    remote : str, redis.Redis or redis.cluster.RedisCluster, optional
        A third tier, after RAM and disk, shared by every store pointed at
        the same server: a URL (``redis://host:port/db``, ``rediss://...``,
        ``unix:///path?db=N``, ``redis+cluster://host:port``) or a ready
        redis-py client (used as it is, with its own timeouts and retries,
        and left open by :meth:`close`).  Needs ``pip install kvcache[redis]``.
        Layout and behaviour: docs/format.md §7.5, docs/reliability.md.
    remote_ttl : int, optional
        Seconds a record lives in Redis after it is written or last hit
        (match, load, or a save finding it there); None: until Redis evicts it.
    remote_errors : {"miss", "raise"}
        What a failed round trip does.  ``"miss"`` (default): the call goes on
        with what the local tiers hold (nothing partial reaches the cache),
        the failure is counted and logged once per outage, and later calls
        skip the server (no round trip) until the backoff delay has passed;
        the store is made even if the server is unreachable.  ``"raise"``:
        every call tries the server and a failure raises
        :class:`~kvcache.RemoteTierError` (an ``OSError``), the constructor too.
    remote_timeout : float, optional
        Seconds to connect and to wait for each reply, for a client built from
        a URL (default 2.0).
    remote_backoff : (float, float), optional
        The delay before the first retry after a failure and the longest one
        (default ``(0.5, 30.0)``): it doubles with each failed retry.

    Notes
    -----
    Thread-safe; a context manager; :meth:`close` frees the RAM tier.  The
    copies run on the cache's own native threads (``TieredKVCache.threads``).
    """

    def __init__(self, model: str, *, n_layers: int, n_kv_heads: int, head_dim: int,
                 block_tokens: int, dtype: str = "float32", ram_bytes: int = DEFAULT_RAM_BYTES,
                 disk_dir=None, disk_bytes: Optional[int] = None, salt: bytes = b"",
                 secret: Optional[bytes] = None, remote=None, remote_ttl: Optional[int] = None,
                 remote_errors: str = "miss", remote_timeout: Optional[float] = None,
                 remote_backoff: Optional[Tuple[float, float]] = None):
        self.root = root_key(model=model, n_layers=n_layers, n_kv_heads=n_kv_heads,
                             head_dim=head_dim, block_tokens=block_tokens, dtype=dtype, salt=salt,
                             where="PrefixStore")
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("block_tokens", block_tokens)):
            if value >= U32_LIMIT:
                raise ValueError(f"PrefixStore.{name}: expected an int < 2**32 (a uint32 of the "
                                 f"record header), got {value}")
        if secret is not None and not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"PrefixStore.secret: expected non-empty bytes or None, "
                            f"got {type(secret).__name__}")
        if secret is not None and not secret:
            raise ValueError("PrefixStore.secret: expected non-empty bytes or None, got b''")
        self.model = model
        self.layout = rec.Layout(int(n_layers), int(n_kv_heads), int(head_dim), int(block_tokens),
                                 dtype, secret is not None)
        if self.layout.row_bytes >= U32_LIMIT:
            raise ValueError(f"PrefixStore: expected rows of fewer than 2**32 bytes (a uint32 of the "
                             f"record header), got {self.layout.row_bytes} (n_kv_heads={n_kv_heads} "
                             f"x head_dim={head_dim} in {dtype})")
        self.ram_bytes = _int_option("ram_bytes", ram_bytes, 0)
        self.disk_bytes = _int_option("disk_bytes", disk_bytes, 0, allow_none=True)
        disk_dir = _path_option("disk_dir", disk_dir)
        remote_options = _remote_options(remote, remote_ttl, remote_errors, remote_timeout,
                                         remote_backoff)
        self._secret = bytes(secret) if secret is not None else None
        self._scratch: list = []  # buffers of one record's rows for loads streaming from disk
        self._lock = threading.Lock()
        self._ram = RamTier(self.ram_bytes, self.layout.total)
        self._counts: Dict[str, int] = {name: 0 for name in STAT_NAMES}
        self._closed = False
        self.disk = None
        if disk_dir is not None:
            from kvcache.prefix.disk import DiskTier
            self.disk = DiskTier(disk_dir, self.disk_bytes)
        self.remote = None
        if remote is not None:
            from kvcache.prefix.remote import RemoteTier  # imports redis
            self.remote = RemoteTier(remote, **remote_options)

    @classmethod
    def for_cache(cls, cache, model: str, **options) -> "PrefixStore":
        """A store for caches shaped like ``cache`` (its layers, heads, head_dim,
        block_tokens and dtype); ``options`` are the other keywords."""
        c = _kv_of(cache, "PrefixStore.for_cache").config
        return cls(model, n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                   block_tokens=c.block_tokens, dtype=c.dtype, **options)

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Drop the RAM tier (the disk tier's files and the remote tier's records
        stay; a client the store made from a URL is closed).  Idempotent."""
        with self._lock:
            self._closed = True
            self._ram.clear()
            self._scratch.clear()
        if self.remote is not None:
            self.remote.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "PrefixStore":
        self._check_open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        L = self.layout
        return (f"<PrefixStore {self.model!r} {L.n_layers}x{L.n_kv_heads}x{L.head_dim}:"
                f"{L.block_tokens}:{L.dtype}, {len(self._ram)} records in RAM"
                f"{', disk ' + self.disk.path if self.disk else ''}"
                f"{', remote ' + self.remote.where if self.remote else ''}"
                f"{', closed' if self._closed else ''}>")

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("this PrefixStore is closed")

    def _check_cache(self, cache, op: str):
        kv = _kv_of(cache, f"PrefixStore.{op}")
        c, L = kv.config, self.layout
        for name, mine in (("n_layers", L.n_layers), ("n_kv_heads", L.n_kv_heads),
                           ("head_dim", L.head_dim), ("block_tokens", L.block_tokens),
                           ("dtype", L.dtype)):
            if getattr(c, name) != mine:
                raise ValueError(f"PrefixStore.{op}: the store holds {name}={mine!r}, "
                                 f"the cache has {name}={getattr(c, name)!r}")
        return kv

    # -- tiers ------------------------------------------------------------------------
    def _holds(self, key: bytes, touch: bool = False) -> Optional[str]:
        """The tier holding ``key``'s record (with ``touch``, a RAM one becomes
        the most recent: save keeps the chain it extends)."""
        with self._lock:
            if key in self._ram:
                if touch:
                    self._ram.records.move_to_end(key)
                return "ram"
        if self.disk is not None and self.disk.holds(key):
            return "disk"
        return None

    # -- save ---------------------------------------------------------------------------
    def save(self, cache, tokens) -> int:
        """Copy every full block of ``tokens`` that the store lacks out of ``cache``.

        With a remote tier, the blocks missing there are sent too, whichever
        tier holds them here (a block saved while the server was down, or
        evicted by Redis, is sent by the next save of its prompt): one round
        trip asks which keys Redis holds (EXISTS, or EXPIRE with
        ``remote_ttl``, which refreshes them), one more sends the missing ones
        (SET NX: a block already there is never sent again, and concurrent
        writers of a block never conflict).

        Parameters
        ----------
        cache : TieredKVCache or TieredCache
            A cache of the store's shape whose positions ``0..len(tokens)-1``
            hold the KV of ``tokens`` (blocks past the shortest layer's length
            are not saved).
        tokens : list of int, numpy integer array or torch tensor
            Token ids, shape ``[T]`` or ``[1, T]``.

        Returns
        -------
        int
            Blocks that no tier of the store held before and one holds now
            (already stored ones are not copied again).  A block held here
            and sent to the remote tier is not counted: ``stats()``'s
            ``records_saved_remote`` counts what the remote tier gained.

        Raises
        ------
        TypeError, ValueError
            Bad token ids; a cache of another shape, dtype or block_tokens
            (the message names the field).
        CorruptionError
            A cold block of the cache failing its checksum (nothing is added
            for it or after it, nothing is sent to the remote tier).
        OSError
            The disk tier cannot write: every new record is in RAM all the
            same (and counted in ``blocks_saved``), none from the refused one
            on is on disk.
        RemoteTierError
            With ``remote_errors="raise"``, a failed round trip to Redis: the
            local tiers hold every block all the same.
        """
        self._check_open()
        ids = token_ids(tokens)
        kv = self._check_cache(cache, "save")
        B = self.layout.block_tokens
        n = min(len(ids), kv.seq_len) // B
        keys = chain(self.root, ids, B, n)
        local = self.ram_bytes > 0 or self.disk is not None
        missing = [i for i, key in enumerate(keys) if local and self._holds(key, touch=True) is None]
        push: List[int] = []
        remote_error: Optional[BaseException] = None
        there = None  # which blocks Redis holds (None: unknown)
        if self.remote is not None and keys:
            try:
                there = self.remote.exists(keys, "save")
            except RemoteTierError as exc:  # raised once the local tiers have the blocks
                remote_error = exc
            push = [i for i, t in enumerate(there or ()) if not t]
        if not missing and not push:
            if remote_error is not None:
                raise remote_error
            return 0
        chain_keys = frozenset(keys)
        new, to_send = set(missing), set(push)
        unheld = new if local else set(range(len(keys)))  # blocks no local tier held
        added: set = set()          # by the local tiers
        added_remote: set = set()   # by the remote tier alone
        sending: List[Tuple[bytes, Any]] = []
        pinned: list = []   # RAM records being sent (unpinned after)
        loose: list = []    # buffers no tier holds, being sent (given back after)
        refused = None
        # Written in chain order (a crash leaves a prefix of it), stamped in reverse
        # (the disk tier evicts a chain's tail before its head).
        stamp = time.time_ns() + len(keys)
        try:
            for j, i in enumerate(sorted(new | to_send)):
                if i not in new:  # held here, missing remotely: RAM's copy, else read anew
                    with self._lock:
                        held = self._ram.records.get(keys[i])
                        if held is not None:
                            held.pins += 1
                            pinned.append(held)
                            sending.append((keys[i], held.buf))
                    if held is None:
                        buf = self._record_of(kv, keys, ids, i, chain_keys)
                        loose.append(buf)
                        sending.append((keys[i], buf))
                    continue
                # One block at a time: at the budget, each reuses an evicted buffer.
                buf = self._record_of(kv, keys, ids, i, chain_keys)
                with self._lock:
                    self._check_open()
                    # Another thread's save holds it in RAM already: its block, whoever
                    # renames the file (else both would count it).
                    theirs = keys[i] in self._ram.records
                    held = self._ram.insert(keys[i], buf, chain_keys)
                    if held is not None:
                        held.pins += 1  # not recycled by another save while it is written out
                wrote = False
                try:
                    if self.disk is not None and refused is None:
                        wrote = self.disk.write(keys[i], buf, stamp - j)
                except OSError as exc:  # the rest still go to RAM; raised once they are there
                    refused = exc
                finally:
                    if i in to_send:
                        sending.append((keys[i], buf))
                        (pinned if held is not None else loose).append(held if held is not None else buf)
                    else:
                        with self._lock:
                            if held is not None:
                                self._ram.unpin(held)
                            else:
                                self._ram.give_back(buf)
                if held is not None or (wrote and not theirs):
                    added.add(i)
            if sending:
                assert self.remote is not None
                try:
                    done = self.remote.put(sending)
                except RemoteTierError as exc:
                    done, remote_error = None, exc
                index = {key: i for i, key in enumerate(keys)}
                added_remote.update(index[key] for (key, _), ok in zip(sending, done or ())
                                    if ok and index[key] in unheld)
        finally:
            with self._lock:
                for held in pinned:
                    self._ram.unpin(held)
                for buf in loose:
                    self._ram.give_back(buf)
                self._counts["blocks_saved"] += len(added)
        if refused is not None:
            raise refused
        if remote_error is not None:
            raise remote_error
        if there is not None:  # a block the remote tier held was not new to the store
            added = {i for i in added if not there[i]}
        return len(added | added_remote)

    def _record_of(self, kv, keys: List[bytes], ids: np.ndarray, i: int, chain_keys):
        """Block ``i``'s record, read out of ``kv`` into a buffer (at the RAM
        budget, an evicted record's)."""
        L = self.layout
        B = L.block_tokens
        buf = take_buffer(self._ram, self._lock, L.total, chain_keys)
        rec.write_header(buf, L, keys[i], keys[i - 1] if i else self.root, ids[i * B:(i + 1) * B])
        crc = read_rows(kv, i * B, (i + 1) * B, buf, L.header_bytes)  # summed as it copies
        rec.seal(buf, L, self._secret, None if L.mac else crc)
        return buf

    # -- lookups ------------------------------------------------------------------------
    def match(self, tokens) -> int:
        """Positions of the longest stored prefix of ``tokens`` (a multiple of
        ``block_tokens``), loading and checking nothing.

        The local tiers serve the chain up to their first miss, the remote
        tier from there up to its own: one round trip (EXISTS per key, or
        EXPIRE with ``remote_ttl``, which refreshes the records there), none
        when the local tiers hold the whole chain.  Raises RemoteTierError
        only with ``remote_errors="raise"``.
        """
        self._check_open()
        ids = token_ids(tokens)
        B = self.layout.block_tokens
        keys = chain(self.root, ids, B)
        hits = {t: 0 for t in TIERS}
        held = 0
        for key in keys:
            tier = self._holds(key)
            if tier is None:
                break
            hits[tier] += B
            held += 1
        if held < len(keys) and self.remote is not None:
            for there in self.remote.exists(keys[held:], "match") or ():
                if not there:
                    break
                hits["remote"] += B
        self._count_lookup(len(ids), hits)
        return sum(hits.values())

    def _count_lookup(self, n_tokens: int, hits: Dict[str, int]) -> None:
        with self._lock:
            self._counts["lookups"] += 1
            self._counts["query_tokens"] += n_tokens
            for tier, n in hits.items():
                self._counts["hit_tokens_" + tier] += n

    def _fetch(self, keys: List[bytes]) -> List[Tuple[Any, str, Any]]:
        """(buffer, tier, handle) of the stored chain's records, up to the first
        miss; the handle is the pinned RAM record (unpin it) or the file's inode.
        A disk record is a buffer, or an _OnDisk when loads stream (close its fd).
        Past the local tiers' first miss, the remote tier's records, all in one
        round trip, up to its first miss: the ``bytes`` Redis returned (checked
        and copied in place)."""
        L = self.layout
        out: List[Tuple[Any, str, Any]] = []
        chain_keys = frozenset(keys)  # a disk read may recycle a RAM record's buffer, not the chain's
        try:
            for key in keys:
                with self._lock:
                    held = self._ram.get(key)
                if held is not None:
                    out.append((held.buf, "ram", held))
                    continue
                if self.disk is None:
                    break
                try:
                    got = self._read_disk(key, chain_keys)
                except OSError as exc:  # the disk tier failing is a miss, not the caller's error
                    log.warning("kvcache prefix store: cannot read %s (%s): a miss",
                                self.disk.file_of(key), exc)
                    break
                if got is None:
                    break
                out.append(got)
        except BaseException:
            self._unpin(out, set())
            raise
        if len(out) < len(keys) and self.remote is not None:
            try:
                got = self.remote.get(keys[len(out):])
            except BaseException:
                self._unpin(out, set())
                raise
            for value in got or ():
                if value is None:
                    break
                out.append((value, "remote", None))
        return out

    def _read_disk(self, key: bytes, chain_keys):
        """(buffer or _OnDisk, "disk", identity) of ``key``'s file, or None."""
        L, disk = self.layout, self.disk
        assert disk is not None
        # A record sealed the other way is read too: its check counts a MAC
        # failure and keeps it (another worker's secret setting), not damage.
        sizes = (L.total, rec.other_seal(L).total)
        if self._streams():
            got = disk.open_record(key, sizes, L.header_bytes, rec.CRC_BYTES)
            if got is None:
                return None
            fd, ident, size, head, tail = got
            return (_OnDisk(np.frombuffer(head, np.uint8), fd, size,
                            struct.unpack("<I", tail)[0] if len(tail) == 4 else 0), "disk", ident)
        buf, ident = disk.read(key, sizes, lambda n: take_buffer(self._ram, self._lock, n, chain_keys))
        return None if buf is None else (buf, "disk", ident)

    def _streams(self) -> bool:
        """Whether loads read disk records straight from their files (a record
        cannot be promoted to RAM, and no HMAC needs it whole first): each
        layer's rows go from the page cache into a private scratch buffer and
        on into the cache, one pass instead of two."""
        return not self.layout.mac and self.layout.total > self.ram_bytes

    def _unpin(self, found, promoted) -> None:
        """The end of a load: RAM records unpinned, disk buffers not promoted
        to RAM given back to the free list."""
        with self._lock:
            for buf, tier, handle in found:
                if tier == "remote":
                    continue  # immutable bytes, freed with their last reference
                if tier == "ram":
                    self._ram.unpin(handle)
                elif isinstance(buf, _OnDisk):
                    if buf.fd >= 0:
                        os.close(buf.fd)
                elif id(buf) not in promoted:
                    self._ram.give_back(buf)

    def _checked(self, keys, ids, found) -> int:
        """How many of the fetched records, in chain order, pass the checks made
        before copying: size, header, key, parent, token ids, and with a secret
        the HMAC (the CRC32C is checked as the rows are copied: ``load``).  The
        first failing one is refused (:meth:`_refuse`)."""
        L, B = self.layout, self.layout.block_tokens
        for i, (buf, tier, inode) in enumerate(found):
            tokens = ids[i * B:(i + 1) * B]
            if isinstance(buf, _OnDisk):
                why = rec.check_header(buf.head, L, keys[i], keys[i - 1] if i else self.root, tokens,
                                       buf.size)
            else:
                why = rec.check_header(buf, L, keys[i], keys[i - 1] if i else self.root, tokens)
            if why is None and self._secret is not None and not rec.check_mac(buf, L, self._secret):
                why = rec.BAD_MAC
            if why is not None:
                self._refuse(keys[i], i, why, buf, tier, inode)
                return i
        return len(found)

    def _refuse(self, key: bytes, block: int, why: str, buf, tier: str, handle) -> None:
        disk = self.disk
        if tier == "remote":
            assert self.remote is not None
            where = f"remote record {redis_key(key).decode()} on {self.remote.where}"
        elif tier == "disk" and disk is not None:
            where = disk.file_of(key)
        else:
            where = f"RAM record {key.hex()}"
        with self._lock:
            self._counts["integrity_failures"] += 1
            self._counts["integrity_failures_" + tier] += 1
            if why == rec.BAD_MAC:
                self._counts["mac_failures"] += 1
            elif tier == "ram":
                self._ram.drop(key, buf)
        if why == rec.BAD_MAC:
            log.error("kvcache prefix store: %s (block %d) fails its HMAC: a miss, kept (sealed "
                      "under another secret or none, or forged)", where, block)
            return
        log.error("kvcache prefix store: %s (block %d) fails its %s check: a miss, removed",
                  where, block, why)
        if disk is not None and tier == "disk":
            disk.remove(key, handle)
        elif tier == "remote" and self.remote is not None:
            self.remote.delete(key)

    def load(self, cache, tokens) -> int:
        """Copy the longest stored prefix of ``tokens`` into the empty ``cache``.

        At most ``len(tokens) - 1`` positions are loaded (the model must still
        compute the last prompt token), and at most the cache's
        ``max_seq_len``.  Every record is checked (size, header, key, parent,
        token ids, then its CRC32C or HMAC) before any byte of it is copied;
        the first one failing ends the prefix (a counted miss).  The cache
        then holds exactly what storing those positions had stored.

        The local tiers serve the chain up to their first miss; the remote
        tier the rest, fetched in one round trip (GET, or GETEX with
        ``remote_ttl``, which refreshes them) before anything is copied, up to
        its first miss.  Its records are checked and copied from the bytes
        Redis returned, then held in RAM as they are (``promotions_remote``);
        one failing a check is deleted from Redis (unless its only fault is its
        HMAC).  If the round trip fails, the load copies what the local tiers
        hold: nothing of the remote reaches the cache.

        Returns
        -------
        int
            Positions loaded (the cache's new length in every layer).

        Raises
        ------
        TypeError, ValueError
            Bad token ids; a cache of another shape (naming the field); a
            cache that is not empty.
        CacheFullError, ColdStoreError
            The cache cannot take the rows (it is left empty).
        RemoteTierError
            With ``remote_errors="raise"``, a failed round trip to Redis (the
            cache is left empty).
        """
        self._check_open()
        ids = token_ids(tokens)
        kv = self._check_cache(cache, "load")
        lengths = [kv.layer_len(layer) for layer in range(self.layout.n_layers)]
        if any(lengths):
            raise ValueError(f"PrefixStore.load: expected an empty cache, got one holding "
                             f"{max(lengths)} positions")
        B = self.layout.block_tokens
        limit = max(0, min(len(ids) - 1, kv.config.max_seq_len))
        keys = chain(self.root, ids, B, -(-limit // B))
        fetched = self._fetch(keys)
        promoted = set()
        try:
            found = fetched[:self._checked(keys, ids, fetched)]
            blocks = -(-min(len(found) * B, limit) // B)
            copied = 0
            if blocks:
                bufs = [f[0] for f in found[:blocks]]
                expect = None if self.layout.mac else [
                    b.crc if isinstance(b, _OnDisk) else rec.stored_crc(b, self.layout) for b in bufs]
                records: List[Any] = [(b.head, b.fd) if isinstance(b, _OnDisk) else b for b in bufs]
                scratch = self._take_scratch() if any(isinstance(b, _OnDisk) for b in bufs) else None
                try:
                    copied = append_rows(kv, records, self.layout.header_bytes, B,
                                         min(B, limit - (blocks - 1) * B), expect, scratch)
                except BaseException:
                    kv.truncate(0)
                    raise
                finally:
                    if scratch is not None:
                        with self._lock:
                            self._scratch.append(scratch)
                if copied < blocks:  # record `copied` failed its CRC32C: undone, never visible
                    self._refuse(keys[copied], copied, rec.BAD_CRC, *found[copied])
                promoted = self._promote(keys[:copied], found[:copied])
        finally:
            self._unpin(fetched, promoted)
        positions = min(copied * B, limit)
        hits = {t: 0 for t in TIERS}
        for i in range(copied):
            hits[found[i][1]] += min(B, positions - i * B)
        self._count_lookup(len(ids), hits)
        return positions

    def _take_scratch(self):
        with self._lock:
            if self._scratch:
                return self._scratch.pop()
        return rec.new_buffer(self.layout.rows_bytes)

    def _promote(self, keys, found) -> set:
        """Disk hits come back to RAM and become the disk tier's most recent (a
        block more recent than the blocks after it); remote hits come to RAM
        (not to disk) as the very ``bytes`` Redis returned: no copy, only a
        reference.  Returns the ids of the buffers now held in RAM."""
        promoted, protect = set(), frozenset(keys)
        stamp = time.time_ns() + len(keys)
        for j, (key, (buf, tier, _)) in enumerate(zip(keys, found)):
            if tier == "remote":
                with self._lock:
                    if not self._closed and self._ram.insert(key, buf, protect) is not None:
                        self._counts["promotions_remote"] += 1
                        promoted.add(id(buf))
                continue
            if tier != "disk" or self.disk is None:
                continue
            self.disk.touch(key, stamp - j)
            if isinstance(buf, _OnDisk):
                continue
            with self._lock:
                if not self._closed and self._ram.insert(key, buf, protect) is not None:
                    self._counts["promotions"] += 1
                    promoted.add(id(buf))
        return promoted

    # -- accounting ---------------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        """Counters since creation, as a dict of ints.

        ``lookups`` counts match and load calls, ``query_tokens`` the token
        ids they were given, ``hit_tokens_<tier>`` the positions they returned
        by the tier that held each block (ram, disk); ``blocks_saved`` the
        records save added; ``records_<tier>`` / ``bytes_<tier>`` what each
        tier holds now (disk: every process's files, as of this process's
        last write or scan); ``evictions_<tier>`` the records this store
        dropped for its budgets; ``promotions`` disk records brought back to
        RAM; ``integrity_failures`` (by tier in ``integrity_failures_<tier>``)
        the records refused by a check, of which ``mac_failures`` by their
        HMAC.
        """
        with self._lock:
            out = dict(self._counts)
            out["records_ram"] = len(self._ram)
            out["bytes_ram"] = self._ram.used
            out["evictions_ram"] = self._ram.evictions
        if self.disk is not None:
            with self.disk._lock:
                out["records_disk"] = self.disk.records
                out["bytes_disk"] = self.disk.bytes
                out["evictions_disk"] = self.disk.evictions
        out.update(self.remote.stats() if self.remote is not None
                   else dict.fromkeys(REMOTE_STAT_NAMES, 0))
        return out
