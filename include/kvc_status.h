/* kvc_status.h - status codes returned by native code; kvcache/_status.pyx
 * turns them into exceptions (the one error translator). */
#ifndef KVC_STATUS_H
#define KVC_STATUS_H

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

#endif /* KVC_STATUS_H */
