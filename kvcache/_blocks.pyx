"""Whole blocks of every layer between a cache and prefix records, on the thread pool.

Owns: copying positions of every layer of a TieredKVCache out into a
record's rows in the cache's hot dtype (``read_rows``; cold blocks converted
by the engine's read) with their CRC32C summed as they land, appending
records' rows to a cache (``append_rows``, through the engine's store path)
with their CRC32C checked as they are copied, and joining CRC32Cs
(``crc32c_combine``).  A record's rows are, for each layer, ``B`` key rows then
``B`` value rows, ``row_bytes`` apart (docs/format.md, "Prefix records").
Must not touch: record headers, checksums' meaning or tiers of the store
(kvcache.prefix.record / store); slots, blocks and files (the engine's).
"""
from libc.stdint cimport uint32_t
from libc.stdlib cimport calloc, free

from kvcache._ckvc cimport KVC_OK, KVC_E_CORRUPT, KVC_E_NOMEM, kvc_error, kvc_error_clear, kvc_fail, kvc_pool_run
from kvcache._codec cimport Rows, dense_rows
from kvcache._copy cimport AppendCheck
from kvcache._hot cimport HotTier, read_layer
from kvcache._simd cimport simd_ops
from kvcache._status cimport raise_error
from kvcache._tier cimport Tier
from kvcache.errors import CacheClosedError

cdef enum:
    PARALLEL_MIN_BYTES = 1 << 20   # below this one thread copies (as store_layers)


# -- CRC32C of a concatenation from the CRCs of its parts ----------------------------
# crc(A + B) = crc(A) * x^(8 |B|) mod P  xor  crc(B), in the reflected domain
# (Mark Adler's crc32_combine, with CRC32C's polynomial): a record's CRC is
# taken as its header's and each layer's rows' while they are being copied.
cdef enum:
    CRC32C_POLY = 0x82F63B78

cdef uint32_t _mulmod(uint32_t a, uint32_t b) noexcept nogil:
    cdef uint32_t m = <uint32_t>1 << 31, p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ CRC32C_POLY if b & 1 else b >> 1
    return p


cdef uint32_t _x8n(size_t n) noexcept nogil:
    """x^(8n) mod P."""
    cdef uint32_t p = <uint32_t>1 << 31, sq = <uint32_t>1 << 23   # x^0, x^8 (x^k is bit 31 - k)
    while n:
        if n & 1:
            p = _mulmod(sq, p)
        sq = _mulmod(sq, sq)
        n >>= 1
    return p


cdef inline uint32_t _combine(uint32_t crc_a, uint32_t crc_b, uint32_t shift_b) noexcept nogil:
    """crc(A + B) given crc(A), crc(B) and _x8n(len(B))."""
    return _mulmod(shift_b, crc_a) ^ crc_b


cdef uint32_t _joined(uint32_t head, const uint32_t *parts, Py_ssize_t count, size_t part_bytes) noexcept nogil:
    """The CRC of a header followed by ``count`` parts of ``part_bytes`` each."""
    cdef uint32_t shift = _x8n(part_bytes), crc = head
    cdef Py_ssize_t i
    for i in range(count):
        crc = _combine(crc, parts[i], shift)
    return crc


def crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b):
    """CRC32C of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``."""
    return _combine(crc_a, crc_b, _x8n(len_b))


cdef struct ReadJob:
    # One read_rows call, shared by the pool threads: task l reads layer l.
    Tier *tier
    int kind
    Py_ssize_t start, stop
    Rows dst                           # layer 0's rows
    Py_ssize_t layer_step
    int *status                        # [n_layers]
    kvc_error *errors                  # [n_layers]
    uint32_t *crcs                     # [2 * n_layers]: CRC32C of the rows copied out


