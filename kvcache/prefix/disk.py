"""The prefix store's disk tier: one file per record under a directory that
several processes may share.

Owns: the directory (created 0700, marked by a ``KVCACHE-PREFIX`` file, a
foreign non-empty directory refused), record files (``<hex key>.kvp``, 0600:
written to a temporary name, fsync'd, renamed, the directory fsync'd, so a
file cut short by a crash is never under a record's name), their LRU order
(the file's mtime, touched on every hit, so it is shared by every process),
and the ``disk_bytes`` budget: a writer takes an exclusive ``flock`` on
``.lock``, scans the records, removes the least recently used until the new
one fits, renames it in and releases the lock, so that the records under
their final names never exceed the budget, whichever process wrote them.
Must not touch: record contents (kvcache.prefix.record checks them; this
module only moves bytes) or the RAM tier.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat
import threading
from typing import List, Optional, Tuple

from kvcache.prefix.record import new_buffer

MARKER = "KVCACHE-PREFIX"
MARKER_TEXT = b"kvcache prefix store, records v1\n"
SUFFIX = ".kvp"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
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
            names = [n for n in os.listdir(p) if n != LOCK_NAME]
            if names:
                raise FileExistsError(errno.EEXIST, f"PrefixStore.disk_dir: expected an empty "
                                      f"directory or a prefix store's, got one holding "
                                      f"{len(names)} foreign entries (e.g. {sorted(names)[0]!r})", p)
            if not os.access(p, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "PrefixStore.disk_dir: expected a directory this "
                                      "process can write, got one it cannot", p)
            fd = os.open(marker + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, MARKER_TEXT)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(marker + ".tmp", marker)
            self._sync_dir()
        if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "PrefixStore.disk_dir: expected a readable and "
                                  "writable directory, got one this process cannot read or write", p)
        self._remove_stale_temps()

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

    def _scan(self) -> List[Tuple[float, int, str]]:
        """(mtime, size, name) of every record file, oldest first."""
        out = []
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

    def read(self, key: bytes, expected: int):
        """The bytes of ``key``'s file as an aligned buffer and the file's inode,
        or (None, None) if there is none (nor a regular file: a directory or a
        FIFO under a record's name is no record); a file of another size comes
        back as it is (the caller's size check refuses it)."""
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(self.file_of(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink under a record's name: not ours
                return b"", None
            raise
        try:
            st = os.fstat(fd)
            size = st.st_size
            if not stat.S_ISREG(st.st_mode):
                return None, None
            if size != expected:
                return b"", st.st_ino
            buf = new_buffer(size)
            view, got = memoryview(buf), 0
            while got < size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
            return (buf if got == size else buf[:got]), st.st_ino
        finally:
            os.close(fd)

    def touch(self, key: bytes) -> None:
        """Mark a hit: the record becomes the most recently used."""
        try:
            os.utime(self.file_of(key))
        except OSError:
            pass

    def remove(self, key: bytes, inode=None) -> bool:
        """Remove ``key``'s file (only if it still is ``inode``, when given)."""
        path = self.file_of(key)
        try:
            if inode is not None and os.stat(path, follow_symlinks=False).st_ino != inode:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        # Counted again, not decremented: a bad file (cut short, a symlink, written
        # since the last scan) was never counted as it is now.
        self.rescan()
        return True

    def write(self, key: bytes, buf) -> bool:
        """Store a record under ``key`` (no-op if one is there); False if it
        cannot fit the budget at all.  Raises OSError when the disk refuses."""
        size = len(buf)
        if self.budget is not None and size > self.budget:
            return False
        final = self.file_of(key)
        if os.path.exists(final):
            return True
        tmp = os.path.join(self.path, f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-"
                                      f"{next(_counter)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
                if os.path.exists(final):
                    return True
                files = self._scan()
                total = sum(f[1] for f in files)
                evicted = 0
                for _, fsize, name in files:
                    if self.budget is None or total + size <= self.budget:
                        break
                    try:
                        os.unlink(os.path.join(self.path, name))
                    except FileNotFoundError:
                        pass
                    total -= fsize
                    evicted += 1
                os.rename(tmp, final)
                tmp = None
                self._sync_dir()
            with self._lock:
                self.evictions += evicted
                self.records = len(files) - evicted + 1
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
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
