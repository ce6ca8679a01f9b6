"""The cold tier's files of a live cache: its directory, open files and mappings.

Owns: preparing and locking the cold directory (one live cache per
directory), creating or opening each layer's keys and values files (their
headers come from kvcache._format), mapping them read-only, ``pwrite`` of
rows (a full disk is an error, never a SIGBUS), fsync, and removing scratch
files on close.  Fixed offsets (``row_offset``) mean no allocator and no
free-space search: a block is written where its positions live.
Must not touch: the layout of the bytes (kvcache._format owns it), the block
table, checksums or locks (the engine's).
"""
import errno as _errno
import fcntl
import os
import shutil
import tempfile
import weakref

from libc.errno cimport errno, EINTR, EIO
from posix.unistd cimport pwrite

from kvcache._arena cimport ColdMap
from kvcache._format cimport HEADER_BYTES, row_offset
from kvcache._format import INDEX_NAME, check_header, file_name, file_names, header, write_index
from kvcache.errors import CacheClosedError, ColdStoreError, CorruptionError

cdef extern from *:
    """
    #include <pthread.h>
    /* Test hook: cold writes of one thread fail with an errno, so that a test
     * can fail one thread's writes and not another's.  A global naming the
     * thread, not a _Thread_local: LeakSanitizer's exit scan crashes on the
     * dynamic TLS of a dlopen'ed module. */
    static int kvc_inject_errno = 0;
    static pthread_t kvc_inject_thread;
    static void kvc_inject_set(int err) { kvc_inject_thread = pthread_self(); kvc_inject_errno = err; }
    static int kvc_inject_get(void)
    {
        return kvc_inject_errno && pthread_equal(pthread_self(), kvc_inject_thread) ? kvc_inject_errno : 0;
    }
    """
    void kvc_inject_set(int err) nogil
    int kvc_inject_get() noexcept nogil


def _fail_writes(int err):
    """Test hook: make this thread's cold writes fail with errno ``err`` (0 stops it;
    one thread at a time)."""
    kvc_inject_set(err)


cdef int write_all(int fd, const char *src, size_t n, size_t offset) noexcept nogil:
    """pwrite ``n`` bytes at ``offset``, resuming partial writes: 0 or an errno."""
    cdef ssize_t w
    cdef int injected = kvc_inject_get()
    if injected != 0:
        return injected
    while n > 0:
        w = pwrite(fd, src, n, offset)
        if w < 0:
            if errno == EINTR:
                continue
            return errno
        if w == 0:
            return EIO
        src += w
        n -= w
        offset += w
    return 0


cdef ColdFiles layer_files(object store, Py_ssize_t layer):
    """The native handles of one layer's files in ``store`` (a ColdStore)."""
    cdef ColdFiles f
    f.fd_k = store.fds[2 * layer]
    f.fd_v = store.fds[2 * layer + 1]
    f.map_k = (<ColdMap>store.maps[2 * layer]).addr
    f.map_v = (<ColdMap>store.maps[2 * layer + 1]).addr
    return f


def _release(fds, lock, path, created_dir, names):
    """Close a store's files; remove the scratch ones (and a private directory);
    then let go of the directory's lock."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    if created_dir:
        shutil.rmtree(path, ignore_errors=True)
    else:
        for name in names:
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass
    for fd in lock:
        os.close(fd)
    lock.clear()


def _lock_dir(path):
    """An fd of ``path`` holding an exclusive flock: one live cache per directory.

    The lock is on the directory, never on a file that gets mapped, so views
    that outlive close() do not keep it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ColdStoreError(exc.errno, f"cannot open cold_dir: {exc.strerror}", path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN):
            raise ColdStoreError(_errno.EBUSY, "cold_dir is in use by another open cache (in this "
                                 "process or another); close that one first", path) from None
        if exc.errno in (_errno.ENOLCK, _errno.EOPNOTSUPP, _errno.ENOSYS):
            return None  # a file system without flock: no protection, no failure
        raise ColdStoreError(exc.errno, f"cannot lock cold_dir: {exc.strerror}", path) from exc
    return fd


