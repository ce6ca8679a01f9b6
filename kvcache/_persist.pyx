"""The persisted index of a live cache: restoring from it at open, replacing it at flush and close.

Owns: which per-layer lengths the directory's index makes durable, the bytes
it last wrote (an index that would not change is not written again), the
restore of each layer's block table from a reopened index, and the order of a
flush (write back every layer, fsync the files, then replace the index) or of
close's seal (each layer written back and closed under its lock).
Must not touch: the index's layout (kvcache._format builds and checks it),
files (kvcache._cold), blocks (kvcache._hot).  Callers serialise
``write`` (TieredKVCache's index lock).
"""
import os

from kvcache._ckvc cimport KVC_OK, KVC_E_CLOSED, kvc_error, kvc_error_clear
from kvcache._format import INDEX_NAME, check_size, index_bytes, index_entry
from kvcache._status cimport check_status, raise_error


cdef class Persisted:
    """The persisted index of one cache.

    Parameters
    ----------
    config : CacheConfig
    hot : HotTier
    """

    def __init__(self, config, HotTier hot):
        self.config = config
        self.hot = hot
        self.durable = [0] * config.n_layers
        self.written = None

    cdef int restore(self, object cold, dict index) except -1:
        """Rebuild every layer from a reopened ``index`` (checked by read_index)
        whose files ``cold`` (a ColdStore attached to the hot tier) holds."""
        cdef kvc_error rec
        row_bytes = self.config.cold_row_bytes
        for l, entry in enumerate(index["layers"]):
            length = entry["length"]
            for kind, size in enumerate(cold.file_sizes(l)):
                check_size(cold.path_of(l, kind), size, length, row_bytes)
            kvc_error_clear(&rec)
            if self.hot.restore(l, length, entry["rows"], entry["crc_k"], entry["crc_v"], &rec) != KVC_OK:
                raise_error(&rec, "open", cold.path_of, self.config.block_tokens)
            self.durable[l] = length
        with open(os.path.join(cold.path, INDEX_NAME), "rb") as f:  # the directory is locked
            self.written = f.read()
        return 0

    cdef int write(self, object cold, bint seal) except -1:
        """flush(), or with ``seal`` close()'s last flush: each layer is written
        back (and with ``seal`` closed under its lock, so a store either lands
        before it and is kept, or raises CacheClosedError), the files fsync'd,
        then the index replaced, only if its bytes would change: closing a
        reopened cache that stored nothing writes nothing."""
        cdef Py_ssize_t l, length
        cdef int status
        cdef kvc_error rec, failed
        op = "close" if seal else "flush"
        kvc_error_clear(&failed)
        layers = []
        for l in range(self.config.n_layers):
            kvc_error_clear(&rec)
            if seal:
                table = self.hot.seal(l, &rec)
                if table is None:  # closed by someone else
                    raise_error(&rec, op, cold.path_of, self.config.block_tokens)
                if rec.code != KVC_OK and failed.code == KVC_OK:
                    failed = rec  # keep what is on disk; raise at the end
            else:
                with nogil:
                    length = self.hot.length(l)
                if length < 0:
                    check_status(KVC_E_CLOSED)
                with nogil:
                    status = self.hot.write_back_range(l, 0, length, False, &rec)
                if status != KVC_OK:
                    raise_error(&rec, op, cold.path_of, self.config.block_tokens)
                table = self.hot.block_table(l)
            layers.append(index_entry(table[0], table[1], self.config.block_tokens))
        data = index_bytes(self.config, layers)
        if data != self.written:
            cold.fsync()
            cold.write_index(layers)
            self.written = data
        self.durable = [entry["length"] for entry in layers]
        return raise_error(&failed, op, cold.path_of, self.config.block_tokens)

    cdef bint covers(self, Py_ssize_t n):
        """Whether the index records more than ``n`` positions of some layer (a
        truncate to ``n`` must then flush: stores will overwrite those rows)."""
        return n < max(self.durable)