cdef void _read_task(void *ctx, size_t l) noexcept nogil:
    cdef ReadJob *j = <ReadJob *>ctx
    cdef Rows dst = j.dst
    dst.k += <Py_ssize_t>l * j.layer_step
    dst.v += <Py_ssize_t>l * j.layer_step
    kvc_error_clear(&j.errors[l])
    j.status[l] = read_layer(j.tier, l, j.kind, j.start, j.stop, dst, &j.errors[l], False)
    if j.status[l] == KVC_OK:  # the rows just written are still in cache
        j.crcs[2 * l] = simd_ops().crc32c(0, dst.k, <size_t>((j.stop - j.start) * j.tier.row_bytes))
        j.crcs[2 * l + 1] = simd_ops().crc32c(0, dst.v, <size_t>((j.stop - j.start) * j.tier.row_bytes))


cdef HotTier _hot_of(cache):
    if cache.closed:
        raise CacheClosedError("this TieredKVCache is closed")
    return cache._hot_tier()


cdef char *_writable(object buf, Py_ssize_t need, list keep) except NULL:
    cdef unsigned char[::1] mv = buf
    if mv.shape[0] < need:
        raise ValueError(f"a record buffer of {mv.shape[0]} bytes, expected at least {need}")
    keep.append(mv)
    return <char *>&mv[0]


cdef const char *_readable(object buf, Py_ssize_t need, list keep) except NULL:
    cdef const unsigned char[::1] mv = buf
    if mv.shape[0] < need:
        raise ValueError(f"a record buffer of {mv.shape[0]} bytes, expected at least {need}")
    keep.append(mv)
    return <const char *>&mv[0]


def read_rows(cache, Py_ssize_t start, Py_ssize_t stop, buf, Py_ssize_t offset):
    """Copy positions ``[start, stop)`` of every layer of ``cache``, in its hot
    dtype, into the writable ``buf`` from ``offset`` (every layer on the pool).
    Returns the CRC32C of ``buf[:offset + rows]`` (the bytes before ``offset``
    and every row written), each layer's rows summed as they are written.

    Raises what ``get`` raises (IndexError past a layer's length,
    CorruptionError for a cold block failing its CRC, CacheClosedError).
    """
    cdef HotTier hot = _hot_of(cache)
    cdef Tier *t = &hot.t
    cdef Py_ssize_t n = stop - start, rb = t.row_bytes
    cdef list keep = []
    cdef char *p = _writable(buf, offset + 2 * t.n_layers * n * rb, keep) + offset
    cdef ReadJob job
    cdef Py_ssize_t l
    cdef uint32_t head = simd_ops().crc32c(0, p - offset, <size_t>offset), crc = 0
    if n <= 0:
        return head
    cdef int status = KVC_OK
    cdef kvc_error rec
    kvc_error_clear(&rec)
    job.status = <int *>calloc(t.n_layers, sizeof(int))
    job.errors = <kvc_error *>calloc(t.n_layers, sizeof(kvc_error))
    job.crcs = <uint32_t *>calloc(2 * t.n_layers, sizeof(uint32_t))
    if job.status == NULL or job.errors == NULL or job.crcs == NULL:
        free(job.status)
        free(job.errors)
        free(job.crcs)
        raise MemoryError()
    job.tier, job.kind, job.start, job.stop = t, t.hot_fmt.kind, start, stop
    job.dst = dense_rows(p, p + n * rb, rb)
    job.layer_step = 2 * n * rb
    with nogil:
        kvc_pool_run(hot.threads if 2 * n * t.n_layers * rb >= PARALLEL_MIN_BYTES else 1,
                     t.n_layers, _read_task, &job)
        for l in range(t.n_layers):
            if job.status[l] != KVC_OK:
                status = job.status[l]
                rec = job.errors[l]
                break
        if status == KVC_OK:
            crc = _joined(head, job.crcs, 2 * t.n_layers, <size_t>(n * rb))
    free(job.status)
    free(job.errors)
    free(job.crcs)
    if status != KVC_OK:
        raise_error(&rec, "get", cache._path_of, t.block_tokens, start)
    return crc


cdef struct RecordCheck:
    # What append_rows' AppendCheck verifies for one record.
    uint32_t head          # CRC32C of the record's header
    uint32_t expect        # the record's stored CRC32C
    Py_ssize_t parts       # 2 * n_layers
    size_t part_bytes      # one layer's keys (or values): block_tokens rows