class ColdStore:
    """The files of one cache's cold tier.

    Parameters
    ----------
    config : CacheConfig
    existing : bool
        Open the files of a persisted cache instead of creating new ones.
    """

    def __init__(self, config, existing=False):
        self.config = config
        self.row_bytes = config.cold_row_bytes
        self.map_bytes = row_offset(config.n_blocks * config.block_tokens, self.row_bytes)
        self.fds = []
        self.maps = []
        self._lock = []
        created_dir = False
        if config.cold_dir is None:
            self.path = tempfile.mkdtemp(prefix="kvcache-")  # 0700
            created_dir = True
        else:
            self.path = os.path.abspath(config.cold_dir)  # a later chdir must not move it
            if not existing:
                created_dir = self._prepare_dir()
        # Before the finalizer: a store refused here must not remove another's files.
        lock = _lock_dir(self.path)
        if lock is not None:
            self._lock.append(lock)
        names = file_names(config.n_layers)
        # Files are closed, and scratch files removed, when the store goes, however
        # it goes (close, garbage collection, interpreter exit).
        self._finalizer = weakref.finalize(self, _release, self.fds, self._lock, self.path,
                                           created_dir and not config.persist,
                                           [] if config.persist else names)
        try:
            for l in range(config.n_layers):
                for kind in range(2):
                    self.fds.append(self._open_file(l, kind, existing))
            self.maps = [ColdMap(fd, self.map_bytes) for fd in self.fds]
        except BaseException:
            self.close()
            raise

    def _prepare_dir(self):
        path = self.path
        try:
            if os.path.isdir(path):
                if os.listdir(path):
                    if os.path.exists(os.path.join(path, INDEX_NAME)):
                        raise FileExistsError(
                            _errno.EEXIST, "cold_dir holds a persisted cache; reopen it with "
                            "TieredKVCache.open(cold_dir), or choose an empty directory", path)
                    raise FileExistsError(_errno.EEXIST, "cold_dir is not empty; a cache needs a "
                                          "directory of its own", path)
                os.chmod(path, 0o700)
                return False
            if os.path.exists(path):
                raise NotADirectoryError(_errno.ENOTDIR, "cold_dir is not a directory", path)
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)  # makedirs' mode is filtered by the umask
            return True
        except (FileExistsError, NotADirectoryError):
            raise
        except OSError as exc:
            raise ColdStoreError(exc.errno, f"cannot use cold_dir: {exc.strerror}", path) from exc

    def _open_file(self, layer, kind, existing):
        path = os.path.join(self.path, file_name(layer, kind))
        try:
            if existing:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ColdStoreError(exc.errno, f"cannot open a cold file: {exc.strerror}", path) from exc
        try:
            if existing:
                check_header(path, os.pread(fd, HEADER_BYTES, 0), self.config, kind, layer)
            else:
                os.pwrite(fd, header(self.config, kind, layer), 0)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, CorruptionError):
                raise
            raise ColdStoreError(exc.errno, f"cannot write a cold file header: {exc.strerror}",
                                 path) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def file_sizes(self, layer):
        return [os.fstat(self.fds[2 * layer + kind]).st_size for kind in range(2)]

    def path_of(self, layer, kind):
        return os.path.join(self.path, file_name(layer, kind))

    def view(self, layer, kind, start, stop):
        """A read-only uint8 ``[stop - start, row_bytes]`` array over rows of one file.

        Raises CacheClosedError once the store is closed (a ``get(copy=False)``
        racing with ``close()``)."""
        import numpy as np
        maps = self.maps
        if not maps:
            raise CacheClosedError("this TieredKVCache is closed")
        return np.frombuffer(maps[2 * layer + kind], dtype=np.uint8,
                             count=(stop - start) * self.row_bytes,
                             offset=row_offset(start, self.row_bytes)
                             ).reshape(stop - start, self.row_bytes)

    def fsync(self):
        for fd, name in zip(self.fds, file_names(self.config.n_layers)):
            try:
                os.fsync(fd)
            except OSError as exc:
                raise ColdStoreError(exc.errno, f"cannot sync a cold file: {exc.strerror}",
                                     os.path.join(self.path, name)) from exc

    def write_index(self, layers):
        """Atomically replace the index: ``layers`` is a list of dicts per layer."""
        write_index(self.path, self.config, layers)

    def close(self):
        """Close the files; scratch files (and a private directory) are removed."""
        self.maps = []  # views handed out keep their mapping alive
        self._finalizer()
