"""The moves between the tiers: write back, verify, evict, promote.

Owns: copying a hot block's rows to its cold files (converted to the cold
dtype, checksummed, counted against ``max_cold_bytes``), checking cold rows
against their CRC32C before anything reads them, evicting the policy's
victim to free a slot, and bringing a cold block back to RAM.  Every
function runs with the layer's lock held by its caller (kvcache._hot) and
without the GIL, and fills the caller's error record where a failure
happens.
Must not touch: locks (the caller's), the layer's length, Python objects.
"""
from libc.stdlib cimport free, malloc

from kvcache._ckvc cimport (
    KVC_OK, KVC_E_NOMEM, KVC_E_INVALID, KVC_E_CORRUPT, KVC_LIMIT_COLD_BYTES, KVC_LIMIT_SLOTS,
    KVC_STAT_EVICTIONS, KVC_STAT_EVICTION_BLOCKS, KVC_STAT_PROMOTIONS, KVC_STAT_PROMOTION_BLOCKS,
    KVC_STAT_BYTES_TO_COLD, KVC_STAT_BYTES_FROM_COLD, KVC_STAT_COLD_BYTES,
    kvc_error, kvc_fail, kvc_fail_io, kvc_fail_full, kvc_stats_add, kvc_stats_sub, kvc_stats_reserve,
    kvc_stats_get,
)
from kvcache._codec cimport Rows, convert_pair, dense_rows
from kvcache._cold cimport write_all
from kvcache._format cimport row_offset
from kvcache._policy cimport Block, choose_slot
from kvcache._tier cimport HotLayer, Tier, clamp_rows, cold_rows, slot_rows


cdef int write_back(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t rows, kvc_error *e) noexcept nogil:
    """Write rows [disk_rows, rows) of hot block b to the cold files (converted
    to the cold format when it differs)."""
    cdef Block *blk = &L.blocks[b]
    cdef Py_ssize_t d = blk.disk_rows, cb = t.cold_fmt.row_bytes
    cdef size_t nbytes = (rows - d) * cb
    cdef size_t off = row_offset(b * t.block_tokens + d, cb)
    cdef Rows src = slot_rows(t, L, blk.slot, d)
    cdef char *buf = NULL
    cdef int status = KVC_OK, err
    if rows <= d:
        return KVC_OK
    if L.cold.fd_k < 0:
        return kvc_fail(e, KVC_E_INVALID, L.index, b)
    if t.hot_fmt.kind != t.cold_fmt.kind:
        buf = <char *>malloc(2 * nbytes)
        if buf == NULL:
            return kvc_fail(e, KVC_E_NOMEM, L.index, b)
        status = convert_pair(t.ops, False, &t.hot_fmt, src, &t.cold_fmt, dense_rows(buf, buf + nbytes, cb),
                              rows - d)
        if status != KVC_OK:
            free(buf)
            return kvc_fail(e, status, L.index, b)
        src = dense_rows(buf, buf + nbytes, cb)
    if not kvc_stats_reserve(t.stats, KVC_STAT_COLD_BYTES, 2 * nbytes, t.cold_limit):
        free(buf)
        return kvc_fail_full(e, KVC_LIMIT_COLD_BYTES, L.index, kvc_stats_get(t.stats, KVC_STAT_COLD_BYTES),
                             2 * nbytes, t.cold_limit)
    err = write_all(L.cold.fd_k, src.k, nbytes, off)
    if err != 0:
        status = kvc_fail_io(e, err, L.index, b, 0)
    else:
        err = write_all(L.cold.fd_v, src.v, nbytes, off)
        if err != 0:
            status = kvc_fail_io(e, err, L.index, b, 1)
    if status != KVC_OK:
        kvc_stats_sub(t.stats, KVC_STAT_COLD_BYTES, 2 * nbytes)
    else:
        blk.crc_k = t.ops.crc32c(blk.crc_k, src.k, nbytes)
        blk.crc_v = t.ops.crc32c(blk.crc_v, src.v, nbytes)
        blk.disk_rows = rows
        blk.verified = 0
        kvc_stats_add(t.stats, KVC_STAT_BYTES_TO_COLD, 2 * nbytes)
    free(buf)
    return status


cdef int verify(Tier *t, HotLayer *L, Py_ssize_t b, kvc_error *e) noexcept nogil:
    """Check block b's disk rows against their checksums (once per write)."""
    cdef Block *blk = &L.blocks[b]
    cdef size_t nbytes = blk.disk_rows * t.cold_fmt.row_bytes
    cdef Rows at = cold_rows(t, L, b * t.block_tokens)
    if blk.verified or blk.disk_rows == 0:
        return KVC_OK
    if t.ops.crc32c(0, at.k, nbytes) != blk.crc_k:
        kvc_fail(e, KVC_E_CORRUPT, L.index, b)
        e.file_kind = 0
        return KVC_E_CORRUPT
    if t.ops.crc32c(0, at.v, nbytes) != blk.crc_v:
        kvc_fail(e, KVC_E_CORRUPT, L.index, b)
        e.file_kind = 1
        return KVC_E_CORRUPT
    blk.verified = 1
    return KVC_OK


