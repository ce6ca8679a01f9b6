"""Whole blocks of every layer between a cache and prefix records, on the thread pool.

Owns: copying positions of every layer of a TieredKVCache out into a
record's rows in the cache's hot dtype (``read_rows``; cold blocks converted
by the engine's read), appending records' rows to a cache (``append_rows``,
through the engine's store path), and the CRC32C of many buffers at once
(``crc32c_many``).  A record's rows are, for each layer, ``B`` key rows then
``B`` value rows, ``row_bytes`` apart (docs/format.md, "Prefix records").
Must not touch: record headers, checksums' meaning or tiers of the store
(kvcache.prefix.record / store); slots, blocks and files (the engine's).
"""
from libc.stdint cimport uint32_t
from libc.stdlib cimport calloc, free

from kvcache._ckvc cimport KVC_OK, KVC_E_NOMEM, kvc_error, kvc_error_clear, kvc_fail, kvc_pool_run
from kvcache._codec cimport Rows, dense_rows
from kvcache._hot cimport HotTier, read_layer
from kvcache._simd cimport simd_ops
from kvcache._status cimport raise_error
from kvcache._tier cimport Tier
from kvcache.errors import CacheClosedError

cdef enum:
    PARALLEL_MIN_BYTES = 1 << 20   # below this one thread copies (as store_layers)


cdef struct ReadJob:
    # One read_rows call, shared by the pool threads: task l reads layer l.
    Tier *tier
    int kind
    Py_ssize_t start, stop
    Rows dst                           # layer 0's rows
    Py_ssize_t layer_step
    int *status                        # [n_layers]
    kvc_error *errors                  # [n_layers]


cdef void _read_task(void *ctx, size_t l) noexcept nogil:
    cdef ReadJob *j = <ReadJob *>ctx
    cdef Rows dst = j.dst
    dst.k += <Py_ssize_t>l * j.layer_step
    dst.v += <Py_ssize_t>l * j.layer_step
    kvc_error_clear(&j.errors[l])
    j.status[l] = read_layer(j.tier, l, j.kind, j.start, j.stop, dst, &j.errors[l])


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
    if n <= 0:
        return
    cdef int status = KVC_OK
    cdef kvc_error rec
    kvc_error_clear(&rec)
    job.status = <int *>calloc(t.n_layers, sizeof(int))
    job.errors = <kvc_error *>calloc(t.n_layers, sizeof(kvc_error))
    if job.status == NULL or job.errors == NULL:
        free(job.status)
        free(job.errors)
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
    free(job.status)
    free(job.errors)
    if status != KVC_OK:
        raise_error(&rec, "get", cache._path_of, t.block_tokens, start)


def append_rows(cache, list bufs, Py_ssize_t offset, Py_ssize_t block_tokens, Py_ssize_t last):
    """Append each record's ``block_tokens`` rows (the last record's first
    ``last``) to every layer of ``cache``, in order, through store_layers' path.

    On failure the records before the failing one stay stored (the caller
    rolls back) and the store's exception is raised.
    """
    cdef HotTier hot = _hot_of(cache)
    cdef Tier *t = &hot.t
    cdef Py_ssize_t i, n, rb = t.row_bytes, count = len(bufs)
    cdef Py_ssize_t step = 2 * block_tokens * rb
    cdef list keep = []
    cdef const char **ptrs = <const char **>calloc(count + 1, sizeof(char *))
    cdef int status = KVC_OK
    cdef kvc_error rec
    if ptrs == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            ptrs[i] = _readable(bufs[i], offset + t.n_layers * step, keep) + offset
        kvc_error_clear(&rec)
        with nogil:
            for i in range(count):
                n = last if i == count - 1 else block_tokens
                status = hot.append_all(t.hot_fmt.kind, n,
                                        dense_rows(<char *>ptrs[i], <char *>ptrs[i] + block_tokens * rb, rb),
                                        step, step, &rec)
                if status != KVC_OK:
                    break
    finally:
        free(ptrs)
    if status != KVC_OK:
        raise_error(&rec, "store", cache._path_of, t.block_tokens, -1)


cdef struct CrcJob:
    const char **ptrs
    Py_ssize_t *lengths
    uint32_t *out


cdef void _crc_task(void *ctx, size_t i) noexcept nogil:
    cdef CrcJob *j = <CrcJob *>ctx
    j.out[i] = simd_ops().crc32c(0, j.ptrs[i], <size_t>j.lengths[i])


def crc32c_many(list bufs, list lengths, int threads=1):
    """CRC32C of ``bufs[i][:lengths[i]]`` for every i, on up to ``threads`` threads."""
    cdef Py_ssize_t i, count = len(bufs)
    cdef list keep = []
    cdef CrcJob job
    if len(lengths) != count:
        raise ValueError(f"crc32c_many: {count} buffers but {len(lengths)} lengths")
    job.ptrs = <const char **>calloc(count + 1, sizeof(char *))
    job.lengths = <Py_ssize_t *>calloc(count + 1, sizeof(Py_ssize_t))
    job.out = <uint32_t *>calloc(count + 1, sizeof(uint32_t))
    try:
        if job.ptrs == NULL or job.lengths == NULL or job.out == NULL:
            raise MemoryError()
        for i in range(count):
            job.lengths[i] = lengths[i]
            if job.lengths[i] < 0:
                raise ValueError(f"crc32c_many: a negative length {lengths[i]}")
            job.ptrs[i] = _readable(bufs[i], job.lengths[i], keep) if job.lengths[i] else NULL
        with nogil:
            kvc_pool_run(threads if count > 1 else 1, count, _crc_task, &job)
        return [job.out[i] for i in range(count)]
    finally:
        free(job.ptrs)
        free(job.lengths)
        free(job.out)
