"""The prefix store's RAM tier: an LRU of records bounded by ``ram_bytes``,
whose buffers are recycled.

Owns: which records are in RAM and in which order (least recently used
first), the byte budget, and the buffers: a record evicted or dropped while
no load is copying from it gives its buffer back to a free list, from which
the next save or disk read takes one (so a store at its budget writes its
new records into memory already faulted in, not into fresh pages).  A load
pins the records it copies (:meth:`RamTier.get`) and unpins them after; a
pinned record that leaves the tier keeps its buffer until the last unpin.
A record loaded from the remote tier is held as the immutable ``bytes``
Redis returned (no copy): it is never recycled, since saves write into the
buffers they take.
The records held plus the spare buffers on the free list never exceed the
budget (buffers being filled by a save, or pinned by a load after their
record left, are outside it until they are inserted or let go).
Must not touch: record contents (kvcache.prefix.record), the disk tier.
The caller (kvcache.prefix.store) holds its lock around every method.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

from kvcache.prefix.record import new_buffer


class Held:
    """One record in RAM: its buffer, the loads copying from it, and whether
    it has left the tier."""

    __slots__ = ("buf", "pins", "gone")

    def __init__(self, buf):
        self.buf = buf
        self.pins = 0
        self.gone = False


class RamTier:
    """Records of ``record_bytes`` each, at most ``budget`` bytes of them."""

    def __init__(self, budget: int, record_bytes: int):
        self.budget = budget
        self.record_bytes = record_bytes
        self.records: "OrderedDict[bytes, Held]" = OrderedDict()
        self.used = 0
        self.free: List[object] = []
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: bytes) -> bool:
        return key in self.records

    def get(self, key: bytes) -> Optional[Held]:
        """The record of ``key``, pinned and made the most recent, or None."""
        h = self.records.get(key)
        if h is not None:
            self.records.move_to_end(key)
            h.pins += 1
        return h

    def unpin(self, h: Held) -> None:
        h.pins -= 1
        if h.gone and h.pins == 0:
            self._recycle(h)

    def insert(self, key: bytes, buf, protect=frozenset()) -> Optional[Held]:
        """Hold ``buf`` as ``key``'s record (evicting the least recent ones to
        fit); None if it is held already, or would have to evict a record of
        ``protect`` (the keys of its own chain: a chain longer than the budget
        keeps its head, without which its tail is never matched)."""
        if key in self.records:
            self.records.move_to_end(key)
            return None
        size = len(buf)
        if size > self.budget or not self._room(size, protect):
            return None
        h = self.records[key] = Held(buf)
        self.used += size
        while self.free and self.used + len(self.free) * self.record_bytes > self.budget:
            self.free.pop()  # the tier's records and spare buffers stay within the budget
        return h

    def _room(self, size: int, protect) -> bool:
        """Evict least recent records until ``size`` more bytes fit; False
        (nothing evicted) if that would take a record of ``protect``."""
        need = self.used + size - self.budget
        for key, h in self.records.items():
            if need <= 0:
                break
            if key in protect:
                return False
            need -= len(h.buf)
        while self.used + size > self.budget:
            _, old = self.records.popitem(last=False)
            self._leave(old)
            self.evictions += 1
        return True

    def reserve(self, protect=frozenset()):
        """A recycled buffer for a new record, or None: from the free list, else,
        at the budget, the least recent record's, evicted now (if no load pins
        it and it is not in ``protect``), so that a store at its budget writes
        new records into memory already faulted in."""
        if self.free:
            return self.free.pop()
        if self.records and self.used + self.record_bytes > self.budget:
            key, h = next(iter(self.records.items()))
            if h.pins == 0 and key not in protect and _reusable(h.buf, self.record_bytes):
                del self.records[key]
                self.used -= len(h.buf)
                self.evictions += 1
                h.gone = True
                buf, h.buf = h.buf, None
                return buf
        return None

    def drop(self, key: bytes, buf) -> None:
        """Forget ``key``'s record if it is still ``buf`` (a record that failed a check)."""
        h = self.records.get(key)
        if h is not None and h.buf is buf:
            del self.records[key]
            self._leave(h)

    def _leave(self, h: Held) -> None:
        self.used -= len(h.buf)
        h.gone = True
        if h.pins == 0:
            self._recycle(h)

    def _recycle(self, h: Held) -> None:
        buf, h.buf = h.buf, None
        if _reusable(buf, self.record_bytes) and self.used + (len(self.free) + 1) * self.record_bytes <= self.budget:
            self.free.append(buf)

    def give_back(self, buf) -> None:
        """A buffer that no record holds (a save that lost a race) back to the free list."""
        h = Held(buf)
        h.gone = True
        self._recycle(h)

    def clear(self) -> None:
        """Forget every record and spare buffer, for good (the store is closing):
        buffers pinned by loads in flight are let go when they end."""
        for h in self.records.values():
            h.gone = True
        self.records.clear()
        self.free.clear()
        self.used = 0
        self.budget = 0


def _reusable(buf, record_bytes: int) -> bool:
    """A buffer a save may write a new record into: one of the size, not a
    remote record's immutable bytes."""
    return len(buf) == record_bytes and not isinstance(buf, bytes)


def take_buffer(ram: RamTier, lock, nbytes: int, protect=frozenset()):
    """A record buffer recycled by ``ram`` (see :meth:`RamTier.reserve`; under
    ``lock``), else a new one."""
    with lock:
        buf = ram.reserve(protect) if nbytes == ram.record_bytes else None
    return buf if buf is not None else new_buffer(nbytes)
