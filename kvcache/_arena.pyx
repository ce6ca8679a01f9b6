"""Buffer objects over kvcache's memory: RAM arenas and cold-file mappings.

Owns: allocating and freeing the aligned RAM arenas (include/kvc_alloc.h),
mapping and unmapping cold files, and exporting both through the buffer
protocol.  An arena or mapping is freed with its last reference (the hot
tier's, the cold tier's, or a view handed out by ``get(copy=False)``), so a
view never dangles, even after the cache is closed.
Must not touch: what the bytes mean (rows, blocks, formats) or any lock.
"""
import os

from cpython.buffer cimport PyBUF_WRITABLE
from libc.errno cimport errno
from posix.mman cimport mmap, munmap, PROT_READ, MAP_SHARED, MAP_FAILED

from kvcache._ckvc cimport kvc_alloc, kvc_free, kvc_alloc_live_bytes, kvc_alloc_live_blocks
from kvcache.errors import ColdStoreError


def allocator_live():
    """(bytes, blocks) held by kvcache's aligned allocator in this process."""
    return kvc_alloc_live_bytes(), kvc_alloc_live_blocks()


cdef void export_bytes(Py_buffer *view, object owner, char *ptr, Py_ssize_t nbytes, bint readonly):
    """Fill a buffer request with ``nbytes`` bytes at ``ptr``, owned by ``owner``."""
    view.buf = ptr
    view.obj = owner
    view.len = nbytes
    view.readonly = readonly
    view.itemsize = 1
    view.format = "B"
    view.ndim = 1
    view.shape = &view.len
    view.strides = &view.itemsize
    view.suboffsets = NULL
    view.internal = NULL


cdef class Arena:
    """One RAM arena (a layer's keys or values), ARENA_ALIGN-aligned and zeroed."""

    def __cinit__(self, Py_ssize_t nbytes):
        self.ptr = <char *>kvc_alloc(nbytes, ARENA_ALIGN)
        if self.ptr == NULL:
            raise MemoryError(f"cannot allocate an arena of {nbytes} bytes")
        self.nbytes = nbytes

    def __dealloc__(self):
        kvc_free(self.ptr)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("the cache's arenas are read-only to callers")
        export_bytes(view, self, self.ptr, self.nbytes, True)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef class WritableArena:
    """A writable export of an Arena, for integrations whose tensor libraries
    insist on writable memory (torch): they must not write through it."""

    def __cinit__(self, Arena arena):
        self.arena = arena

    def __getbuffer__(self, Py_buffer *view, int flags):
        export_bytes(view, self, self.arena.ptr, self.arena.nbytes, False)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef class ColdMap:
    """A read-only shared mapping of one cold file; exports it as a buffer."""

    def __cinit__(self, int fd, Py_ssize_t length):
        cdef void *p = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise ColdStoreError(errno, f"cannot map a cold file: {os.strerror(errno)}")
        self.addr = <char *>p
        self.length = length

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.length)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("cold tier views are read-only")
        export_bytes(view, self, self.addr, self.length, True)

    def __releasebuffer__(self, Py_buffer *view):
        pass