cdef bint _record_ok(void *ctx, const uint32_t *crcs) noexcept nogil:
    cdef RecordCheck *r = <RecordCheck *>ctx
    return _joined(r.head, crcs, r.parts, r.part_bytes) == r.expect


def append_rows(cache, list records, Py_ssize_t offset, Py_ssize_t block_tokens, Py_ssize_t last,
                list expect=None, scratch=None):
    """Append each record's ``block_tokens`` rows (the last record's first
    ``last``) to every layer of ``cache``, in order, through store_layers' path.

    A record is a buffer holding all of it, or ``(header, fd)``: its first
    ``offset`` bytes and a file descriptor of the whole record, whose rows
    each layer reads into ``scratch`` (writable, ``2 * n_layers *
    block_tokens * row_bytes`` bytes) just before summing and copying them;
    ``(header, fd)`` needs ``expect``.

    ``expect``: each record's stored CRC32C, checked over its first
    ``offset`` bytes and all its rows as they are copied (each layer reads
    its rows once, summing them just before the copy); a record that does
    not match (or whose file reads short) is undone before any lock is
    released (nothing of it was ever visible) and ends the load.  Returns how
    many records were appended.  Any other failure raises the store's
    exception, the records before it stay appended (the caller rolls back).
    """
    cdef HotTier hot = _hot_of(cache)
    cdef Tier *t = &hot.t
    cdef Py_ssize_t i, n, rb = t.row_bytes, count = len(records)
    cdef Py_ssize_t step = 2 * block_tokens * rb
    cdef list keep = []
    cdef const char **ptrs = <const char **>calloc(count + 1, sizeof(char *))
    cdef int *fds = <int *>calloc(count + 1, sizeof(int))
    cdef RecordCheck *checks = <RecordCheck *>calloc(count + 1, sizeof(RecordCheck))
    cdef uint32_t *crcs = <uint32_t *>calloc(2 * t.n_layers, sizeof(uint32_t))
    cdef char *scratch_p = NULL
    cdef const char *head
    cdef AppendCheck check
    cdef int status = KVC_OK
    cdef kvc_error rec
    cdef bint verify = expect is not None
    try:
        if ptrs == NULL or fds == NULL or checks == NULL or crcs == NULL:
            raise MemoryError()
        if verify and len(expect) != count:
            raise ValueError(f"append_rows: {count} records but {len(expect)} checksums")
        for i in range(count):
            r = records[i]
            if isinstance(r, tuple):
                if not verify or scratch is None:
                    raise ValueError("append_rows: a record read from a file needs expect= and scratch=")
                head = _readable(r[0], offset, keep)
                fds[i] = r[1]
                ptrs[i] = NULL
            else:
                head = _readable(r, offset + t.n_layers * step, keep)
                fds[i] = -1
                ptrs[i] = head + offset
            if verify:
                checks[i].head = simd_ops().crc32c(0, head, <size_t>offset)
                checks[i].expect = expect[i]
                checks[i].parts = 2 * t.n_layers
                checks[i].part_bytes = block_tokens * rb
        if scratch is not None:
            scratch_p = _writable(scratch, t.n_layers * step, keep)
        check.rows, check.crcs, check.verify = block_tokens, crcs, _record_ok
        check.file_offset, check.scratch = offset, scratch_p
        kvc_error_clear(&rec)
        with nogil:
            for i in range(count):
                n = last if i == count - 1 else block_tokens
                check.ctx = &checks[i]
                check.fd = fds[i]
                head = ptrs[i] if ptrs[i] != NULL else scratch_p  # a file record's rows land in scratch
                status = hot.append_all(t.hot_fmt.kind, n,
                                        dense_rows(<char *>head, <char *>head + block_tokens * rb, rb),
                                        step, step, &rec, &check if verify else NULL)
                if status != KVC_OK:
                    break
    finally:
        free(ptrs)
        free(fds)
        free(checks)
        free(crcs)
    if status == KVC_E_CORRUPT and verify and rec.layer < 0:
        return i
    if status != KVC_OK:
        raise_error(&rec, "store", cache._path_of, t.block_tokens, -1)
    return count
