"""Eviction policies: which hot block goes cold when a layer needs a slot.

A block with a *higher* score stays in RAM; the victim is the lowest score
(ties: the older block, lower positions first).  Sink blocks are never
victims; with "h2o" neither are blocks reaching into the recent window,
unless nothing else is left.  The choice scans the layer's hot slots
(hot_tokens / block_tokens entries): its cost is bounded by the RAM budget,
not by the context length, and is small beside the block copy it precedes.
"""

POLICIES = {"lru": POLICY_LRU, "adaptive": POLICY_ADAPTIVE, "h2o": POLICY_H2O}


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
