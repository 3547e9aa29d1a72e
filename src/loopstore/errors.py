"""Every error loopstore raises on purpose.

All derive from `SessionError` and carry `.session_id` (None only for store-wide
problems such as an unsupported format), so a caller can always say *which* session
failed and *why* in one line: ``str(err)`` reads ``session 'abc': <cause>``.
"""

from __future__ import annotations

import errno
from pathlib import Path, PurePath


class SessionError(Exception):
    """Base of every loopstore error; names the session and the cause."""

    def __init__(
        self,
        session_id: str | None,
        cause: str,
        *,
        path: str | PurePath | None = None,
    ) -> None:
        self.session_id = session_id
        self.cause = cause
        # A filesystem path becomes a Path; an object-store URL stays text.
        self.path: PurePath | str | None = (
            Path(path) if isinstance(path, str) and "://" not in path else path
        )
        where = f"session {session_id!r}" if session_id is not None else "store"
        text = f"{where}: {cause}"
        if self.path is not None and str(self.path) not in cause:
            text += f" ({self.path})"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep errors picklable across multiprocessing boundaries (with any extra data).
        extra = {k: v for k, v in vars(self).items() if k not in ("session_id", "cause", "path")}
        return (_rebuild, (type(self), self.session_id, self.cause, self.path), extra)


def _rebuild(
    cls: type[SessionError], session_id: str | None, cause: str, path: PurePath | str | None
) -> SessionError:
    err = cls.__new__(cls)
    SessionError.__init__(err, session_id, cause, path=path)
    return err


class SessionNotFound(SessionError):
    """The session does not exist (never created, or deleted)."""

    def __init__(
        self,
        session_id: str | None,
        cause: str = "not found",
        *,
        path: str | PurePath | None = None,
    ) -> None:
        super().__init__(session_id, cause, path=path)


class LoopNotFound(SessionNotFound):
    """The session exists but has no loop with that loop_id."""


class SessionLocked(SessionError, TimeoutError):
    """The session lock could not be had within the retry budget (`lock_timeout`)."""


class CorruptSession(SessionError):
    """Stored data is damaged: hash mismatch, undecodable blob or manifest, missing blob."""


class InvalidSessionId(SessionError, ValueError):
    """The id cannot name a session directory (empty, too long, separator, NUL, . or ..)."""


class StorageError(SessionError):
    """An operating-system or object-store error (disk full, permission, ...).

    The original `OSError` is chained as ``__cause__``; the message names the path.
    `maybe_committed` is True when the write failed after its commit point (its record
    was written, making it durable failed): it may have taken effect, and a later read
    tells. False means the store is as it was before the call.
    """

    maybe_committed: bool = False


class UnsupportedFormat(SessionError):
    """The store on disk was written by a newer (or unknown) loopstore format."""


def storage_error(
    session_id: str | None, verb: str, path: str | PurePath | None, exc: OSError
) -> StorageError:
    """The one translation of an OSError: `cannot <verb>: <why>`, the path, the cause chained."""
    if exc.errno == errno.ELOOP:
        cause = f"cannot {verb}: refusing to follow a symlink inside the store"
    else:
        cause = f"cannot {verb}: {exc.strerror or exc}"
    err = StorageError(session_id, cause, path=path)
    err.__cause__ = exc
    return err


__all__ = [
    "CorruptSession",
    "InvalidSessionId",
    "LoopNotFound",
    "SessionError",
    "SessionLocked",
    "SessionNotFound",
    "StorageError",
    "UnsupportedFormat",
    "storage_error",
]
