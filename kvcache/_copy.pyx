"""The GIL-free copy loops of one layer: admission, append, read, cut.

Owns: the checks a store must pass before it writes (``max_seq_len``,
``max_cold_bytes``), appending rows (taking or evicting slots through
kvcache._moves, all or nothing), reading rows out of either tier (promoting
what the policy brings back), forgetting positions, and one layer's task of
a parallel ``store_layers`` (or of a prefix load, which may first read the
layer's rows from a record file into private memory, and sums them).  Every function runs with the layer's lock held
by its caller (kvcache._hot) and fills the caller's error record.
Must not touch: locks, the thread pool, Python objects, file layouts.
"""
from libc.errno cimport errno, EINTR
from libc.stdint cimport uint64_t, UINT64_MAX
from posix.types cimport off_t
from posix.unistd cimport pread

from kvcache._ckvc cimport (
    KVC_OK, KVC_E_FULL, KVC_E_CLOSED, KVC_E_IO, KVC_E_CORRUPT, KVC_LIMIT_SEQ_LEN, KVC_LIMIT_COLD_BYTES,
    KVC_STAT_TOKENS_STORED, KVC_STAT_BYTES_STORED, KVC_STAT_BYTES_FROM_COLD, KVC_STAT_COLD_BYTES,
    KVC_STAT_ROWS_HELD, kvc_error, kvc_error_clear, kvc_fail, kvc_fail_full, kvc_stats_add, kvc_stats_sub,
    kvc_stats_get,
)
from kvcache._codec cimport RowFmt, Rows, convert_pair, rows_at
from kvcache._moves cimport drop_disk_rows, load_block, take_slot, verify
from kvcache._policy cimport Block, promotes, read_promotes
from kvcache._simd cimport simd_ops
from kvcache._tier cimport HotLayer, Tier, clamp_rows, cold_rows, slot_rows


