"""Session locks: a per-process re-entrant owner lock plus a fasteners file lock.

POSIX record locks (fasteners uses ``lockf``) belong to the *process*: threads of
one process never exclude each other through them, and closing *any* descriptor of
the lock file drops the lock. So each process keeps exactly one registry entry per
(store root, session id); the entry's condition variable decides which owner (a
thread, or an asyncio task's token) may touch the file lock, and only the outermost
release unlocks and closes it.

`lock_timeout` is one budget for both waits (the in-process owner wait and the
file-lock polling): `SessionLocked` is raised no sooner than the budget and about one
poll interval after it at most; 0 tries once. A POSIX lock has no wake-up for waiters,
so the polls start at `LOCK_FIRST_POLL_S` and double up to `lock_poll_interval`: a
short hand-off between writers costs about a millisecond, not half a poll interval,
while a long wait still polls only every `lock_poll_interval`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import fasteners  # type: ignore[import-untyped]

from loopstore.errors import SessionLocked, StorageError

LOCK_TIMEOUT_S: Final = 5.0
#: The default retry budget: long enough for a busy hot session, short enough that a
#: stuck holder is noticed.
LOCK_POLL_INTERVAL_S: Final = 0.05
#: The longest gap between file-lock attempts once a wait has backed off.
LOCK_FIRST_POLL_S: Final = 0.001
#: First gap between file-lock attempts; doubles on each miss up to the poll interval.

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

LockKey = tuple[str, str]

# Owner tokens set by the asyncio store: code running in a copied context (for
# example via asyncio.to_thread) counts as the same owner, so `async with
# store.lock(id): await store.save(...)` does not deadlock against itself.
_owner_override: contextvars.ContextVar[dict[LockKey, object] | None] = contextvars.ContextVar(
    "loopstore_lock_owner", default=None
)


class _NoFollowFileLock(fasteners.InterProcessLock):  # type: ignore[misc]
    """fasteners' lock, but the lock file is opened with O_NOFOLLOW (no symlink escape)."""

    lockfile: IO[str] | None
    acquired: bool

    def _do_open(self) -> None:
        if self.lockfile is None or self.lockfile.closed:
            fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC, 0o666
            )
            self.lockfile = os.fdopen(fd, "a")

    def _do_close(self) -> None:
        """Keep the file open between holds: reopening it cost two syscalls per commit.

        The descriptor is closed by `force_close` when the entry is evicted (or a
        release failed), never by the garbage collector (see `_drop_user`).
        """

    def force_close(self) -> None:
        """Close our only descriptor (drops the lock if held; release() failed)."""
        self.acquired = False
        if self.lockfile is not None:
            with contextlib.suppress(OSError):
                self.lockfile.close()
            self.lockfile = None


class _Entry:
    __slots__ = ("cond", "depth", "file_lock", "owner", "users")

    def __init__(self, path: Path) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.owner: object | None = None
        self.depth = 0
        self.users = 0
        self.file_lock = _NoFollowFileLock(path)


_mutex = threading.Lock()
_entries: dict[LockKey, _Entry] = {}
_idle: OrderedDict[LockKey, _Entry] = OrderedDict()
IDLE_LOCKS_KEPT: Final = 128
#: Unheld lock files kept open per process (least recently used beyond are closed): a
#: hot session's writer reuses its descriptor instead of reopening it for every commit.


def _reset_after_fork() -> None:
    """A forked child holds none of the parent's locks: start from a clean registry.

    The inherited descriptors are closed now (they hold nothing in the child), never
    later, when closing one could drop a lock the child has taken meanwhile.
    """
    global _mutex, _entries, _idle
    for entry in _entries.values():
        entry.file_lock.force_close()
    _mutex = threading.Lock()
    _entries = {}
    _idle = OrderedDict()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _current_owner(key: LockKey) -> object:
    override = _owner_override.get()
    if override is not None and key in override:
        return override[key]
    return threading.get_ident()


