"""The prefix store's disk tier: one file per record under a directory that
several processes may share.

Owns: the directory (created, or an empty one taken over, 0700, marked by a
``KVCACHE-PREFIX`` file, a foreign non-empty directory refused), record
files (``<hex key>.kvp``, 0600: written to a temporary name, fsync'd,
renamed, the directory fsync'd, so a file cut short by a crash is never
under a record's name), their LRU order and the ``disk_bytes`` budget.
Must not touch: record contents (kvcache.prefix.record checks them; this
module only moves bytes) or the RAM tier.

There is no index: the directory is the state, so a new process finds every
record and a crash loses at most the record being written (its temporary
file, removed by the next store to open the directory once its process is
gone).

LRU order: a record file's mtime, shared by every process.  It is set
explicitly from ``time.time_ns()`` when the file is renamed in and on every
hit (the kernel's own timestamps are coarse, one tick of several ms, and
would tie most records written in a burst).  The store stamps the blocks of
one save or load so that a block is more recent than the blocks after it in
its chain: eviction takes a chain's tail before its head, whose loss would
make the rest unreachable.

How the budget is kept, exactly: every change to the set of record files
happens under an exclusive ``flock`` on ``.lock`` (every process and thread
opens it anew, so they exclude each other).  A writer takes it, scans the
records, unlinks the least recently used until the new one fits, renames
its temporary file in and releases it; a removal (a record failing its
checks) compares the file's identity and unlinks under it too.  So the sum
of the sizes of the files under a record's name (``*.kvp``), over every
process sharing the directory, never exceeds ``disk_bytes`` at any moment,
provided they all use the same ``disk_bytes`` (a directory left above a
store's budget by one with a larger budget comes back under it at that
store's next write; opening a store removes no record).  Temporary files are
outside the bound: each writing thread holds at most one record-sized
``.tmp-*`` file, written before it takes the lock.  A record larger than
the budget is not written.

Readers do not lock: they open the file, and an eviction meanwhile unlinks a
name, not the open file, which they still read whole.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat
import threading
import time
from typing import List, Optional, Tuple

from kvcache.prefix.record import new_buffer

MARKER = "KVCACHE-PREFIX"
MARKER_TEXT = b"kvcache prefix store, records v1\n"
SUFFIX = ".kvp"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
MARKER_TEMP = MARKER + ".tmp"
_counter = itertools.count()


def record_name(key: bytes) -> str:
    return key.hex() + SUFFIX


def is_record_name(name: str) -> bool:
    stem = name[:-len(SUFFIX)]
    return (name.endswith(SUFFIX) and len(stem) == 64
            and all(c in "0123456789abcdef" for c in stem))


def is_store_dir(path) -> bool:
    """True if ``path`` is a prefix store's directory (holds the marker)."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskTier:
    """Record files under ``path``, at most ``budget`` bytes of them (None: unbounded).

    Raises
    ------
    NotADirectoryError
        ``path`` is a file.
    FileExistsError
        ``path`` is a non-empty directory that is not a prefix store's.
    PermissionError
        ``path`` cannot be created, read or written.
    """

    def __init__(self, path, budget: Optional[int]):
        self.path = os.path.abspath(os.fspath(path))
        self.budget = budget
        self._lock = threading.Lock()   # this process's counters
        self.records = 0
        self.bytes = 0
        self.evictions = 0
        self._prepare()
        self.rescan()

    # -- the directory ----------------------------------------------------------------
    def _prepare(self) -> None:
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise NotADirectoryError(errno.ENOTDIR, f"PrefixStore.disk_dir: expected a directory, "
                                     f"got a file", p)
        if not os.path.isdir(p):
            try:
                os.makedirs(p, mode=0o700, exist_ok=True)
                os.chmod(p, 0o700)
            except OSError as exc:  # name the argument; a read-only file system is a permission too
                cls = (PermissionError if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                       else type(exc))
                raise cls(exc.errno, f"PrefixStore.disk_dir: cannot create the directory "
                          f"({exc.strerror})", p) from None
        marker = os.path.join(p, MARKER)
        if not os.path.isfile(marker):
            self._refuse_foreign()  # before creating .lock in someone else's directory
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "PrefixStore.disk_dir: expected a directory this "
                                      "process can write, got one it cannot", p)
            # Under the lock: processes opening a new directory at once must not take
            # each other's marker (or its temporary file) for a foreign entry.
            with self._exclusive():
                if not os.path.isfile(marker):
                    self._refuse_foreign()
                    os.chmod(p, 0o700)  # an empty directory taken over becomes the store's
                    tmp = os.path.join(p, MARKER_TEMP)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                    try:
                        os.write(fd, MARKER_TEXT)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, marker)
                    self._sync_dir()
        if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "PrefixStore.disk_dir: expected a readable and "
                                  "writable directory, got one this process cannot read or write", p)
        self._remove_stale_temps()

    def _refuse_foreign(self) -> None:
        """FileExistsError if the directory holds anything but a store's files."""
        names = os.listdir(self.path)
        if MARKER in names:  # another process made it a store meanwhile
            return
        names = [n for n in names if n not in (LOCK_NAME, MARKER_TEMP)]
        if names:
            raise FileExistsError(errno.EEXIST, f"PrefixStore.disk_dir: expected an empty "
                                  f"directory or a prefix store's, got one holding "
                                  f"{len(names)} foreign entries (e.g. {sorted(names)[0]!r})",
                                  self.path)

    def _remove_stale_temps(self) -> None:
        """Temporary files of processes that no longer run (a crash mid-write)."""
        for name in os.listdir(self.path):
            if not name.startswith(TEMP_PREFIX):
                continue
            try:
                pid = int(name[len(TEMP_PREFIX):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                try:
                    os.unlink(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _scan(self) -> List[Tuple[int, int, str]]:
        """(mtime in ns, size, name) of every record file, oldest first."""
        out: List[Tuple[int, int, str]] = []
        with os.scandir(self.path) as it:
            for entry in it:
                if not is_record_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((st.st_mtime_ns, st.st_size, entry.name))
        out.sort()
        return out

    def rescan(self) -> None:
        """Refresh the record and byte counts from the directory."""
        files = self._scan()
        with self._lock:
            self.records = len(files)
            self.bytes = sum(f[1] for f in files)

    # -- records ----------------------------------------------------------------------
    def file_of(self, key: bytes) -> str:
        return os.path.join(self.path, record_name(key))

    def holds(self, key: bytes) -> bool:
        return os.path.isfile(self.file_of(key))

    def read(self, key: bytes, expected, allocate=new_buffer):
        """The bytes of ``key``'s file in a buffer from ``allocate(size)`` and the
        file's identity (for :meth:`remove`), or (None, None) if there is none.
        ``expected``: the size, or a tuple of the sizes, worth reading; a file
        of another size comes back empty (the caller's size check refuses it)."""
        sizes = expected if isinstance(expected, tuple) else (expected,)
        path = self.file_of(key)
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink under a record's name: not ours
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    return None, None
                return b"", (st.st_ino, st.st_mtime_ns)
            raise
        try:
            st = os.fstat(fd)
            size = st.st_size
            # The inode alone could be a newer file's: unlinked inodes are reused at
            # once; its mtime, stamped to the ns at rename, tells them apart.
            ident = (st.st_ino, st.st_mtime_ns)
            if not stat.S_ISREG(st.st_mode):
                return None, None
            if size not in sizes:
                return b"", ident
            buf = allocate(size)
            view, got = memoryview(buf), 0
            while got < size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
            return (buf if got == size else buf[:got]), ident
        finally:
            os.close(fd)

    def open_record(self, key: bytes, expected, head: int, tail: int):
        """``key``'s file opened for a load that reads its rows itself:
        (fd, identity, size, its first ``head`` bytes, its last ``tail`` bytes),
        or None if there is none.  ``expected``: the size, or a tuple of sizes,
        worth reading; the fd is -1 (nothing to close) unless the file is a
        regular file of the first, and the bytes are empty unless it is one of
        them.  The caller closes the fd."""
        sizes = expected if isinstance(expected, tuple) else (expected,)
        path = self.file_of(key)
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink under a record's name: not ours
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    return None
                return -1, (st.st_ino, st.st_mtime_ns), 0, b"", b""
            raise
        try:
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_mtime_ns)
            if not stat.S_ISREG(st.st_mode):
                return None  # a directory or a FIFO under a record's name is no record
            if st.st_size not in sizes:
                return -1, ident, st.st_size, b"", b""
            first = os.pread(fd, head, 0)
            last = os.pread(fd, tail, st.st_size - tail)
            if st.st_size != sizes[0] or len(first) != head or len(last) != tail:
                return -1, ident, st.st_size, first, b""
            fd, kept = -1, fd
            return kept, ident, st.st_size, first, last
        finally:
            if fd >= 0:
                os.close(fd)

    def touch(self, key: bytes, mtime_ns: Optional[int] = None) -> None:
        """Mark a hit: the record's mtime becomes ``mtime_ns`` (default: now)."""
        t = time.time_ns() if mtime_ns is None else mtime_ns
        try:
            os.utime(self.file_of(key), ns=(t, t))
        except OSError:  # evicted meanwhile, or not ours to touch
            pass

    def remove(self, key: bytes, ident=None) -> bool:
        """Remove ``key``'s file (only if it still is ``ident``, as :meth:`read`
        gave it, when given); True if this call removed it."""
        path = self.file_of(key)
        # Under the lock: between the check and the unlink no writer may evict the
        # file and rename a fresh record in, which the unlink would then lose.
        with self._exclusive():
            try:
                st = os.stat(path, follow_symlinks=False)
                if ident is not None and (st.st_ino, st.st_mtime_ns) != tuple(ident):
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
            files = self._scan()
            self._sync_dir()
            self._count(files)
        return True

    def _count(self, files) -> None:
        with self._lock:
            self.records = len(files)
            self.bytes = sum(f[1] for f in files)

    def _new_temp(self) -> Tuple[str, int]:
        """A new temporary file of this thread, open for writing."""
        for _ in range(1000):
            tmp = os.path.join(self.path, f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-"
                                          f"{next(_counter)}")
            try:
                return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # left by a dead process that had this pid: skip it
                continue
        raise FileExistsError(errno.EEXIST, "PrefixStore.disk_dir: no free temporary name", tmp)

    def write(self, key: bytes, buf, mtime_ns: Optional[int] = None) -> bool:
        """Store a record under ``key``, its mtime ``mtime_ns`` (default: now).

        True if this call put it there; False if a record was there already
        (this process's or another's: it is not rewritten) or it cannot fit
        the budget at all.  Raises OSError when the disk refuses.
        """
        size = len(buf)
        if self.budget is not None and size > self.budget:
            return False
        final = self.file_of(key)
        if os.path.exists(final):
            return False
        path, fd = self._new_temp()
        tmp: Optional[str] = path  # None once renamed
        try:
            try:
                os.fchmod(fd, 0o600)
                view, done = memoryview(buf).cast("B"), 0
                while done < size:
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._exclusive():
                if os.path.exists(final):  # another writer's, while this one wrote
                    return False
                files = self._scan()
                total = sum(f[1] for f in files)
                kept, evicted = len(files), 0
                for _, fsize, name in files:
                    if self.budget is None or total + size <= self.budget:
                        break
                    try:
                        os.unlink(os.path.join(self.path, name))
                        evicted += 1
                    except FileNotFoundError:  # removed by hand: no longer counts either way
                        pass
                    total -= fsize
                    kept -= 1
                t = time.time_ns() if mtime_ns is None else mtime_ns
                os.utime(path, ns=(t, t))
                os.rename(path, final)
                tmp = None
                self._sync_dir()
                with self._lock:
                    self.evictions += evicted
                    self.records = kept + 1
                    self.bytes = total + size
            return True
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def _exclusive(self):
        return _FileLock(os.path.join(self.path, LOCK_NAME))

    def keys(self) -> List[str]:
        """Names of the record files, oldest first."""
        return [f[2] for f in self._scan()]


class _FileLock:
    """An exclusive ``flock`` on a file, as a context manager (across processes)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
