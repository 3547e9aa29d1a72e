"""Fault-injection points: the one place where tests and the stress suite break the store.

Every fsync the store issues names its *sync point* (below). A point listed in the
environment variable ``LOOPSTORE_SKIP_FSYNC`` (comma separated; ``all`` for every point)
is skipped, in every process that imports loopstore with that environment, so a
power-loss test can show that removing that one fsync loses acknowledged data. The
``skipping`` context manager does the same inside one process.

Error injection uses the seams of `loopstore.atomic` (`write_all`, `fsync`, `rename`):
a test rebinds them to raise OSError; every store write goes through them.

`observe_lock_waits` is the one observation point: the stress suite times how long
each call waited for its session (the lock, or a group-commit holder) through it.

Nothing here is for production use: with the variable unset, every fsync runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Final

SKIP_FSYNC_ENV: Final = "LOOPSTORE_SKIP_FSYNC"
"""Environment variable naming sync points to skip (comma separated, or ``all``)."""

SYNC_POINTS: Final = {
    "journal": "fdatasync of a session journal after a record is appended (the commit point)",
    "blob": "fsync of a loop blob file before it is renamed into loops/",
    "loops-dir": "fsync of a session's loops/ directory after blobs are renamed into it",
    "manifest": "fsync of a new checkpoint manifest before it replaces manifest.json",
    "session-dir": "fsync of a session directory after its manifest or journal changed name",
    "sessions-dir": "fsync of sessions/ after a session directory was created or removed",
    "store-dir": "fsync of the store root (and new parents) when the store is opened or created",
    "staging": "fsync of a file staged in tmp/ (a new session's first files, a backup copy)",
}
"""Every sync point, with what it makes durable."""


def _parse(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    names = {part.strip() for part in value.split(",") if part.strip()}
    if "all" in names:
        return frozenset(SYNC_POINTS)
    unknown = names - SYNC_POINTS.keys()
    if unknown:
        raise ValueError(
            f"{SKIP_FSYNC_ENV} names unknown sync points {sorted(unknown)}; "
            f"known: {', '.join(SYNC_POINTS)}"
        )
    return frozenset(names)


_skipped: frozenset[str] = _parse(os.environ.get(SKIP_FSYNC_ENV))


def should_sync(point: str) -> bool:
    """False if the sync point `point` is switched off for fault injection."""
    return point not in _skipped


@contextlib.contextmanager
def skipping(*points: str) -> Iterator[None]:
    """Skip these sync points inside the block (this process only)."""
    global _skipped
    before = _skipped
    _skipped = before | _parse(",".join(points))
    try:
        yield
    finally:
        _skipped = before


LockWaitObserver = Callable[[str, float], None]
_lock_wait_observer: LockWaitObserver | None = None


def observe_lock_waits(observer: LockWaitObserver | None) -> None:
    """Call `observer(session_id, seconds)` after every wait for a session (None: stop)."""
    global _lock_wait_observer
    _lock_wait_observer = observer


def note_lock_wait(session_id: str, seconds: float) -> None:
    observer = _lock_wait_observer
    if observer is not None:
        observer(session_id, seconds)