# -- bookkeeping (the caller holds the layer lock) ---------------------------------
cdef void cut(Tier *t, HotLayer *L, Py_ssize_t n, Py_ssize_t extent) noexcept nogil:
    """Forget positions [n, extent) of a layer in both tiers."""
    cdef Py_ssize_t b, keep, p, B = t.block_tokens
    cdef Block *blk
    for b in range(n // B, (extent + B - 1) // B):
        blk = &L.blocks[b]
        keep = clamp_rows(n - b * B, B)
        drop_disk_rows(t, L, b, keep)
        if keep == 0:
            if t.tiered and blk.slot >= 0:
                L.owner[blk.slot] = -1
                blk.slot = -1
            blk.hits = 0
            blk.last_use = 0
        if L.scores != NULL:
            blk.mass = 0
            for p in range(b * B, b * B + B):
                if p >= n:
                    L.scores[p] = 0
                else:
                    blk.mass += L.scores[p]
    if L.length > n:
        kvc_stats_sub(t.stats, KVC_STAT_ROWS_HELD, L.length - n)
    L.length = n


cdef int check_room(Tier *t, HotLayer *L, Py_ssize_t n, uint64_t *need, kvc_error *e) noexcept nogil:
    """KVC_E_FULL if n more positions would pass max_seq_len; else adds to
    ``need`` the cold bytes they may take (only counted under max_cold_bytes)."""
    cdef Py_ssize_t b, B = t.block_tokens, missing = 0, free_slots = 0
    if L.keys == NULL:
        return kvc_fail(e, KVC_E_CLOSED, L.index, -1)
    if n > t.max_len - L.length:
        return kvc_fail_full(e, KVC_LIMIT_SEQ_LEN, L.index, L.length, n, t.max_len)
    if t.cold_limit == UINT64_MAX:
        return KVC_OK
    if t.persist:  # every position goes to disk at the next flush
        need[0] += 2 * <uint64_t>n * t.cold_fmt.row_bytes
    elif t.tiered:  # worst case: each block it pushes out is a whole block new to disk
        for b in range(L.length // B, (L.length + n + B - 1) // B):
            missing += L.blocks[b].slot < 0
        if missing:
            for b in range(t.n_slots):
                free_slots += L.owner[b] < 0
        need[0] += 2 * <uint64_t>max(0, missing - free_slots) * B * t.cold_fmt.row_bytes
    return KVC_OK


cdef int cold_fits(Tier *t, uint64_t need, Py_ssize_t layer, kvc_error *e) noexcept nogil:
    """KVC_E_FULL if ``need`` more cold bytes would pass max_cold_bytes."""
    cdef uint64_t held
    if need == 0:
        return KVC_OK
    if t.persist:
        held = 2 * kvc_stats_get(t.stats, KVC_STAT_ROWS_HELD) * t.cold_fmt.row_bytes
    else:
        held = kvc_stats_get(t.stats, KVC_STAT_COLD_BYTES)
    if need > t.cold_limit - min(t.cold_limit, held):
        return kvc_fail_full(e, KVC_LIMIT_COLD_BYTES, layer, held, need, t.cold_limit)
    return KVC_OK


cdef void close_layer(HotLayer *L) noexcept nogil:
    """Mark a layer closed: every call on it now returns KVC_E_CLOSED (lock held)."""
    L.keys = L.values = NULL
    L.length = 0
    L.cold.fd_k = L.cold.fd_v = -1
    L.cold.map_k = L.cold.map_v = NULL


# -- stores ------------------------------------------------------------------------
cdef int append_locked(Tier *t, HotLayer *L, const RowFmt *fmt, Py_ssize_t n, Rows src,
                       kvc_error *e) noexcept nogil:
    """Append n rows to a layer whose lock the caller holds and whose room
    check_room confirmed: all or nothing."""
    cdef Py_ssize_t B = t.block_tokens
    cdef Py_ssize_t old = L.length, cursor = L.length, i = 0, b, off, cnt
    cdef Block *blk
    cdef int status = KVC_OK
    L.tick += 1
    while i < n:
        b = cursor // B
        off = cursor - b * B
        blk = &L.blocks[b]
        if blk.slot < 0:
            # A cold block with rows is the tail after a truncate or a reopen.
            status = load_block(t, L, b, cursor, e) if blk.disk_rows > 0 else take_slot(t, L, b, cursor, e)
            if status != KVC_OK:
                cut(t, L, old, cursor)
                return status
        cnt = min(B - off, n - i)
        status = convert_pair(t.ops, True, fmt, rows_at(src, i), &t.hot_fmt, slot_rows(t, L, blk.slot, off), cnt)
        if status != KVC_OK:
            cut(t, L, old, cursor)
            return kvc_fail(e, status, L.index, b)
        blk.last_use = L.tick
        i += cnt
        cursor += cnt
    L.length = cursor
    kvc_stats_add(t.stats, KVC_STAT_ROWS_HELD, n)
    kvc_stats_add(t.stats, KVC_STAT_TOKENS_STORED, n)
    kvc_stats_add(t.stats, KVC_STAT_BYTES_STORED, 2 * n * t.row_bytes)
    return KVC_OK


cdef bint moves_blocks(Tier *t, Py_ssize_t n) noexcept nogil:
    """Whether appending n rows to every layer may evict or promote (block-sized I/O
    per layer: worth the thread pool even for a one-token step)."""
    cdef Py_ssize_t l, b, B = t.block_tokens
    cdef HotLayer *L
    if not t.tiered:
        return False
    for l in range(t.n_layers):
        L = &t.layers[l]
        for b in range(L.length // B, (L.length + n + B - 1) // B):
            if L.blocks[b].slot < 0:
                return True
    return False


cdef bint read_fully(int fd, char *dst, Py_ssize_t n, Py_ssize_t offset) noexcept nogil:
    """pread n bytes at offset, retrying short reads and EINTR; False if the file ends first or fails."""
    cdef ssize_t got
    while n > 0:
        got = pread(fd, dst, <size_t>n, <off_t>offset)
        if got < 0 and errno == EINTR:
            continue
        if got <= 0:
            return False
        dst += got
        offset += got
        n -= got
    return True


cdef void append_task(void *ctx, size_t l) noexcept nogil:
    cdef AppendJob *j = <AppendJob *>ctx
    cdef Rows src = j.src
    src.k += <Py_ssize_t>l * j.k_layer_step
    src.v += <Py_ssize_t>l * j.v_layer_step
    if j.check == NULL:
        j.status[l] = append_locked(j.tier, &j.tier.layers[l], j.fmt, j.n, src, &j.errors[l])
    else:
        j.status[l] = append_checked(j, l, src)


cdef int append_checked(AppendJob *j, size_t l, Rows src) noexcept nogil:
    """append_task with an AppendCheck: the layer's rows summed a chunk at a time
    (about 32 KiB of keys and of values), each chunk appended right after it is
    summed, while it is still in the core's cache: the source is read from memory
    once.  From a file, rows are first read a window at a time (about 256 KiB of
    keys and of values) into the layer's scratch, then summed and appended from
    there.  Rows of the record past those stored are summed too."""
    cdef AppendCheck *c = j.check
    cdef Py_ssize_t rb = j.fmt.row_bytes, done = 0, step, at, win
    cdef Py_ssize_t chunk = max(1, (32 << 10) // rb)
    cdef Py_ssize_t window = c.rows if c.fd < 0 else max(chunk, (256 << 10) // rb)
    cdef Py_ssize_t k_off = c.file_offset + <Py_ssize_t>l * 2 * c.rows * rb
    cdef Py_ssize_t v_off = k_off + c.rows * rb
    cdef uint32_t crc_k = 0, crc_v = 0
    cdef int status = KVC_OK
    cdef HotLayer *L = &j.tier.layers[l]
    cdef uint64_t tick = L.tick
    cdef Py_ssize_t b, first = L.length // j.tier.block_tokens
    cdef Rows rows
    while done < c.rows:
        win = min(window, c.rows - done)  # rows [done, done + win) of the record
        if c.fd >= 0:
            rows.k = c.scratch + <Py_ssize_t>l * 2 * c.rows * rb
            rows.v = rows.k + win * rb
            rows.k_step = rows.v_step = rb
            if not (read_fully(c.fd, rows.k, win * rb, k_off + done * rb)
                    and read_fully(c.fd, rows.v, win * rb, v_off + done * rb)):
                return kvc_fail(&j.errors[l], KVC_E_CORRUPT, -1, -1)
        else:
            rows = rows_at(src, done)
        at = 0
        while at < win:
            step = min(chunk, win - at)
            crc_k = simd_ops().crc32c(crc_k, rows.k + at * rb, <size_t>(step * rb))
            crc_v = simd_ops().crc32c(crc_v, rows.v + at * rb, <size_t>(step * rb))
            if status == KVC_OK and done + at < j.n:  # the record's rows past n are only summed
                status = append_locked(j.tier, L, j.fmt, min(step, j.n - done - at), rows_at(rows, at),
                                       &j.errors[l])
            at += step
        done += win
        if status != KVC_OK:
            break
    c.crcs[2 * l], c.crcs[2 * l + 1] = crc_k, crc_v
    if L.tick > tick + 1:  # one store, one tick (the adaptive policy's clock), however many chunks
        for b in range(first, (L.length + j.tier.block_tokens - 1) // j.tier.block_tokens):
            if L.blocks[b].last_use > tick:
                L.blocks[b].last_use = tick + 1
        L.tick = tick + 1
    return status


# -- reads -------------------------------------------------------------------------
cdef int read_locked(Tier *t, HotLayer *L, const RowFmt *out, Py_ssize_t start, Py_ssize_t stop,
                     Rows dst, kvc_error *e, Py_ssize_t *hot, Py_ssize_t *cold,
                     bint may_promote=True) noexcept nogil:
    """Copy rows [start, stop) of a tiered layer (lock held, range checked) out
    as ``out``, promoting cold blocks the policy brings back (unless
    ``may_promote`` is false: a prefix save reads without moving); adds to ``hot``
    and ``cold`` the rows each tier served.  A row counts as cold when its
    block was cold as the read found it, also when the read promotes it."""
    cdef Py_ssize_t B = t.block_tokens, cb = t.cold_fmt.row_bytes
    cdef Py_ssize_t pos = start, b = start // B, off, cnt, cold_blocks = 0
    cdef Block *blk
    cdef int status = KVC_OK
    cdef bint promote = t.policy.promote and may_promote, was_cold
    cdef kvc_error attempt
    L.tick += 1
    if promote:
        for b in range(start // B, (stop + B - 1) // B):
            cold_blocks += L.blocks[b].slot < 0
        promote = read_promotes(&t.policy, cold_blocks, t.n_slots)
    while pos < stop and status == KVC_OK:
        b = pos // B
        off = pos - b * B
        cnt = min(B - off, stop - pos)
        blk = &L.blocks[b]
        blk.last_use = L.tick
        blk.hits += 1
        was_cold = blk.slot < 0
        if was_cold and promote and promotes(&t.policy, L.blocks, L.owner, t.n_slots,
                                             L.length, b):
            kvc_error_clear(&attempt)
            status = load_block(t, L, b, L.length, &attempt)
            if status == KVC_E_IO or status == KVC_E_FULL:
                status = KVC_OK  # could not make room: serve it from the cold tier
            elif status != KVC_OK:
                e[0] = attempt
                break
        if blk.slot >= 0:
            status = convert_pair(t.ops, False, &t.hot_fmt, slot_rows(t, L, blk.slot, off),
                                  out, rows_at(dst, pos - start), cnt)
        else:
            status = verify(t, L, b, e)
            if status != KVC_OK:
                break
            status = convert_pair(t.ops, False, &t.cold_fmt, cold_rows(t, L, pos), out,
                                  rows_at(dst, pos - start), cnt)
            kvc_stats_add(t.stats, KVC_STAT_BYTES_FROM_COLD, 2 * cnt * cb)
        if was_cold:
            cold[0] += cnt
        else:
            hot[0] += cnt
        pos += cnt
    if status != KVC_OK:
        kvc_fail(e, status, L.index, b)
    return status
