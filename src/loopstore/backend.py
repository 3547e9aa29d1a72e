"""The one interface between the store's commit logic and storage (docs/FORMAT.md).

`Backend` is what a store needs from a place that keeps sessions: open a session,
create one as a single atomic publication, delete one, list, and maintain. A
`SessionHandle` is one call's view of one session: its checkpoint, its journal frames,
its blobs, and (for the writer that holds the session) the commit and checkpoint steps.

Two implementations sit side by side: `loopstore.fsbackend` (a local directory,
session locks, group commit through hand-off files) and `loopstore.s3backend`
(S3-compatible object storage, compare-and-swap commits, no locks). The store code
(`loopstore.store`) is the same for both; `maintenance`, `backup` and the CLI reach
storage only through these methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Protocol

from loopstore import journal, ondisk
from loopstore.catalog import Catalog
from loopstore.locking import LockManager


@dataclass(frozen=True)
class FileStat:
    """A stored file or object as gc, verify and stats see it; `age_s` counts from mtime."""

    name: str
    path: PurePath | str
    size: int
    age_s: float
    kind: str = "file"
    #: "file", "dir" or "other" (a symlink, a device: never ours)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


@dataclass(frozen=True)
class JournalRead:
    """Frames read from a journal: the good ones from the cursor on, and where they end.

    `size` is how far the journal goes; bytes between `end` and `size` are a torn
    tail (never acknowledged), cut by the next writer.
    """

    frames: list[journal.Frame]
    end: int
    size: int


class CommitConflict(Exception):
    """Another writer committed this sequence number first (object stores): re-read, retry."""


class SessionHandle(Protocol):
    session_id: str

    def manifest_id(self) -> bytes | None: ...

    def manifest(self) -> tuple[bytes, bytes] | None: ...

    def read_frames(
        self, generation: int, cursor: int, *, for_write: bool = False
    ) -> JournalRead | None: ...

    def payload(self, generation: int, span: journal.BlobSpan) -> bytes: ...

    def blob(self, digest: str) -> bytes: ...

    def blob_size(self, digest: str) -> int | None: ...

    def make_durable(self, generation: int) -> None: ...

    def commit(
        self, generation: int, at: int, frame: bytes, *, seal_dirs: bool, torn: bool
    ) -> tuple[int, int]: ...

    def materialize(
        self,
        blobs: Sequence[ondisk.EncodedBlob],
        *,
        links: Mapping[str, Path] | None = None,
        force: Collection[str] = (),
    ) -> tuple[list[str], list[str]]: ...

    def blob_identity(self, digest: str) -> tuple[int, int] | None: ...

    def blob_path(self, digest: str) -> PurePath | str: ...

    def checkpoint(
        self, manifest: bytes, old_generation: int, new_generation: int
    ) -> tuple[bytes, int]: ...


class HandoffQueue(Protocol):
    """One session's group-commit hand-off queue (see `fsbackend.FsQueue`)."""

    def deposit(self, token: str, data: bytes) -> None: ...

    def withdraw(self, token: str) -> bool: ...

    def outcome(self, token: str) -> bytes | None: ...

    def claim(self, limit_bytes: int) -> tuple[list[bytes], list[bytes]]: ...

    def requeue(self, token: str) -> None: ...

    def post(self, token: str, error: bytes | None) -> None: ...

    def doorbell(self, token: str) -> contextlib.AbstractContextManager[Doorbell | None]: ...

    def ring(self, token: str) -> None: ...

    def ring_oldest(self) -> None: ...


class Doorbell(Protocol):
    def wait(self, timeout: float) -> None: ...


class Backend(Protocol):
    durable: bool
    locks: LockManager
    format_version: int

    @property
    def catalog(self) -> Catalog | None:
        """The listing catalog, None where listings read every session."""
        ...

    @property
    def handoff(self) -> bool:
        """Whether waiting appends can be handed to the lock holder (group commit)."""
        ...

    @property
    def location(self) -> str: ...

    def session(
        self, session_id: str
    ) -> contextlib.AbstractContextManager[SessionHandle | None]: ...

    def has_manifest(self, session_id: str) -> bool: ...

    def create(self, session_id: str, manifest: bytes, first: bytes) -> None: ...

    def install(
        self,
        session_id: str,
        manifest: bytes,
        generation: int,
        blobs: Sequence[ondisk.EncodedBlob],
        links: Mapping[str, Path],
    ) -> tuple[list[str], list[str]]: ...

    def delete(self, session_id: str) -> bool: ...

    def remove_remains(self, session_id: str) -> bool: ...

    def list_sessions(self) -> list[str]: ...

    # group commit hand-off (backends with `handoff`)
    def queue(
        self, session_id: str, *, create: bool
    ) -> contextlib.AbstractContextManager[HandoffQueue | None]: ...

    # maintenance
    def list_session_files(self, session_id: str) -> list[FileStat]: ...

    def list_blobs(self, session_id: str) -> list[FileStat]: ...

    def delete_blob(self, session_id: str, name: str) -> None: ...

    def delete_session_file(self, session_id: str, name: str) -> None: ...

    def session_dir_age(self, session_id: str) -> float | None: ...

    def list_tmp(self) -> list[FileStat]: ...

    def delete_tmp(self, name: str) -> None: ...

    def list_queue(self, session_id: str) -> list[FileStat]: ...

    def delete_queue_file(self, session_id: str, name: str) -> None: ...

    def close(self) -> None: ...
