# The engine's shared state, declared once: kvcache._hot (the hot tier) and
# kvcache._moves (the moves between the tiers) both work on these structs.
# Declarations only; no module of its own.
from libc.stdint cimport int32_t, uint64_t
from kvcache._ckvc cimport kvc_lock, kvc_stats, kvc_simd_ops
from kvcache._codec cimport RowFmt, Rows, dense_rows
from kvcache._format cimport row_offset
from kvcache._cold cimport ColdFiles
from kvcache._policy cimport Block, Policy

cdef struct HotLayer:
    char *keys          # [n_slots * block_tokens, row], 64-byte aligned; NULL once closed
    char *values
    Py_ssize_t index    # which layer this is (for error records)
    Py_ssize_t length   # positions stored; all fields below `lock` are guarded by it
    kvc_lock lock
    Block *blocks       # [n_blocks]: where each block lives
    int32_t *owner      # [n_slots]: block held by each hot slot, or -1
    float *scores       # h2o: attention mass per position [n_blocks * block_tokens], else NULL
    uint64_t tick       # one per store or get call on this layer (recency clock)
    ColdFiles cold


cdef struct Tier:
    # Everything the GIL-free store and read paths need, shared by pool threads.
    HotLayer *layers
    kvc_stats *stats
    kvc_simd_ops *ops
    Policy policy
    RowFmt hot_fmt, cold_fmt
    Py_ssize_t n_layers, row_bytes   # row_bytes: hot_fmt.row_bytes
    Py_ssize_t block_tokens, n_blocks, n_slots, capacity, max_len
    bint tiered, persist
    uint64_t cold_limit     # max_cold_bytes, or UINT64_MAX


cdef inline Py_ssize_t clamp_rows(Py_ssize_t rows, Py_ssize_t block) noexcept nogil:
    return 0 if rows < 0 else (block if rows > block else rows)


cdef inline Rows slot_rows(Tier *t, HotLayer *L, Py_ssize_t slot, Py_ssize_t row) noexcept nogil:
    """Row ``row`` of hot slot ``slot``, keys and values."""
    cdef Py_ssize_t at = (slot * t.block_tokens + row) * t.row_bytes
    return dense_rows(L.keys + at, L.values + at, t.row_bytes)


cdef inline Rows cold_rows(Tier *t, HotLayer *L, Py_ssize_t pos) noexcept nogil:
    """Position ``pos`` in the cold mappings, keys and values."""
    cdef size_t at = row_offset(pos, t.cold_fmt.row_bytes)
    return dense_rows(<char *>L.cold.map_k + at, <char *>L.cold.map_v + at, t.cold_fmt.row_bytes)
