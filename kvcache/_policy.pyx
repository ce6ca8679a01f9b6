"""Eviction and promotion policies: which hot block goes cold, which cold block comes back.

Owns: the policy table (one row per ``eviction_policy``), block scores, the
victim choice, and the promotion decision of a read.  A block with a
*higher* score stays in RAM; the victim is the lowest score (ties: the older
block, lower positions first).  Sink blocks are never victims; with "h2o"
neither are blocks reaching into the recent window, unless nothing else is
left.  The choice scans the layer's hot slots (hot_tokens / block_tokens
entries): its cost is bounded by the RAM budget, not by the context length,
and is small beside the block copy it precedes.
Must not touch: arenas, files, locks (callers hold the layer's lock and do the moves).
"""
from collections import namedtuple

PolicyInfo = namedtuple("PolicyInfo", ["name", "code", "promotes"])
PolicyInfo.__doc__ = """One eviction policy: its config name, native code, and whether
``promote_on_read`` applies to it (h2o's scores come from attention, not reads)."""

# The one table of eviction policies.
POLICIES = {p.name: p for p in (
    PolicyInfo("lru", POLICY_LRU, True),
    PolicyInfo("adaptive", POLICY_ADAPTIVE, True),
    PolicyInfo("h2o", POLICY_H2O, False),
)}


cdef double block_score(const Policy *p, const Block *b) noexcept nogil:
    if p.kind == POLICY_LRU:
        return <double>b.last_use
    if p.kind == POLICY_ADAPTIVE:
        return p.w_frequency * b.hits + p.w_recency * b.last_use
    return b.mass


cdef Py_ssize_t choose_slot(const Policy *p, const Block *blocks, const int32_t *owner,
                            Py_ssize_t n_slots, Py_ssize_t cursor, Py_ssize_t keep) noexcept nogil:
    """A free slot, else the slot of the victim block; -1 if every block is pinned.

    ``cursor`` is the layer's end (for the recent window); ``keep`` a block
    that must stay (the one being filled).
    """
    cdef Py_ssize_t s, b, best = -1, fallback = -1
    cdef double score, best_score = 0
    for s in range(n_slots):
        b = owner[s]
        if b < 0:
            return s
        if b < p.sink_blocks or b == keep:
            continue
        if p.kind == POLICY_H2O and (b + 1) * p.block_tokens > cursor - p.recent:
            if fallback < 0 or b < owner[fallback]:
                fallback = s
            continue
        score = block_score(p, &blocks[b])
        if best < 0 or score < best_score or (score == best_score and b < owner[best]):
            best, best_score = s, score
    return best if best >= 0 else fallback


cdef bint read_promotes(const Policy *p, Py_ssize_t cold_blocks, Py_ssize_t n_slots) noexcept nogil:
    """Whether a read touching ``cold_blocks`` cold blocks may promote them: never
    when promotion is off, nor for a scan over more than half the hot slots
    (a scan must not flush the hot tier)."""
    return p.promote and cold_blocks <= n_slots // 2


cdef bint promotes(const Policy *p, const Block *blocks, const int32_t *owner, Py_ssize_t n_slots,
                   Py_ssize_t cursor, Py_ssize_t b) noexcept nogil:
    """Whether cold block ``b``, being read, should come back to RAM: when a slot
    is free, or when it outranks the victim it would displace."""
    cdef Py_ssize_t s = choose_slot(p, blocks, owner, n_slots, cursor, b)
    return s >= 0 and (owner[s] < 0 or block_score(p, &blocks[owner[s]]) < block_score(p, &blocks[b]))