class LockManager:
    """Session locks of one store root with its retry budget."""

    def __init__(
        self,
        root: Path,
        lock_path: Any,
        *,
        timeout: float = LOCK_TIMEOUT_S,
        poll_interval: float = LOCK_POLL_INTERVAL_S,
    ) -> None:
        if timeout < 0:
            raise ValueError("lock_timeout must be >= 0")
        if poll_interval <= 0:
            raise ValueError("lock_poll_interval must be > 0")
        self.root_key = os.path.realpath(root)
        self._lock_path = lock_path
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)

    def key(self, session_id: str) -> LockKey:
        return (self.root_key, session_id)

    def held(self, session_id: str) -> bool:
        """True if the calling owner (thread or async token) holds this session's lock."""
        key = self.key(session_id)
        entry = _entries.get(key)
        return entry is not None and entry.owner == _current_owner(key) and entry.depth > 0

    def acquire(
        self, session_id: str, owner: object | None = None, *, deadline: float | None = None
    ) -> object:
        """Take the session lock within the budget; returns the owner token used.

        `deadline` (a time.monotonic() value) overrides now + lock_timeout, for a caller
        whose budget started earlier.
        """
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        got, why = self._take(session_id, owner, deadline)
        if got is None:
            raise self.locked_error(session_id, why)
        return got

    def try_acquire(self, session_id: str) -> object | None:
        """One attempt, no waiting: the owner token, or None if the lock is busy.

        Cheap enough to poll: no exception is built, the lock file stays open.
        """
        return self._take(session_id, None, time.monotonic())[0]

    def _take(
        self, session_id: str, owner: object | None, deadline: float
    ) -> tuple[object | None, str]:
        """The lock by `deadline`: (owner token, "") or (None, on whom the wait ended)."""
        key = self.key(session_id)
        if owner is None:
            owner = _current_owner(key)
        with _mutex:
            entry = _entries.get(key)
            if entry is None:
                entry = _entries[key] = _Entry(self._lock_path(session_id))
            entry.users += 1
            _idle.pop(key, None)
        try:
            with entry.cond:
                if entry.owner is not None and entry.owner == owner:
                    entry.depth += 1
                    return owner, ""
                while entry.owner is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._drop_user(key, entry)
                        return None, "held by another thread"
                    entry.cond.wait(remaining)
                entry.owner = owner
                entry.depth = 1
            try:
                got = self._acquire_file(entry, session_id, deadline)
            except BaseException:
                entry.file_lock.force_close()
                got = False
                raise
            finally:
                if not got:
                    with entry.cond:
                        entry.owner = None
                        entry.depth = 0
                        entry.cond.notify_all()
        except BaseException:
            self._drop_user(key, entry)
            raise
        if not got:
            self._drop_user(key, entry)
            return None, "held by another process"
        return owner, ""

    def release(self, session_id: str, owner: object | None = None) -> None:
        key = self.key(session_id)
        if owner is None:
            owner = _current_owner(key)
        entry = _entries.get(key)
        if entry is None or entry.owner != owner or entry.depth <= 0:
            raise RuntimeError(f"session lock {session_id!r} released by a non-owner")
        with entry.cond:
            entry.depth -= 1
            if entry.depth == 0:
                try:
                    entry.file_lock.release()
                except (OSError, threading.ThreadError):
                    entry.file_lock.force_close()  # closing drops the lock as well
                finally:
                    entry.owner = None
                    entry.cond.notify_all()
        self._drop_user(key, entry)

    @contextlib.contextmanager
    def hold(self, session_id: str) -> Iterator[None]:
        owner = self.acquire(session_id)
        try:
            yield
        finally:
            self.release(session_id, owner)

    def _acquire_file(self, entry: _Entry, session_id: str, deadline: float) -> bool:
        """Poll the file lock until `deadline`; False if another process kept it."""
        lock = entry.file_lock
        delay = min(LOCK_FIRST_POLL_S, self.poll_interval)
        while True:
            try:
                if lock.acquire(blocking=False):
                    return True
            except (OSError, threading.ThreadError) as exc:
                lock.force_close()
                path = self._lock_path(session_id)
                raise StorageError(session_id, f"cannot use lock file: {exc}", path=path) from exc
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, self.poll_interval)

    def locked_error(self, session_id: str, why: str) -> SessionLocked:
        """The error for a budget spent waiting (`why` says on whom)."""
        return SessionLocked(
            session_id,
            f"lock not acquired within {self.timeout:g}s ({why})",
            path=self._lock_path(session_id),
        )

    @staticmethod
    def _drop_user(key: LockKey, entry: _Entry) -> None:
        """One user fewer; an unused entry stays open (idle) until evicted, then its
        descriptor is closed at once, never left for the garbage collector (closing a
        lingering descriptor would drop a lock a later entry of this process holds)."""
        with _mutex:
            entry.users -= 1
            if entry.users > 0 or _entries.get(key) is not entry:
                return
            _idle[key] = entry
            while len(_idle) > IDLE_LOCKS_KEPT:
                old_key, old = _idle.popitem(last=False)
                del _entries[old_key]
                old.file_lock.force_close()


@contextlib.contextmanager
def owner_override(key: LockKey, token: object) -> Iterator[None]:
    """Make code in this context (and contexts copied from it) act as `token`."""
    current = _owner_override.get()
    new = dict(current) if current else {}
    new[key] = token
    reset = _owner_override.set(new)
    try:
        yield
    finally:
        _owner_override.reset(reset)
