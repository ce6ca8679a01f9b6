from libc.stdint cimport uint32_t, uint64_t
from kvcache._ckvc cimport kvc_error
from kvcache._codec cimport RowFmt, Rows
from kvcache._tier cimport HotLayer, Tier

ctypedef bint (*append_verify_fn)(void *ctx, const uint32_t *crcs) noexcept nogil

cdef struct AppendCheck:
    # Optional checksums of an append_all (a prefix load): each layer's task takes
    # the CRC32C of its source keys and values (``rows`` dense rows each, at least
    # the rows stored), each chunk just before copying it, into crcs[2l] and crcs[2l + 1];
    # then, with every lock still held, ``verify`` accepts them, or the whole
    # append is undone and fails with KVC_E_CORRUPT (nothing was ever visible).
    # With ``fd >= 0`` the source rows are first read from that file (a disk
    # record): layer l's keys and values (2 * rows rows, contiguous) from
    # ``file_offset + l * 2 * rows * row_bytes`` into ``scratch`` at
    # ``l * 2 * rows * row_bytes``, a private copy that is then summed and copied
    # (a short or failed read fails the append as KVC_E_CORRUPT, layer -1).
    Py_ssize_t rows
    uint32_t *crcs                     # [2 * n_layers]
    append_verify_fn verify
    void *ctx
    int fd
    Py_ssize_t file_offset
    char *scratch

cdef struct AppendJob:
    # One store_layers call, shared by the pool threads: task l stores layer l.
    Tier *tier
    const RowFmt *fmt
    Py_ssize_t n
    Rows src                           # layer 0's rows
    Py_ssize_t k_layer_step, v_layer_step
    int *status                        # [n_layers]
    kvc_error *errors                  # [n_layers]: each task's own record
    AppendCheck *check                 # NULL, or the checksums to take and verify

cdef void cut(Tier *t, HotLayer *L, Py_ssize_t n, Py_ssize_t extent) noexcept nogil
cdef int check_room(Tier *t, HotLayer *L, Py_ssize_t n, uint64_t *need, kvc_error *e) noexcept nogil
cdef int cold_fits(Tier *t, uint64_t need, Py_ssize_t layer, kvc_error *e) noexcept nogil
cdef void close_layer(HotLayer *L) noexcept nogil
cdef int append_locked(Tier *t, HotLayer *L, const RowFmt *fmt, Py_ssize_t n, Rows src,
                       kvc_error *e) noexcept nogil
cdef bint moves_blocks(Tier *t, Py_ssize_t n) noexcept nogil
cdef void append_task(void *ctx, size_t l) noexcept nogil
cdef int read_locked(Tier *t, HotLayer *L, const RowFmt *out, Py_ssize_t start, Py_ssize_t stop,
                     Rows dst, kvc_error *e, Py_ssize_t *hot, Py_ssize_t *cold,
                     bint may_promote=*) noexcept nogil
