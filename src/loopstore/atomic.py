"""Atomic, durable file primitives on directory descriptors.

Everything opens relative to a directory fd with O_NOFOLLOW, so a symlink planted
inside the store is never followed out of it. Every fsync names its sync point
(`loopstore.faults.SYNC_POINTS`), which a power-loss test can switch off.

The module-level functions `write_all`, `fsync` and `rename` are the seams the stress
suite rebinds to inject OSError: every write the store makes goes through them; every
whole-file read goes through `read_file`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Final

from loopstore import faults

FILE_MODE: Final = 0o666
DIR_MODE: Final = 0o777
#: Both before the umask, as open(2) and mkdir(2) expect.
READ_CHUNK_BYTES: Final = 1 << 20
#: Read size once a file turned out bigger than fstat said (it grew while we read).

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_fdatasync = getattr(os, "fdatasync", os.fsync)


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Write all of `data` (at `offset` with pwrite, else at the file position)."""
    view = memoryview(data)
    while view:
        if offset is None:
            n = os.write(fd, view)
        else:
            n = os.pwrite(fd, view, offset)
            offset += n
        view = view[n:]


def fsync(fd: int, *, data_only: bool = False) -> None:
    """fsync, or fdatasync (file data and the size, not timestamps) with `data_only`."""
    if data_only:
        _fdatasync(fd)
    else:
        os.fsync(fd)


def sync(fd: int, point: str, *, data_only: bool = False) -> None:
    """fsync at the named sync point, unless a fault-injection test switched it off."""
    if faults.should_sync(point):
        fsync(fd, data_only=data_only)


def rename(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Atomic rename (replaces `dst`)."""
    os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink at its last component.

    A symlink there fails with ELOOP (Linux says ENOTDIR: the error is made to say why).
    """
    try:
        return os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(name)) from None
        raise


def open_file(name: str, dir_fd: int, *, write: bool = False, create: bool = False) -> int:
    """Open a regular file (never through a symlink); `create` makes it if missing."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | _O_NOFOLLOW | _O_CLOEXEC
    if create:
        flags |= os.O_CREAT
    return os.open(name, flags, FILE_MODE, dir_fd=dir_fd)


def mkdir(dir_fd: int, name: str) -> bool:
    """Create a directory; False if it already exists."""
    try:
        os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return False
    return True


def tmp_name(tag: str = "") -> str:
    """A unique staging name: pid, thread and randomness, so no two writers collide."""
    return f"{os.getpid()}-{threading.get_ident():x}-{os.urandom(6).hex()}{tag}.tmp"


def write_new(dir_fd: int, name: str, data: bytes) -> int:
    """Create `name` exclusively and write `data`; returns the open descriptor (the
    caller syncs and closes it). On error the file is removed."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
        FILE_MODE,
        dir_fd=dir_fd,
    )
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        unlink_quiet(dir_fd, name)
        raise
    return fd


def create_file(dir_fd: int, name: str, data: bytes, *, point: str | None) -> None:
    """Create `name` exclusively and write `data`; fsync at `point` (None: no fsync).

    On error the file is removed.
    """
    fd = write_new(dir_fd, name, data)
    try:
        try:
            if point is not None:
                sync(fd, point)
        finally:
            os.close(fd)
    except BaseException:
        unlink_quiet(dir_fd, name)
        raise


def fsync_file(dir_fd: int, name: str, point: str) -> None:
    fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    try:
        sync(fd, point)
    finally:
        os.close(fd)


def read_fd(fd: int, offset: int = 0, length: int | None = None) -> bytes:
    """Read `length` bytes at `offset` (None: to the end); fewer only at the end of file."""
    if length is not None:
        chunks = []
        while length > 0:
            chunk = os.pread(fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)
    want = max(os.fstat(fd).st_size - offset, 0) + 1
    first = os.pread(fd, want, offset)
    if len(first) < want:
        return first
    chunks = [first]
    offset += len(first)
    while chunk := os.pread(fd, READ_CHUNK_BYTES, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_file(dir_fd: int | None, name: str | Path) -> bytes:
    """Read a whole regular file, refusing a symlink at the last component."""
    fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


def touch(dir_fd: int, name: str) -> None:
    os.utime(name, dir_fd=dir_fd, follow_symlinks=False)


def unlink_quiet(dir_fd: int | None, name: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def rmtree_at(dir_fd: int, name: str) -> None:
    """Remove a directory tree below `dir_fd` without following any symlink.

    Best effort: entries that vanish or cannot be removed are skipped (gc retries).
    """
    try:
        fd = open_dir(name, dir_fd)
    except OSError:
        unlink_quiet(dir_fd, name)
        return
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in entries:
            if is_dir:
                rmtree_at(fd, child)
            else:
                unlink_quiet(fd, child)
    except OSError:
        pass
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=dir_fd)


def atomic_write_path(path: Path, data: bytes, *, point: str | None, tmp_prefix: str) -> None:
    """tmp in the same directory + fsync + rename + fsync(dir): all or nothing.

    For files outside a store (legacy session files, a backup's marker); `point` None
    skips both fsyncs.
    """
    dfd = open_dir(path.parent)
    try:
        tmp = f"{tmp_prefix}.tmp.{os.getpid()}.{os.urandom(6).hex()}"
        create_file(dfd, tmp, data, point=point)
        try:
            rename(dfd, tmp, dfd, path.name)
        except BaseException:
            unlink_quiet(dfd, tmp)
            raise
        if point is not None:
            sync(dfd, point)
    finally:
        os.close(dfd)
