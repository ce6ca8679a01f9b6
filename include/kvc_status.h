/* kvc_status.h - status codes returned by native code, and the error record
 * that says what failed.
 *
 * A failing native call fills a kvc_error where the failure happens (under
 * the lock that guards what it describes), and every caller up the chain just
 * returns its code.  kvcache/_status.pyx turns the record into an exception
 * (the one error translator); nothing reads engine state after a failure. */
#ifndef KVC_STATUS_H
#define KVC_STATUS_H

#include <stdint.h>

enum kvc_status {
    KVC_OK = 0,
    KVC_E_NOMEM = 1,   /* MemoryError */
    KVC_E_FULL = 2,    /* CacheFullError: no room for the tokens */
    KVC_E_CLOSED = 3,  /* CacheClosedError: used after close() */
    KVC_E_RANGE = 4,   /* IndexError: positions outside what is stored */
    KVC_E_INVALID = 5, /* ValueError */
    KVC_E_IO = 6,      /* ColdStoreError (an OSError): a cold file could not be written or read */
    KVC_E_CORRUPT = 7, /* CorruptionError: a cold block failed its checksum */
};

/* Which limit a KVC_E_FULL met. */
enum kvc_limit {
    KVC_LIMIT_NONE = 0,
    KVC_LIMIT_SEQ_LEN = 1,    /* max_seq_len positions per layer */
    KVC_LIMIT_COLD_BYTES = 2, /* max_cold_bytes over every layer */
    KVC_LIMIT_SLOTS = 3,      /* every hot slot is pinned */
};

typedef struct kvc_error {
    int code;        /* a kvc_status; KVC_OK while nothing failed */
    int err;         /* errno of the failed system call, or 0 */
    int limit_kind;  /* KVC_E_FULL: a kvc_limit */
    int file_kind;   /* 0 keys, 1 values: the file an I/O or checksum failure is about; -1 none */
    int64_t layer;   /* the layer it happened in, or -1 */
    int64_t block;   /* the block, or -1 */
    int64_t held;    /* KVC_E_FULL: positions (or cold bytes) held; KVC_E_RANGE: the layer's length */
    int64_t asked;   /* KVC_E_FULL: positions (or cold bytes) asked for; KVC_E_RANGE: the end asked for */
    uint64_t limit;  /* KVC_E_FULL: the limit's value */
} kvc_error;

static inline void kvc_error_clear(kvc_error *e)
{
    e->code = KVC_OK;
    e->err = 0;
    e->limit_kind = KVC_LIMIT_NONE;
    e->file_kind = -1;
    e->layer = e->block = -1;
    e->held = e->asked = 0;
    e->limit = 0;
}

/* Record a failure and return its code.  The first failure of a call wins:
 * callers further up that see the code do not overwrite what happened. */
static inline int kvc_fail(kvc_error *e, int code, int64_t layer, int64_t block)
{
    if (e->code == KVC_OK) {
        e->code = code;
        e->layer = layer;
        e->block = block;
    }
    return code;
}

/* An I/O failure: the errno and the file (0 keys, 1 values). */
static inline int kvc_fail_io(kvc_error *e, int err, int64_t layer, int64_t block, int file_kind)
{
    if (e->code == KVC_OK) {
        kvc_fail(e, KVC_E_IO, layer, block);
        e->err = err;
        e->file_kind = file_kind;
    }
    return KVC_E_IO;
}

/* A limit met: what was held, what was asked, the limit. */
static inline int kvc_fail_full(kvc_error *e, int limit_kind, int64_t layer, int64_t held,
                                int64_t asked, uint64_t limit)
{
    if (e->code == KVC_OK) {
        kvc_fail(e, KVC_E_FULL, layer, -1);
        e->limit_kind = limit_kind;
        e->held = held;
        e->asked = asked;
        e->limit = limit;
    }
    return KVC_E_FULL;
}

#endif /* KVC_STATUS_H */
