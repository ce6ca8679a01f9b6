from libc.stdint cimport int32_t, uint32_t, uint64_t

cdef enum:
    POLICY_LRU = 0
    POLICY_ADAPTIVE = 1
    POLICY_H2O = 2

cdef struct Block:
    # One block of block_tokens positions of one layer, wherever it lives.
    int32_t slot        # hot slot holding it, or -1 (cold or empty)
    int32_t disk_rows   # its first disk_rows rows are in the cold files
    uint32_t crc_k      # CRC32C of those rows, keys and values
    uint32_t crc_v
    int32_t verified    # 1 once the disk rows were checked since last written
    uint32_t hits       # get() calls that read it
    uint64_t last_use   # layer tick of the last store or get touching it
    double mass         # attention mass of its positions (update_scores)

cdef struct Policy:
    int kind
    bint promote             # promote_on_read, for a policy that promotes
    Py_ssize_t block_tokens
    Py_ssize_t sink_blocks   # blocks 0..sink_blocks-1 never leave RAM
    Py_ssize_t recent        # h2o: positions at the end that never leave RAM
    double w_recency, w_frequency

cdef double block_score(const Policy *p, const Block *b) noexcept nogil
cdef Py_ssize_t choose_slot(const Policy *p, const Block *blocks, const int32_t *owner,
                            Py_ssize_t n_slots, Py_ssize_t cursor, Py_ssize_t keep) noexcept nogil
cdef bint read_promotes(const Policy *p, Py_ssize_t cold_blocks, Py_ssize_t n_slots) noexcept nogil
cdef bint promotes(const Policy *p, const Block *blocks, const int32_t *owner, Py_ssize_t n_slots,
                   Py_ssize_t cursor, Py_ssize_t b) noexcept nogil