cdef int write_back_blocks(Tier *t, HotLayer *L, Py_ssize_t start, Py_ssize_t stop, bint check,
                           kvc_error *e) noexcept nogil:
    """Write the hot blocks holding positions [start, stop) to the cold files
    (with ``check``, verify the cold ones)."""
    cdef Py_ssize_t b, B = t.block_tokens
    cdef int status = KVC_OK
    for b in range(start // B, (stop + B - 1) // B):
        if L.blocks[b].slot >= 0:
            status = write_back(t, L, b, clamp_rows(L.length - b * B, B), e)
        elif check:
            status = verify(t, L, b, e)
        if status != KVC_OK:
            break
    return status


cdef int evict(Tier *t, HotLayer *L, Py_ssize_t s, Py_ssize_t cursor, kvc_error *e) noexcept nogil:
    """Move the block in hot slot s to the cold tier and free the slot."""
    cdef Py_ssize_t b = L.owner[s]
    cdef Py_ssize_t rows = clamp_rows(cursor - b * t.block_tokens, t.block_tokens)
    cdef int status = write_back(t, L, b, rows, e)
    if status != KVC_OK:
        return status
    L.blocks[b].slot = -1
    L.owner[s] = -1
    kvc_stats_add(t.stats, KVC_STAT_EVICTIONS, rows)
    kvc_stats_add(t.stats, KVC_STAT_EVICTION_BLOCKS, 1)
    return KVC_OK


cdef int take_slot(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t cursor, kvc_error *e) noexcept nogil:
    """Give block b a slot, evicting the policy's victim if none is free."""
    cdef Py_ssize_t s = choose_slot(&t.policy, L.blocks, L.owner, t.n_slots, cursor, b)
    cdef int status
    if s < 0:
        return kvc_fail_full(e, KVC_LIMIT_SLOTS, L.index, t.n_slots, 1, t.n_slots)
    if L.owner[s] >= 0:
        status = evict(t, L, s, cursor, e)
        if status != KVC_OK:
            return status
    L.owner[s] = b
    L.blocks[b].slot = s
    return KVC_OK


cdef int load_block(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t cursor, kvc_error *e) noexcept nogil:
    """Bring cold block b back to RAM (verified first): a promotion."""
    cdef Block *blk = &L.blocks[b]
    cdef Py_ssize_t rows = blk.disk_rows
    cdef int status = verify(t, L, b, e)
    if status == KVC_OK:
        status = take_slot(t, L, b, cursor, e)
    if status == KVC_OK:
        status = convert_pair(t.ops, True, &t.cold_fmt, cold_rows(t, L, b * t.block_tokens),
                              &t.hot_fmt, slot_rows(t, L, blk.slot, 0), rows)
        if status != KVC_OK:  # the slot holds part of a copy: give it back, the block stays cold
            L.owner[blk.slot] = -1
            blk.slot = -1
            return kvc_fail(e, status, L.index, b)
    if status != KVC_OK:
        return status
    kvc_stats_add(t.stats, KVC_STAT_PROMOTIONS, rows)
    kvc_stats_add(t.stats, KVC_STAT_PROMOTION_BLOCKS, 1)
    kvc_stats_add(t.stats, KVC_STAT_BYTES_FROM_COLD, 2 * rows * t.cold_fmt.row_bytes)
    return KVC_OK


cdef void drop_disk_rows(Tier *t, HotLayer *L, Py_ssize_t b, Py_ssize_t keep) noexcept nogil:
    """Forget block b's disk rows from ``keep`` on, re-checksumming the rest."""
    cdef Block *blk = &L.blocks[b]
    cdef Py_ssize_t rb = t.row_bytes, cb = t.cold_fmt.row_bytes
    cdef Rows hot, cold
    cdef kvc_error ignored
    cdef bint bad = False
    if blk.disk_rows <= keep:
        return
    kvc_stats_sub(t.stats, KVC_STAT_COLD_BYTES, 2 * (blk.disk_rows - keep) * cb)
    if keep == 0:
        blk.crc_k = blk.crc_v = 0
    elif blk.slot >= 0 and t.hot_fmt.kind == t.cold_fmt.kind:
        # the RAM copy holds the same bytes, and is the reference for them
        hot = slot_rows(t, L, blk.slot, 0)
        blk.crc_k = t.ops.crc32c(0, hot.k, keep * rb)
        blk.crc_v = t.ops.crc32c(0, hot.v, keep * rb)
    else:
        ignored.code = KVC_OK
        bad = verify(t, L, b, &ignored) != KVC_OK
        cold = cold_rows(t, L, b * t.block_tokens)
        blk.crc_k = t.ops.crc32c(0, cold.k, keep * cb)
        blk.crc_v = t.ops.crc32c(0, cold.v, keep * cb)
        if bad:  # corrupt rows stay detectably corrupt
            blk.crc_k = ~blk.crc_k
    blk.disk_rows = keep
    blk.verified = 0
