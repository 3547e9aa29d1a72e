"""The filesystem backend: every file the store touches on a local directory.

Only this module (with its helpers `atomic` and `locking`) makes OS calls on a store.
Everything is opened relative to directory descriptors with O_NOFOLLOW, and every
OSError leaves as StorageError naming the session and the path.

A commit on a filesystem (docs/FORMAT.md, "One append"): under the session lock,
`FsSession.commit` writes one journal frame at the end of the good frames, fdatasyncs
the journal, fsyncs the directories if the state it built on was not yet known to be
durable, then appends a sync mark. `checkpoint` folds the journal into a new
manifest; `create` publishes a new session as one directory rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from loopstore import atomic, journal, locking, ondisk
from loopstore.backend import FileStat, JournalRead
from loopstore.catalog import Catalog
from loopstore.errors import CorruptSession, StorageError, UnsupportedFormat, storage_error

if TYPE_CHECKING:
    import socket

T = TypeVar("T")

NO_LINK_ERRNOS: Final = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}
)
#: Errors meaning "no hard link here" (another filesystem, no link support): copy instead.
PLACE_THREADS: Final = 4
#: Threads that fdatasync staged blob files at a fold (syncs in flight together).
PLACE_FILES_PER_THREAD: Final = 4
#: A thread costs about as much as a few small fsyncs: fewer files are synced in turn.
PLACE_BATCH: Final = 128
#: Blob files staged (and held open) at once by a fold or a backup.
TMP_VANISHED_RETRIES: Final = 5
#: How often a staging file that a concurrent gc removed before our rename is rewritten.
MANIFEST_TAIL_BYTES: Final = 96
#: A manifest ends with its checksum ("...,"checksum":"xxh3_128:<32 hex>"}\n", 59 bytes):
#: reading this much tells whether a cached parse is still current.
ITEM_SUFFIX: Final = ".item"
CLAIMED_SUFFIX: Final = ".claimed"
OK_SUFFIX: Final = ".ok"
FAIL_SUFFIX: Final = ".fail"
#: Hand-off files in locks/<id>.q/: a waiting append, the same once a holder claimed it,
#: and the holder's answer (committed: the claim renamed; failed: the error). Names
#: start with a time-ordered token: oldest first.


@contextlib.contextmanager
def _private_scandir(dir_fd: int) -> Iterator[Iterator[os.DirEntry[str]]]:
    """scandir on a descriptor of its own.

    ``os.scandir(fd)`` dups `fd`, and a dup shares the file offset, which CPython rewinds
    when the scan ends: two threads scanning one shared directory descriptor at once see
    entries skipped or repeated. Opening "." afresh gives each scan its own offset.
    """
    fd = atomic.open_dir(".", dir_fd)
    try:
        with os.scandir(fd) as it:
            yield it
    finally:
        os.close(fd)


def _names(dir_fd: int) -> list[str]:
    with _private_scandir(dir_fd) as it:
        return [e.name for e in it]


def _scan(dir_fd: int, base: Path) -> list[FileStat]:
    now = time.time()
    out: list[FileStat] = []
    with _private_scandir(dir_fd) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISREG(st.st_mode):
                kind = "file"
            else:
                kind = "other"
            out.append(FileStat(e.name, base / e.name, st.st_size, now - st.st_mtime, kind))
    return out


@dataclass
class _Journal:
    generation: int
    fd: int
    writable: bool


class FsSession:
    """One call's handle on a session directory (its descriptors close with the handle).

    Reads need no lock. The writing methods (`commit`, `checkpoint`, `materialize`)
    are called by the holder of the session lock only.
    """

    def __init__(self, backend: FileSystemBackend, session_id: str, sfd: int) -> None:
        self._b = backend
        self.session_id = session_id
        self._sfd = sfd
        self._lfd: int | None = None
        self._journal: _Journal | None = None

    def close(self) -> None:
        fds = [self._lfd, self._sfd, self._journal.fd if self._journal else None]
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lfd = None
        self._journal = None

    def __enter__(self) -> FsSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _err(self, verb: str, path: Path, exc: OSError) -> Exception:
        return storage_error(self.session_id, verb, path, exc)

    # -- manifest --------------------------------------------------------------------

    def manifest_id(self) -> bytes | None:
        """What identifies the current manifest: its last bytes (they hold its checksum).

        None if there is no manifest. Manifests are only ever replaced whole, so equal
        ids mean an unchanged checkpoint and a cached parse can be reused.
        """
        try:
            fd = atomic.open_file(ondisk.MANIFEST_NAME, self._sfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("open manifest", self._manifest_path(), exc) from exc
        try:
            size = os.fstat(fd).st_size
            return atomic.read_fd(fd, max(0, size - MANIFEST_TAIL_BYTES))
        except OSError as exc:
            raise self._err("read manifest", self._manifest_path(), exc) from exc
        finally:
            os.close(fd)

    def manifest(self) -> tuple[bytes, bytes] | None:
        """The manifest's bytes and its id (see `manifest_id`), None if absent."""
        try:
            data = atomic.read_file(self._sfd, ondisk.MANIFEST_NAME)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("read manifest", self._manifest_path(), exc) from exc
        return data, data[-MANIFEST_TAIL_BYTES:]

    def _manifest_path(self) -> Path:
        return self._b.layout.manifest(self.session_id)

    # -- journal ---------------------------------------------------------------------

    def _open_journal(
        self, generation: int, *, write: bool, create: bool | None = None
    ) -> _Journal | None:
        j = self._journal
        if j is not None and j.generation == generation and (j.writable or not write):
            return j
        name = ondisk.journal_filename(generation)
        try:
            fd = atomic.open_file(
                name, self._sfd, write=write, create=write if create is None else create
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("open journal", self._journal_path(generation), exc) from exc
        if j is not None:
            os.close(j.fd)
        self._journal = _Journal(generation, fd, write)
        return self._journal

    def _journal_path(self, generation: int) -> Path:
        return self._b.layout.journal(self.session_id, generation)

    def read_frames(
        self, generation: int, cursor: int, *, for_write: bool = False
    ) -> JournalRead | None:
        """The good frames of journal `generation` from byte `cursor` on; None if absent.

        A writer (`for_write`) opens it writable at once, to append to it next.
        """
        j = self._open_journal(generation, write=for_write, create=False)
        if j is None:
            return None
        try:
            data = atomic.read_fd(j.fd, cursor)
        except OSError as exc:
            raise self._err("read journal", self._journal_path(generation), exc) from exc
        try:
            frames, end = journal.scan(data, cursor)
        except journal.JournalError as exc:
            path = self._journal_path(generation)
            raise CorruptSession(self.session_id, f"bad journal: {exc}", path=path) from None
        return JournalRead(frames, end, cursor + len(data))

    def payload(self, generation: int, span: journal.BlobSpan) -> bytes:
        """A blob carried by a journal record (not yet materialized in loops/)."""
        j = self._open_journal(generation, write=False)
        if j is None:
            raise FileNotFoundError(self._journal_path(generation))
        try:
            data = atomic.read_fd(j.fd, span.locator + span.start, span.length)
        except OSError as exc:
            raise self._err("read journal", self._journal_path(generation), exc) from exc
        if len(data) != span.length:
            raise CorruptSession(
                self.session_id,
                "journal is shorter than a record it holds",
                path=self._journal_path(generation),
            )
        return data

    def make_durable(self, generation: int) -> None:
        """Make what this handle read durable: journal data, then the directory entries.

        A reader or writer that found the journal without a trailing sync mark calls
        this before returning (or building on) what it read: the writer that left the
        journal so may have died before its fdatasync or its directory fsyncs.
        """
        if not self._b.durable:
            return
        j = self._open_journal(generation, write=False)
        try:
            if j is not None:
                atomic.sync(j.fd, "journal", data_only=True)
            atomic.sync(self._sfd, "session-dir")
            atomic.sync(self._b.sessions_fd, "sessions-dir")
        except OSError as exc:
            raise self._err(
                "make the session durable", self._b.layout.session_dir(self.session_id), exc
            ) from exc

    def commit(
        self, generation: int, at: int, frame: bytes, *, seal_dirs: bool, torn: bool
    ) -> tuple[int, int]:
        """Append one record and make it durable: the commit point of every write.

        `at` is the end of the journal's good frames; bytes beyond it (`torn`: a torn tail
        no call acknowledged) are cut first. Then: write, fdatasync, fsync the directories
        if the state this builds on was not known to be durable, and append a sync mark.
        Returns where the frame starts (its blobs' locator base) and the new cursor.
        """
        j = self._open_journal(generation, write=True)
        assert j is not None  # opened with create=True
        try:
            if torn:
                os.ftruncate(j.fd, at)
            atomic.write_all(j.fd, frame, at)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(j.fd, at)
            raise self._err("append to journal", self._journal_path(generation), exc) from exc
        try:
            if self._b.durable:
                atomic.sync(j.fd, "journal", data_only=True)
                if seal_dirs:
                    atomic.sync(self._sfd, "session-dir")
                    atomic.sync(self._b.sessions_fd, "sessions-dir")
        except OSError as exc:
            # The record stays: a reader may already have seen it (and made it durable
            # itself). The call fails; whoever reads next fsyncs it again before use.
            err = storage_error(
                self.session_id, "sync journal", self._journal_path(generation), exc
            )
            err.maybe_committed = True
            raise err from exc
        try:
            self._mark(j, at + len(frame))
        except StorageError as err:
            err.maybe_committed = True  # durable, but not marked: committed after all
            raise
        return at, at + len(frame) + journal.MARK_BYTES

    def _mark(self, j: _Journal, at: int) -> None:
        try:
            atomic.write_all(j.fd, journal.MARK, at)
        except OSError as exc:
            raise self._err("mark journal", self._journal_path(j.generation), exc) from exc

    # -- blobs -----------------------------------------------------------------------

    def _loops_fd(self, *, create: bool = False) -> int | None:
        if self._lfd is None:
            try:
                self._lfd = atomic.open_dir(ondisk.LOOPS_DIR, self._sfd)
            except FileNotFoundError:
                if not create:
                    return None
                atomic.mkdir(self._sfd, ondisk.LOOPS_DIR)
                self._lfd = atomic.open_dir(ondisk.LOOPS_DIR, self._sfd)
        return self._lfd

    def blob(self, digest: str) -> bytes:
        """A materialized blob; FileNotFoundError if absent (the caller re-reads state)."""
        name = ondisk.blob_filename(digest)
        try:
            lfd = self._loops_fd()
            if lfd is None:
                raise FileNotFoundError(name)
            return atomic.read_file(lfd, name)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._err("read blob", self._b.layout.blob(self.session_id, digest), exc) from exc

    def _stat_blob(self, digest: str) -> os.stat_result | None:
        """A materialized blob file's stat (not following a symlink), None if missing."""
        try:
            lfd = self._loops_fd()
            if lfd is None:
                return None
            return os.stat(ondisk.blob_filename(digest), dir_fd=lfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("stat blob", self._b.layout.blob(self.session_id, digest), exc) from exc

    def blob_size(self, digest: str) -> int | None:
        """Size of a materialized blob file, None if it is missing (or not a regular file)."""
        st = self._stat_blob(digest)
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    def blob_identity(self, digest: str) -> tuple[int, int] | None:
        """(device, inode) of a materialized blob file, None if missing: backups use it
        to tell a copy from a hard link."""
        st = self._stat_blob(digest)
        return None if st is None else (st.st_dev, st.st_ino)

    def blob_path(self, digest: str) -> Path:
        return self._b.layout.blob(self.session_id, digest)

    def materialize(
        self,
        blobs: Sequence[ondisk.EncodedBlob],
        *,
        links: Mapping[str, Path] | None = None,
        force: Collection[str] = (),
    ) -> tuple[list[str], list[str]]:
        """Write blob files (tmp, fsync, rename into loops/), then fsync loops/ once.

        A file already under the name is kept only if its bytes are ours (it may be
        a crashed writer's, never fsynced: it is fsynced now, cheaply if clean) and it
        is not in `force`. `links` names source files to hard-link instead of writing
        (a backup on the same filesystem). Returns the digests linked and written.
        """
        b = self._b
        try:
            lfd = self._loops_fd(create=True)
        except OSError as exc:
            path = b.layout.loops_dir(self.session_id)
            raise self._err("create loops directory", path, exc) from exc
        assert lfd is not None
        return b.place_blobs(self.session_id, lfd, blobs, links or {}, force)

    # -- checkpoint ------------------------------------------------------------------

    def checkpoint(
        self, manifest: bytes, old_generation: int, new_generation: int
    ) -> tuple[bytes, int]:
        """Replace manifest.json by a new checkpoint and start its (empty) journal.

        The new journal is created before the rename so one directory fsync makes both
        durable; the old journal is removed only after that fsync (until then the old
        manifest and journal are the durable state). Every blob the manifest names must
        be materialized before this is called. Returns the new manifest's id and the
        new journal's cursor.
        """
        b = self._b
        sid = self.session_id
        new_name = ondisk.journal_filename(new_generation)
        try:
            fd = atomic.open_file(new_name, self._sfd, write=True, create=True)
            try:
                os.ftruncate(fd, 0)  # a crashed checkpoint's leftover holds no record
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._err("create journal", self._journal_path(new_generation), exc) from exc
        b.publish(
            sid,
            manifest,
            ".manifest",
            self._sfd,
            ondisk.MANIFEST_NAME,
            "manifest",
            self._manifest_path(),
            point="manifest",
        )
        if b.durable:
            try:
                atomic.sync(self._sfd, "session-dir")
            except OSError as exc:
                raise self._err("fsync session directory", b.layout.session_dir(sid), exc) from exc
        j = self._open_journal(new_generation, write=True)
        assert j is not None
        self._mark(j, 0)
        if old_generation != new_generation:
            atomic.unlink_quiet(self._sfd, ondisk.journal_filename(old_generation))
        return manifest[-MANIFEST_TAIL_BYTES:], journal.MARK_BYTES


class FsQueue:
    """One session's group-commit hand-off queue (`locks/<id>.q/`), opened once.

    Files, each named by a time-ordered token: `<token>.item`, an append waiting for the
    lock holder; `<token>.claimed`, the same once a holder took it; then its outcome:
    `<token>.ok` (the claim renamed: committed) or `<token>.fail` (the holder's error).
    Renames and unlinks settle every race; nothing here is ever fsynced.
    """

    def __init__(self, backend: FileSystemBackend, session_id: str, fd: int) -> None:
        self._b = backend
        self._sid = session_id
        self._fd = fd

    def close(self) -> None:
        os.close(self._fd)

    def _err(self, verb: str, exc: OSError) -> Exception:
        return storage_error(self._sid, verb, self._b.layout.queue(self._sid), exc)

    # -- the waiter's side -----------------------------------------------------------

    def deposit(self, token: str, data: bytes) -> None:
        """Leave an append for the lock holder: `<token>.item`, whole or not at all."""
        tmp = atomic.tmp_name(ITEM_SUFFIX)
        try:
            atomic.create_file(self._fd, tmp, data, point=None)
            atomic.rename(self._fd, tmp, self._fd, token + ITEM_SUFFIX)
        except OSError as exc:
            atomic.unlink_quiet(self._fd, tmp)
            raise self._err("hand off append", exc) from exc

    def withdraw(self, token: str) -> bool:
        """Take back a handed-off append; False if a holder claimed it first."""
        try:
            os.unlink(token + ITEM_SUFFIX, dir_fd=self._fd)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._err("withdraw hand-off", exc) from exc

    def outcome(self, token: str) -> bytes | None:
        """The outcome a holder posted for `token` (taken: read once), None if none yet.

        An empty answer means committed (taking it is one unlink); anything else is
        the holder's error.
        """
        try:
            os.unlink(token + OK_SUFFIX, dir_fd=self._fd)
            return b""
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._err("read hand-off outcome", exc) from exc
        name = token + FAIL_SUFFIX
        try:
            data = atomic.read_file(self._fd, name)
            atomic.unlink_quiet(self._fd, name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("read hand-off outcome", exc) from exc
        return data

    # -- maintenance -----------------------------------------------------------------

    def files(self) -> list[FileStat]:
        try:
            return _scan(self._fd, self._b.layout.queue(self._sid))
        except OSError as exc:
            raise self._err("list hand-off queue", exc) from exc

    def remove(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._err("remove hand-off file", exc) from exc

    # -- the holder's side -----------------------------------------------------------

    def claim(self, limit_bytes: int) -> tuple[list[bytes], list[bytes]]:
        """Claims a dead holder left (the caller holds the lock), and the waiting appends
        now claimed, oldest first, up to about `limit_bytes` in all: one directory scan.

        Claiming is renaming `<token>.item` to `<token>.claimed`: a waiter that
        withdraws first (unlinks the item) keeps its append, and our rename fails.
        """
        orphans: list[bytes] = []
        fresh: list[bytes] = []
        total = 0
        try:
            for name in sorted(_names(self._fd)):
                if name.endswith(CLAIMED_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        orphans.append(atomic.read_file(self._fd, name))
                    continue
                if not name.endswith(ITEM_SUFFIX) or total >= limit_bytes:
                    continue
                claimed = name[: -len(ITEM_SUFFIX)] + CLAIMED_SUFFIX
                try:
                    atomic.rename(self._fd, name, self._fd, claimed)
                    data = atomic.read_file(self._fd, claimed)
                except FileNotFoundError:
                    continue  # withdrawn
                fresh.append(data)
                total += len(data)
        except OSError as exc:
            raise self._err("read hand-off queue", exc) from exc
        return orphans, fresh

    def requeue(self, token: str) -> None:
        """Put an orphaned claim back in the queue (it was never committed)."""
        try:
            atomic.rename(self._fd, token + CLAIMED_SUFFIX, self._fd, token + ITEM_SUFFIX)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._err("requeue hand-off", exc) from exc

    def post(self, token: str, error: bytes | None) -> None:
        """Tell the waiter `token` how its claimed append ended: committed (None: the
        claim is renamed to `.ok`, one syscall) or failed (the error, written aside)."""
        try:
            if error is None:
                atomic.rename(self._fd, token + CLAIMED_SUFFIX, self._fd, token + OK_SUFFIX)
                return
            tmp = atomic.tmp_name(FAIL_SUFFIX)
            try:
                atomic.create_file(self._fd, tmp, error, point=None)
                atomic.rename(self._fd, tmp, self._fd, token + FAIL_SUFFIX)
            except OSError:
                atomic.unlink_quiet(self._fd, tmp)
                raise
            atomic.unlink_quiet(self._fd, token + CLAIMED_SUFFIX)
        except OSError as exc:
            raise self._err("post hand-off outcome", exc) from exc

    # -- wake-ups (so waiters need not poll) --------------------------------------------

    @contextlib.contextmanager
    def doorbell(self, token: str) -> Iterator[Doorbell | None]:
        """A socket the holder rings when `token`'s outcome is posted or the lock is free.

        Linux abstract sockets (no file, gone with the process); elsewhere None, and the
        waiter polls.
        """
        bell = Doorbell.open(token)
        try:
            yield bell
        finally:
            if bell is not None:
                bell.close()

    def ring(self, token: str) -> None:
        """Wake the waiter `token` (if it still listens; a bell nobody hears is fine)."""
        Doorbell.ring(token)

    def ring_oldest(self) -> None:
        """The lock is free: wake the oldest waiting append, to take it and serve the rest."""
        try:
            waiting = sorted(n for n in _names(self._fd) if n.endswith(ITEM_SUFFIX))
        except OSError:
            return
        if waiting:
            self.ring(waiting[0][: -len(ITEM_SUFFIX)])


class Doorbell:
    """One waiter's wake-up socket (AF_UNIX datagram in the abstract namespace).

    `socket` is imported on first use: a listing never needs it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @staticmethod
    def _address(token: str) -> str:
        return f"\0loopstore.{token}"

    @classmethod
    def open(cls, token: str) -> Doorbell | None:
        if not sys.platform.startswith("linux"):
            return None
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(cls._address(token))
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def wait(self, timeout: float) -> None:
        """Until rung, or `timeout` seconds (then the caller checks for itself)."""
        self._sock.settimeout(max(timeout, 0.0))
        with contextlib.suppress(OSError):  # a timeout included: the caller looks anyway
            self._sock.recv(16)

    def close(self) -> None:
        self._sock.close()

    _ringer: socket.socket | None = None
    _ringer_pid = 0

    @classmethod
    def ring(cls, token: str) -> None:
        """Ring from the process's one sending socket (a forked child makes its own)."""
        if not sys.platform.startswith("linux"):
            return
        pid = os.getpid()
        if cls._ringer is None or cls._ringer_pid != pid:
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            cls._ringer, cls._ringer_pid = sock, pid
        with contextlib.suppress(OSError):  # nobody listens (or the bell is full)
            cls._ringer.sendto(b"!", cls._address(token))


class FileSystemBackend:
    """The store's storage on a local directory (format v2 layout, `loopstore.ondisk`)."""

    scheme: Final = "file"
    handoff: Final = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        durable: bool = True,
        lock_timeout: float = locking.LOCK_TIMEOUT_S,
        lock_poll_interval: float = locking.LOCK_POLL_INTERVAL_S,
    ) -> None:
        self.layout = ondisk.Layout(Path(os.path.abspath(os.fspath(root))))
        self.durable = durable
        self.locks = locking.LockManager(
            self.layout.root,
            self.layout.lock,
            timeout=lock_timeout,
            poll_interval=lock_poll_interval,
        )
        self.root_fd = self.sessions_fd = self.locks_fd = self.tmp_fd = -1
        self._retired: list[int] = []
        self.format_version = ondisk.FORMAT_VERSION
        try:
            self._open_root()
            self.format_version = self._check_marker()
            self._refuse_foreign_directory()
            self.sessions_fd = self._subdir(ondisk.SESSIONS_DIR)
            self.locks_fd = self._subdir(ondisk.LOCKS_DIR)
            self.tmp_fd = self._subdir(ondisk.TMP_DIR)
            self._ensure_marker()
        except BaseException:
            self.close()
            raise
        self._catalog = Catalog(self.layout.root, self.root_fd)

    # -- setup -----------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.layout.root)

    def _sync_dir(self, fd: int, point: str, path: Path) -> None:
        if self.durable:
            try:
                atomic.sync(fd, point)
            except OSError as exc:
                raise storage_error(None, "fsync directory", path, exc) from exc

    def _open_root(self) -> None:
        """Open (creating with parents) the root; every directory on the way is made durable.

        Whoever created the root, maybe a process killed before its fsync, this one
        fsyncs the root's parent once per open: the store it is about to vouch for must
        not vanish with a power loss.
        """
        root = self.layout.root
        missing: list[Path] = []
        p = root
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, atomic.DIR_MODE)
            self.root_fd = atomic.open_dir(root)
        except OSError as exc:
            raise storage_error(None, "open store root", root, exc) from exc
        if not self.durable:
            return
        for d in [*(m.parent for m in reversed(missing)), root.parent]:
            try:
                fd = atomic.open_dir(d)
            except OSError:
                continue  # a parent we cannot open (permissions): nothing we created is there
            try:
                atomic.sync(fd, "store-dir")
            except OSError as exc:
                raise storage_error(None, "fsync directory", d, exc) from exc
            finally:
                os.close(fd)

    def _subdir(self, name: str) -> int:
        path = self.layout.root / name
        try:
            atomic.mkdir(self.root_fd, name)
            fd = atomic.open_dir(name, self.root_fd)
        except OSError as exc:
            raise storage_error(None, "open store directory", path, exc) from exc
        return fd

    def _check_marker(self) -> int:
        """Refuse a newer (or foreign) store before creating anything inside it."""
        try:
            data = atomic.read_file(self.root_fd, ondisk.MARKER_NAME)
        except FileNotFoundError:
            return ondisk.FORMAT_VERSION
        except OSError as exc:
            raise storage_error(None, "read store marker", self.layout.marker, exc) from exc
        return ondisk.check_marker(data, self.layout.marker)

    def _refuse_foreign_directory(self) -> None:
        """A non-empty directory without a store marker is not made a store."""
        if _exists(self.root_fd, ondisk.MARKER_NAME):
            return
        try:
            with _private_scandir(self.root_fd) as it:
                foreign = sorted(e.name for e in it if not ondisk.is_store_entry(e.name))
        except OSError as exc:
            raise storage_error(None, "list store root", self.layout.root, exc) from exc
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UnsupportedFormat(
                None,
                f"not a loopstore store: the directory is not empty ({shown}) and has no "
                f"{ondisk.MARKER_NAME}; refusing to make it a store",
                path=self.layout.root,
            )

    def _ensure_marker(self) -> None:
        """Write the v2 marker if missing or older (a v1 store is upgraded in place).

        The root is fsynced afterwards either way: it makes sessions/, locks/, tmp/ and
        the marker durable, whoever created them.
        """
        path = self.layout.marker
        try:
            try:
                current = atomic.read_file(self.root_fd, ondisk.MARKER_NAME)
            except FileNotFoundError:
                current = None
            if current is None or ondisk.check_marker(current, path) < ondisk.FORMAT_VERSION:
                tmp = atomic.tmp_name(".marker")
                atomic.create_file(
                    self.tmp_fd,
                    tmp,
                    ondisk.marker_bytes(),
                    point="staging" if self.durable else None,
                )
                try:
                    atomic.rename(self.tmp_fd, tmp, self.root_fd, ondisk.MARKER_NAME)
                finally:
                    atomic.unlink_quiet(self.tmp_fd, tmp)
                self.format_version = ondisk.FORMAT_VERSION
        except OSError as exc:
            raise storage_error(None, "write store marker", path, exc) from exc
        self._sync_dir(self.root_fd, "store-dir", self.layout.root)

    @property
    def catalog(self) -> Catalog:
        """The listing catalog (re-opened with the store's directories if they were
        removed and re-created)."""
        if self._stale():
            self._reopen()
        return self._catalog

    def close(self) -> None:
        catalog = getattr(self, "_catalog", None)
        if catalog is not None:
            catalog.close()
        for attr in ("tmp_fd", "locks_fd", "sessions_fd", "root_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)
        for fd in getattr(self, "_retired", ()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._retired = []

    def __del__(self) -> None:
        self.close()

    def _stale(self) -> bool:
        """True if a directory we hold open was removed (someone deleted or rebuilt it)."""
        try:
            return any(os.fstat(fd).st_nlink == 0 for fd in (self.sessions_fd, self.tmp_fd))
        except OSError:
            return True

    def _reopen(self) -> None:
        """Re-open the store directories by path after they were removed and re-created.

        Old descriptors are retired, not closed: another thread may still be using them,
        and a reused descriptor number must never point at the wrong directory.
        """
        fresh = FileSystemBackend(
            self.layout.root,
            durable=self.durable,
            lock_timeout=self.locks.timeout,
            lock_poll_interval=self.locks.poll_interval,
        )
        fresh._catalog.close()
        for attr in ("root_fd", "sessions_fd", "locks_fd", "tmp_fd"):
            self._retired.append(getattr(self, attr))
            setattr(self, attr, getattr(fresh, attr))
            setattr(fresh, attr, -1)
        self._catalog.close()
        self._catalog = Catalog(self.layout.root, self.root_fd)

    # -- staging ---------------------------------------------------------------------

    def publish(
        self,
        session_id: str | None,
        data: bytes,
        tag: str,
        dst_fd: int,
        dst_name: str,
        what: str,
        dst_path: Path,
        *,
        point: str = "blob",
    ) -> None:
        """Stage `data` in tmp/ (fsynced at `point`) and rename it to `dst_name` in `dst_fd`.

        A gc with a tiny grace may remove our staging file before the rename: it is
        then written again (a few times), so gc never breaks a concurrent writer.
        """
        for attempt in range(TMP_VANISHED_RETRIES):
            tmp = atomic.tmp_name(tag)
            try:
                self._create_tmp(tmp, data, point)
            except OSError as exc:
                raise storage_error(session_id, f"write {what}", self.layout.tmp(tmp), exc) from exc
            try:
                atomic.rename(self.tmp_fd, tmp, dst_fd, dst_name)
                return
            except FileNotFoundError as exc:
                if attempt + 1 < TMP_VANISHED_RETRIES and not _exists(self.tmp_fd, tmp):
                    continue  # our staging file was collected: stage it again
                atomic.unlink_quiet(self.tmp_fd, tmp)
                raise storage_error(session_id, f"publish {what}", dst_path, exc) from exc
            except OSError as exc:
                atomic.unlink_quiet(self.tmp_fd, tmp)
                raise storage_error(session_id, f"publish {what}", dst_path, exc) from exc

    def _create_tmp(self, name: str, data: bytes, point: str) -> None:
        sync_point = point if self.durable else None
        try:
            atomic.create_file(self.tmp_fd, name, data, point=sync_point)
        except FileNotFoundError:
            if not self._stale():
                raise
            self._reopen()
            atomic.create_file(self.tmp_fd, name, data, point=sync_point)

    def place_blobs(
        self,
        session_id: str,
        lfd: int,
        blobs: Sequence[ondisk.EncodedBlob],
        links: Mapping[str, Path],
        force: Collection[str],
    ) -> tuple[list[str], list[str]]:
        """Put `blobs` into the loops/ directory `lfd` (see `FsSession.materialize`).

        In passes of up to PLACE_BATCH blobs: stage each new blob in tmp/, fdatasync
        the staged files from a few threads at once (the filesystem commits concurrent
        syncs together; one thread per file costs 3x the CPU), rename them into loops/;
        then fsync loops/ once. Every file is durable before its name appears.
        """
        linked: list[str] = []
        written: list[str] = []
        for i in range(0, len(blobs), PLACE_BATCH):
            self._place_batch(
                session_id, lfd, blobs[i : i + PLACE_BATCH], links, force, linked, written
            )
        if blobs and self.durable:
            try:
                atomic.sync(lfd, "loops-dir")
            except OSError as exc:
                path = self.layout.loops_dir(session_id)
                raise storage_error(session_id, "fsync loops directory", path, exc) from exc
        return linked, written

    def _place_batch(
        self,
        session_id: str,
        lfd: int,
        blobs: Sequence[ondisk.EncodedBlob],
        links: Mapping[str, Path],
        force: Collection[str],
        linked: list[str],
        written: list[str],
    ) -> None:
        staged: list[tuple[ondisk.EncodedBlob, str]] = []
        fds: list[int] = []  # open until synced: the staged files, then kept ones
        blob: ondisk.EncodedBlob | None = None
        try:
            try:
                for blob in blobs:
                    try:
                        existing = atomic.read_file(lfd, blob.name)
                    except OSError:
                        existing = None  # missing or unreadable: (re)place it
                    if existing == blob.data and blob.digest not in force:
                        if self.durable:  # a crashed writer's file may not be durable
                            fds.append(atomic.open_file(blob.name, lfd))
                        continue
                    source = links.get(blob.digest)
                    if source is not None and self._link(source, lfd, blob.name):
                        linked.append(blob.digest)
                        continue
                    tmp = atomic.tmp_name(".blob")
                    fds.insert(len(staged), self._stage(tmp, blob.data))
                    staged.append((blob, tmp))
                blob = None
                if self.durable and fds:
                    self._sync_all(fds)
            finally:
                for fd in fds:
                    os.close(fd)
            for blob, tmp in staged:
                try:
                    atomic.rename(self.tmp_fd, tmp, lfd, blob.name)
                except FileNotFoundError:  # a gc with a tiny grace took it: stage it anew
                    path = self.layout.blob(session_id, blob.digest)
                    self.publish(session_id, blob.data, ".blob", lfd, blob.name, "blob", path)
                written.append(blob.digest)
        except OSError as exc:
            for _blob, tmp in staged:
                atomic.unlink_quiet(self.tmp_fd, tmp)
            where = self.layout.loops_dir(session_id)
            path = where if blob is None else self.layout.blob(session_id, blob.digest)
            raise storage_error(session_id, "write blob", path, exc) from exc

    def _stage(self, tmp: str, data: bytes) -> int:
        try:
            return atomic.write_new(self.tmp_fd, tmp, data)
        except FileNotFoundError:
            if not self._stale():
                raise
            self._reopen()
            return atomic.write_new(self.tmp_fd, tmp, data)

    def _sync_all(self, fds: Sequence[int]) -> None:
        """fdatasync every file, from up to PLACE_THREADS threads."""
        from concurrent.futures import ThreadPoolExecutor

        threads = min(PLACE_THREADS, len(fds) // PLACE_FILES_PER_THREAD)

        def sync_chunk(chunk: Sequence[int]) -> None:
            for fd in chunk:
                atomic.sync(fd, "blob", data_only=True)

        if threads <= 1:
            sync_chunk(fds)
            return
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(sync_chunk, [fds[k::threads] for k in range(threads)]))

    def _link(self, source: Path, lfd: int, name: str) -> bool:
        """Hard-link `source` to loops/<name> (via tmp/); False where links cannot be made."""
        tmp = atomic.tmp_name(".link")
        try:
            os.link(source, tmp, dst_dir_fd=self.tmp_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in NO_LINK_ERRNOS:
                return False
            raise
        try:
            if self.durable:  # the shared inode may come from a store with durable=False
                atomic.fsync_file(self.tmp_fd, tmp, "blob")
            atomic.rename(self.tmp_fd, tmp, lfd, name)
        except BaseException:
            atomic.unlink_quiet(self.tmp_fd, tmp)
            raise
        return True

    def install(
        self,
        session_id: str,
        manifest: bytes,
        generation: int,
        blobs: Sequence[ondisk.EncodedBlob],
        links: Mapping[str, Path],
    ) -> tuple[list[str], list[str]]:
        """Publish a session at rest (a backup's copy): loops/, checkpoint, empty journal.

        Published like `create`; the caller holds the lock and the session has no
        manifest. Returns the digests linked and written.
        """
        jname = ondisk.journal_filename(generation)

        def build(dfd: int) -> tuple[list[str], list[str]]:
            atomic.mkdir(dfd, ondisk.LOOPS_DIR)
            lfd = atomic.open_dir(ondisk.LOOPS_DIR, dfd)
            try:
                counts = self.place_blobs(session_id, lfd, blobs, links, ())
            finally:
                os.close(lfd)
            atomic.create_file(
                dfd, ondisk.MANIFEST_NAME, manifest, point="manifest" if self.durable else None
            )
            atomic.create_file(dfd, jname, b"", point=None)
            return counts

        return self._publish(session_id, build, generation, 0)

    # -- sessions --------------------------------------------------------------------

    def _open_session_fd(self, session_id: str) -> int | None:
        for _ in range(2):
            try:
                return atomic.open_dir(session_id, self.sessions_fd)
            except FileNotFoundError:
                if not self._stale():
                    return None
                self._reopen()
            except OSError as exc:
                path = self.layout.session_dir(session_id)
                raise storage_error(session_id, "open session directory", path, exc) from exc
        return None

    @contextlib.contextmanager
    def session(self, session_id: str) -> Iterator[FsSession | None]:
        """A handle on the session directory, or None if there is none."""
        sfd = self._open_session_fd(session_id)
        if sfd is None:
            yield None
            return
        h = FsSession(self, session_id, sfd)
        try:
            yield h
        finally:
            h.close()

    def has_manifest(self, session_id: str) -> bool:
        sfd = self._open_session_fd(session_id)
        if sfd is None:
            return False
        try:
            os.stat(ondisk.MANIFEST_NAME, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(
                session_id, "stat manifest", self.layout.manifest(session_id), exc
            ) from exc
        finally:
            os.close(sfd)
        return True

    def create(self, session_id: str, manifest: bytes, first: bytes) -> None:
        """Publish a new session as one rename (`_publish`): manifest.json (generation 0,
        the header) and journal-0.log with the first record, fdatasynced. Readers see no
        session or the whole first commit."""

        def build(dfd: int) -> None:
            atomic.create_file(
                dfd, ondisk.MANIFEST_NAME, manifest, point="manifest" if self.durable else None
            )
            jfd = atomic.open_file(ondisk.journal_filename(0), dfd, write=True, create=True)
            try:
                atomic.write_all(jfd, first, 0)
                if self.durable:
                    atomic.sync(jfd, "journal", data_only=True)
            finally:
                os.close(jfd)

        self._publish(session_id, build, 0, len(first))

    def _publish(
        self, session_id: str, build: Callable[[int], T], generation: int, mark_at: int
    ) -> T:
        """Build a session directory in tmp/new-*/ (`build` fills it, given its
        descriptor) and publish it as one rename into sessions/.

        The staging directory is fsynced, a directory already at sessions/<id> without a
        manifest (a crash's remains) is moved away, the rename is made, sessions/ is
        fsynced, then journal-<generation>.log gets its sync mark at `mark_at`. A gc
        with a tiny grace may remove the staging directory first: it is built again.
        """
        for attempt in range(TMP_VANISHED_RETRIES):
            staging = ondisk.NEW_SESSION_PREFIX + atomic.tmp_name()
            try:
                result, dfd = self._stage_session(session_id, staging, build)
            except FileNotFoundError:
                if attempt + 1 < TMP_VANISHED_RETRIES and not _exists(self.tmp_fd, staging):
                    continue
                raise
            break
        jname = ondisk.journal_filename(generation)
        try:
            if self.durable:
                atomic.sync(self.sessions_fd, "sessions-dir")
            jfd = atomic.open_file(jname, dfd, write=True)
            try:
                atomic.write_all(jfd, journal.MARK, mark_at)
            finally:
                os.close(jfd)
        except OSError as exc:
            path = self.layout.journal(session_id, generation)
            raise storage_error(session_id, "make new session durable", path, exc) from exc
        finally:
            os.close(dfd)
        return result

    def _stage_session(
        self, session_id: str, staging: str, build: Callable[[int], T]
    ) -> tuple[T, int]:
        """Build tmp/<staging>/ and rename it to sessions/<id>; its descriptor stays open.

        FileNotFoundError (unwrapped) if the staging directory vanished under us.
        """
        layout = self.layout
        try:
            atomic.mkdir(self.tmp_fd, staging)
            dfd = atomic.open_dir(staging, self.tmp_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_error(
                session_id, "create session directory", layout.tmp(staging), exc
            ) from exc
        try:
            try:
                result = build(dfd)
                if self.durable:
                    atomic.sync(dfd, "staging")
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) and not _exists(self.tmp_fd, staging):
                    raise
                raise storage_error(
                    session_id, "write new session", layout.tmp(staging), exc
                ) from exc
            try:
                if _exists(self.sessions_fd, session_id):
                    self._remove_dir(session_id)
                atomic.rename(self.tmp_fd, staging, self.sessions_fd, session_id)
            except FileNotFoundError:
                if not _exists(self.tmp_fd, staging):
                    raise
                raise storage_error(
                    session_id,
                    "publish new session",
                    layout.session_dir(session_id),
                    FileNotFoundError(2, "No such file or directory"),
                ) from None
            except OSError as exc:
                raise storage_error(
                    session_id, "publish new session", layout.session_dir(session_id), exc
                ) from exc
        except BaseException:
            os.close(dfd)
            atomic.rmtree_at(self.tmp_fd, staging)
            raise
        return result, dfd

    def delete(self, session_id: str) -> bool:
        """Rename the session directory into tmp/ (atomic, fsynced), then remove it there."""
        return self._remove_dir(session_id)

    def remove_remains(self, session_id: str) -> bool:
        """Remove a session directory without a manifest (a crash left it; gc's
        "incomplete session"), the same way."""
        return self._remove_dir(session_id)

    def _remove_dir(self, session_id: str) -> bool:
        path = self.layout.session_dir(session_id)
        grave = f"{ondisk.DELETED_PREFIX}{atomic.tmp_name()}"
        try:
            atomic.rename(self.sessions_fd, session_id, self.tmp_fd, grave)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(session_id, "delete session", path, exc) from exc
        if self.durable:
            try:
                atomic.sync(self.sessions_fd, "sessions-dir")
                # tmp/ too: under the strictest model a rename is durable only with both
                # directories synced, and the files are removed from the moved tree next.
                atomic.sync(self.tmp_fd, "staging")
            except OSError as exc:
                raise storage_error(session_id, "fsync sessions directory", path, exc) from exc
        # Failures leave a leftover in tmp/ that gc removes later; nothing refers to it.
        atomic.rmtree_at(self.tmp_fd, grave)
        return True

    # -- group-commit hand-off (locks/<id>.q/) -----------------------------------------

    @contextlib.contextmanager
    def queue(self, session_id: str, *, create: bool) -> Iterator[FsQueue | None]:
        """The session's hand-off queue, open for one wait or one holder's round (None:
        no queue and `create` is False)."""
        q = self._open_queue(session_id, create=create)
        try:
            yield q
        finally:
            if q is not None:
                q.close()

    def _open_queue(self, session_id: str, *, create: bool) -> FsQueue | None:
        name = ondisk.queue_dirname(session_id)
        try:
            try:
                return FsQueue(self, session_id, atomic.open_dir(name, self.locks_fd))
            except FileNotFoundError:
                if not create:
                    return None
            atomic.mkdir(self.locks_fd, name)
            return FsQueue(self, session_id, atomic.open_dir(name, self.locks_fd))
        except OSError as exc:
            path = self.layout.queue(session_id)
            raise storage_error(session_id, "open hand-off queue", path, exc) from exc

    # -- listing and maintenance ---------------------------------------------------------

    def list_sessions(self) -> list[str]:
        if self._stale():
            self._reopen()
        try:
            with _private_scandir(self.sessions_fd) as it:
                return [
                    e.name
                    for e in it
                    if e.is_dir(follow_symlinks=False) and ondisk.is_valid_session_id(e.name)
                ]
        except OSError as exc:
            raise storage_error(None, "list sessions", self.layout.sessions_dir, exc) from exc

    def list_session_files(self, session_id: str) -> list[FileStat]:
        """The entries of the session directory (manifest, journals, loops/, strays)."""
        base = self.layout.session_dir(session_id)
        sfd = self._open_session_fd(session_id)
        if sfd is None:
            return []
        try:
            return _scan(sfd, base)
        except OSError as exc:
            raise storage_error(session_id, "list session directory", base, exc) from exc
        finally:
            os.close(sfd)

    def list_blobs(self, session_id: str) -> list[FileStat]:
        """Everything in the session's loops/ (empty if the session or loops/ is gone)."""
        base = self.layout.loops_dir(session_id)
        sfd = self._open_session_fd(session_id)
        if sfd is None:
            return []
        try:
            try:
                lfd = atomic.open_dir(ondisk.LOOPS_DIR, sfd)
            except FileNotFoundError:
                return []
            try:
                return _scan(lfd, base)
            finally:
                os.close(lfd)
        except OSError as exc:
            raise storage_error(session_id, "list blobs", base, exc) from exc
        finally:
            os.close(sfd)

    def delete_blob(self, session_id: str, name: str) -> None:
        self._unlink_in(session_id, ondisk.LOOPS_DIR, name, "delete blob")

    def delete_session_file(self, session_id: str, name: str) -> None:
        self._unlink_in(session_id, None, name, "delete session file")

    def _unlink_in(self, session_id: str, sub: str | None, name: str, verb: str) -> None:
        base = self.layout.session_dir(session_id)
        path = (base / sub / name) if sub else base / name
        sfd = self._open_session_fd(session_id)
        if sfd is None:
            return
        try:
            dfd = atomic.open_dir(sub, sfd) if sub else sfd
            try:
                os.unlink(name, dir_fd=dfd)
            finally:
                if dfd != sfd:
                    os.close(dfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(session_id, verb, path, exc) from exc
        finally:
            os.close(sfd)

    def session_dir_age(self, session_id: str) -> float | None:
        try:
            st = os.stat(session_id, dir_fd=self.sessions_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(
                session_id, "stat session directory", self.layout.session_dir(session_id), exc
            ) from exc
        return time.time() - st.st_mtime

    def list_tmp(self) -> list[FileStat]:
        try:
            return _scan(self.tmp_fd, self.layout.tmp_dir)
        except OSError as exc:
            raise storage_error(None, "list tmp", self.layout.tmp_dir, exc) from exc

    def delete_tmp(self, name: str) -> None:
        """Remove a leftover in tmp/. A directory is first renamed (claimed): a writer
        may be renaming the same staging directory into sessions/ right now, and its
        files must not be removed from under the session it becomes."""
        try:
            st = os.stat(name, dir_fd=self.tmp_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if not name.startswith(ondisk.DELETED_PREFIX):
                    claimed = ondisk.DELETED_PREFIX + atomic.tmp_name()
                    atomic.rename(self.tmp_fd, name, self.tmp_fd, claimed)
                    name = claimed
                atomic.rmtree_at(self.tmp_fd, name)
            else:
                os.unlink(name, dir_fd=self.tmp_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(None, "delete tmp file", self.layout.tmp(name), exc) from exc

    def list_queue(self, session_id: str) -> list[FileStat]:
        """Hand-off files of a session (left behind by killed waiters; gc removes old ones)."""
        with self.queue(session_id, create=False) as q:
            return [] if q is None else q.files()

    def delete_queue_file(self, session_id: str, name: str) -> None:
        with self.queue(session_id, create=False) as q:
            if q is not None:
                q.remove(name)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def check_backup_destination(dest: Path, *, source: Path | None) -> None:
    """Refuse a backup destination that is (in, or around) the source store's directory,
    is not a directory, or is a non-empty directory that is not a store: a backup never
    writes into somebody's files."""
    if source is not None:
        src_real = Path(os.path.realpath(source))
        dst_real = Path(os.path.realpath(dest))
        if dst_real == src_real or src_real in dst_real.parents or dst_real in src_real.parents:
            raise StorageError(None, "backup destination overlaps the source store", path=dest)
    try:
        names = os.listdir(dest)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise StorageError(None, "backup destination is not a directory", path=dest) from None
    except OSError as exc:
        raise storage_error(None, "list backup destination", dest, exc) from exc
    if ondisk.MARKER_NAME in names:
        return
    if any(not ondisk.is_store_entry(n) for n in names):
        raise StorageError(
            None,
            "backup destination is a non-empty directory that is not a loopstore store; "
            "refusing to write into it",
            path=dest,
        )
