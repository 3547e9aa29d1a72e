"""Consistent, incremental backups of a live store, between any two stores.

Why not just copy the directory: a session's state is its checkpoint plus its journal,
and a tree walker (``cp -r``, ``rsync -a``) may copy them from different moments.
`backup` copies one durable state per session instead:

1. read the source session lock-free, exactly as readers do (checkpoint + journal,
   made durable first if no sync mark vouches for it);
2. check every blob that state names against its hash (decompress, xxh3-128): a
   damaged blob is never copied; the session is reported and the destination keeps
   its previous good version;
3. under the destination's session lock, put the blobs the destination lacks
   (hard-linked when both stores share a filesystem and `link` is on, else copied),
   then publish the state there at rest: a checkpoint with an empty journal.

Every destination session is a state its source session had. `dest` is itself a store:
restoring is opening it (or backing it up the other way). Sessions are taken one at a
time: each is a committed state, the set is not one instant of the whole store.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, TypeVar

from loopstore import journal, locations, ondisk
from loopstore.backend import CommitConflict, SessionHandle
from loopstore.errors import SessionError, SessionNotFound, StorageError
from loopstore.fsbackend import FileSystemBackend, check_backup_destination
from loopstore.journal import Change
from loopstore.reports import VerifyReport
from loopstore.store import READ_RETRIES, FileSystemSessionStore, SessionStore

DEST_LOCK_TIMEOUT_S: Final = 60.0
#: How long a backup waits for a destination session another backup is writing.
BACKUP_THREADS: Final = 4
#: Sessions copied at once: their fsyncs (or an object store's round trips) overlap.

ProgressFn = Callable[[int, int], None]
T = TypeVar("T")


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class BackupFailure:
    """A source session that could not be backed up this run (dest keeps its old copy)."""

    session_id: str
    reason: str


@dataclass
class _Tally:
    """Blob counts: one session's (sessions run on several threads), summed in the report."""

    files_linked: int = 0
    bytes_linked: int = 0
    files_copied: int = 0
    bytes_copied: int = 0
    files_skipped: int = 0
    bytes_skipped: int = 0
    blobs_verified: int = 0

    def add_to(self, total: _Tally) -> None:
        for f in fields(_Tally):
            setattr(total, f.name, getattr(total, f.name) + getattr(self, f.name))


@dataclass(kw_only=True)
class BackupReport(_Tally):
    """What one backup run did; bytes are stored (compressed) blob sizes."""

    source: str
    dest: str
    mode: str = "link"
    sessions: int = 0
    sessions_updated: int = 0
    sessions_unchanged: int = 0
    sessions_vanished: int = 0
    sessions_removed: int = 0
    failed: list[BackupFailure] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `loopstore backup --json`)."""
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc


@dataclass
class BackupVerifyReport:
    """A backup checked against its live source.

    `current`: the same state as the source (header and loop index); `behind`: an
    older state (the source committed since); `missing`: in the source, not in the
    backup; `extra`: in the backup, not in the source (deleted since, or kept with
    prune=False); `diverged`: differs and is not older, so not a state the source had;
    `source_unreadable`: the source session is damaged (the backup holds its last good
    state: restore from it). `ok` is dest.verify() clean and nothing diverged;
    `in_sync` also needs no behind/missing/extra/unreadable session.
    """

    source: str
    dest: str
    dest_report: VerifyReport
    sessions_checked: int = 0
    current: list[str] = field(default_factory=list)
    behind: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    source_unreadable: list[BackupFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.dest_report.ok and not self.diverged

    @property
    def in_sync(self) -> bool:
        return self.ok and not (self.behind or self.missing or self.extra or self.source_unreadable)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "ok": self.ok,
            "in_sync": self.in_sync,
            "sessions_checked": self.sessions_checked,
            "current": list(self.current),
            "behind": list(self.behind),
            "missing": list(self.missing),
            "extra": list(self.extra),
            "diverged": list(self.diverged),
            "source_unreadable": [asdict(f) for f in self.source_unreadable],
            "problems": [
                {
                    "session_id": p.session_id,
                    "path": str(p.path),
                    "kind": p.kind,
                    "detail": p.detail,
                }
                for p in self.dest_report.problems
            ],
            "orphans": len(self.dest_report.orphans),
        }


# --------------------------------------------------------------------------- internals


class _Damaged(Exception):
    """A source blob does not match its name: the session is not backed up."""


class _Stale(Exception):
    """The source committed after the backup read it, or (an object store, whose lock
    is per process) another process wrote the destination session first: read both
    again. A backup never publishes an older state than the source had."""


class _Vanished(Exception):
    """A blob the source state names is gone: a newer state (folded, collected) or damage."""

    def __init__(self, version: tuple[int, int], loop_id: str) -> None:
        super().__init__(loop_id)
        self.version = version
        self.loop_id = loop_id


@dataclass
class _Run:
    src: SessionStore
    dst: SessionStore
    report: BackupReport
    link: bool
    copy_only: bool
    check: bool


def _same(a: journal.SessionState, b: journal.SessionState) -> bool:
    """Same session content: header and loop index (generations differ between stores)."""
    return dict(a.header) == dict(b.header) and [(e.loop_id, e.blob) for e in a.entries] == [
        (e.loop_id, e.blob) for e in b.entries
    ]


def _source_blobs(
    run: _Run, tally: _Tally, h: SessionHandle, state: journal.SessionState
) -> tuple[list[ondisk.EncodedBlob], dict[str, Path]]:
    """Every blob the state names, hash-checked; where linking is possible, the source file."""
    sid = state.session_id
    out: list[ondisk.EncodedBlob] = []
    links: dict[str, Path] = {}
    gen = state.checkpoint_generation
    for e in {e.blob: e for e in state.entries}.values():
        span = state.journal_blobs.get(e.blob)
        try:
            data = h.payload(gen, span) if span is not None else h.blob(e.blob)
        except FileNotFoundError:
            raise _Vanished((state.generation, gen), e.loop_id) from None
        try:
            ondisk.decode_blob(
                data, e.blob, session_id=sid, path=None, expected_raw_size=e.raw_size
            )
        except ondisk.DamagedBlob as exc:
            where = h.blob_path(e.blob) if span is None else "its journal"
            raise _Damaged(f"damaged blob of loop {e.loop_id!r} ({where}): {exc.cause}") from None
        tally.blobs_verified += 1
        out.append(ondisk.EncodedBlob(e.blob, e.raw_size, data))
        if span is None and run.link:
            links[e.blob] = Path(h.blob_path(e.blob))
    return out, links


def _backup_session(run: _Run, sid: str, tally: _Tally) -> str:
    """One session: 'updated', 'unchanged' or 'vanished'; raises _Damaged.

    A blob that vanished under the read is a newer state (a fold and gc since): the
    source is read again, as readers do; the same state missing it twice is damage.
    """
    last: tuple[int, int] | None = None
    for _attempt in range(READ_RETRIES):
        try:
            return _backup_state(run, sid, tally)
        except _Stale:
            continue
        except _Vanished as exc:
            if exc.version == last:
                raise _Damaged(f"source is missing the blob of loop {exc.loop_id!r}") from None
            last = exc.version
    raise _Damaged(f"source session kept changing; gave up after {READ_RETRIES} reads")


def _check_current(src: SessionStore, h: SessionHandle, state: journal.SessionState) -> None:
    """Under the destination's lock, just before publishing: the source still holds
    `state`. Two backups into one destination then never publish an older state over
    a newer one (each publishes what the source had while it held the lock)."""
    now = src.read_state(h)
    if now is None or (now.state.generation, now.state.committed_at_ns) != (
        state.generation,
        state.committed_at_ns,
    ):
        raise _Stale


def _backup_state(run: _Run, sid: str, tally: _Tally) -> str:
    """Copy the source session's current durable state into dest (under dest's lock)."""
    src, dst = run.src, run.dst
    with src.backend.session(sid) as h:
        r = src.read_state(h) if h is not None else None
        if h is None or r is None:
            return "vanished"
        if not r.sealed:
            h.make_durable(r.state.checkpoint_generation)
        state = r.state
        sizes = {e.blob: e.stored_size for e in state.entries}
        with dst.lock(sid), dst.backend.session(sid) as dh:
            unreadable = False
            try:
                dr = dst.read_state(dh, fresh=True) if dh is not None else None
            except SessionError:
                dr, unreadable = None, True  # a damaged copy is simply replaced
            if dh is None or dr is None:
                blobs, links = _source_blobs(run, tally, h, state)
                _check_current(src, h, state)
                try:
                    linked, written = dst._install(state, blobs, links)
                except CommitConflict:
                    if not unreadable:  # another process published it (object store)
                        raise _Stale from None
                    raise _Damaged(
                        "DEST holds a copy of this session that cannot be read and is not "
                        "replaced in place on this store: delete it there "
                        "and back up again"
                    ) from None
            else:
                have = {d for d in sizes if dh.blob_size(d) == sizes[d]}
                force = {d for d in have if run.copy_only and _shared(h, dh, d)}
                if _same(state, dr.state) and len(have) == len(sizes) and not force:
                    if run.check:
                        _source_blobs(run, tally, h, state)
                    tally.files_skipped += len(sizes)
                    tally.bytes_skipped += sum(sizes.values())
                    return "unchanged"
                blobs, links = _source_blobs(run, tally, h, state)
                _check_current(src, h, state)
                todo = [b for b in blobs if b.digest not in have or b.digest in force]
                linked, written = dh.materialize(todo, links=links, force=force)
                tally.files_skipped += len(blobs) - len(todo)
                tally.bytes_skipped += sum(sizes[d] for d in have - force)
                change = Change(dr.state)
                change.set_header(state.header)
                change.set_loops(state.entries, {})
                if not change.empty:
                    try:
                        done = dst._commit(sid, dh, dr, change, at_ns=state.committed_at_ns)
                    except CommitConflict:  # another process committed first (object store)
                        raise _Stale from None
                    with contextlib.suppress(CommitConflict):  # folded by another: as good
                        dst._fold(dh, done)
    tally.files_linked += len(linked)
    tally.bytes_linked += sum(sizes[d] for d in linked)
    tally.files_copied += len(written)
    tally.bytes_copied += sum(sizes[d] for d in written)
    return "updated"


def _one_session(run: _Run, sid: str) -> tuple[str, _Tally, BackupFailure | None]:
    """One session's outcome, counts and failure (a worker thread's unit of work)."""
    tally = _Tally()
    try:
        return _backup_session(run, sid, tally), tally, None
    except _Damaged as exc:
        return "failed", tally, BackupFailure(sid, str(exc))
    except SessionError as exc:
        return "failed", tally, BackupFailure(sid, exc.cause)


def _in_order(fn: Callable[[str], T], items: Sequence[str], threads: int) -> Iterator[T]:
    """fn over items on `threads` threads, results in order, at most 4 x threads in
    flight (a store of 100,000 sessions is not queued at once)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[T]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _shared(h: SessionHandle, dh: SessionHandle, digest: str) -> bool:
    a, b = h.blob_identity(digest), dh.blob_identity(digest)
    return a is not None and a == b


def _prune(run: _Run, keep: set[str]) -> None:
    """Remove dest sessions the source no longer has."""
    for sid in sorted(run.dst.backend.list_sessions()):
        if sid in keep or run.src.backend.has_manifest(sid):
            continue
        try:
            run.dst.delete(sid)
            run.report.sessions_removed += 1
        except SessionNotFound:
            continue
        except SessionError as exc:
            run.report.failed.append(BackupFailure(sid, f"not pruned: {exc.cause}"))


def _fs_root(store: SessionStore) -> Path | None:
    backend = store.backend
    return backend.layout.root if isinstance(backend, FileSystemBackend) else None


def open_dest(store: SessionStore, dest: str | os.PathLike[str] | SessionStore) -> SessionStore:
    """The destination store: a store object is used as it is, a URL opened, a directory
    checked (see `check_backup_destination`) and made a store."""
    if isinstance(dest, SessionStore):
        root, source = _fs_root(dest), _fs_root(store)
        if dest is store or dest.location == store.location:
            raise StorageError(None, "backup destination overlaps the source store", path=None)
        if root is not None and source is not None:
            check_backup_destination(root, source=source)
        return dest
    if locations.is_url(dest):
        return locations.open_store(dest, lock_timeout=DEST_LOCK_TIMEOUT_S)
    path = locations.local_path(dest)
    check_backup_destination(path, source=_fs_root(store))
    return FileSystemSessionStore(path, lock_timeout=DEST_LOCK_TIMEOUT_S)


# --------------------------------------------------------------------------- API


def backup(
    store: SessionStore,
    dest: str | os.PathLike[str] | SessionStore,
    *,
    prune: bool = True,
    progress: ProgressFn | None = None,
    link: bool = True,
    check: bool = False,
) -> BackupReport:
    """Make (or bring up to date) a consistent backup of `store` in `dest`.

    `dest` is a directory (made a store of its own), a store URL or a store. Only
    blobs `dest` lacks are linked or copied and only changed sessions written.
    prune=True (the default) makes `dest` a mirror: sessions deleted in the source are
    removed. prune=False never removes anything (a deleted session stays restorable).
    link=False always copies: the backup then shares no inode with the source, also
    for blobs an earlier linking backup left there. `progress(done, total)` counts
    source sessions. A session whose blobs fail their hash check is reported in
    `failed` and keeps its previous copy in `dest`.

    Every blob of a changed session is hash-checked before anything names it in dest;
    an unchanged session costs a stat per blob (a blob dest lost is copied again).
    check=True also hash-checks the unchanged sessions' source blobs: a full read of
    the source that reports bit rot a session with no new commit would carry unseen
    (`loopstore verify` on the source finds it too).
    """
    started = time.monotonic()
    dst = open_dest(store, dest)
    both_fs = isinstance(store.backend, FileSystemBackend) and isinstance(
        dst.backend, FileSystemBackend
    )
    report = BackupReport(source=store.location, dest=dst.location)
    report.mode = "link" if link and both_fs else "copy"
    run = _Run(store, dst, report, link and both_fs, not link, check)
    try:
        ids = sorted(store.backend.list_sessions())
        total = len(ids)
        if progress is not None:
            progress(0, total)
        seen: set[str] = set()
        results = _in_order(lambda sid: _one_session(run, sid), ids, BACKUP_THREADS)
        for done, (sid, (outcome, tally, failure)) in enumerate(zip(ids, results, strict=True), 1):
            tally.add_to(report)
            if failure is not None:
                report.failed.append(failure)
            if outcome != "vanished":
                seen.add(sid)
            if outcome == "updated":
                report.sessions += 1
                report.sessions_updated += 1
            elif outcome == "unchanged":
                report.sessions += 1
                report.sessions_unchanged += 1
            elif outcome == "vanished":
                report.sessions_vanished += 1
            if progress is not None:
                progress(done, total)
        if prune:
            _prune(run, seen)
    finally:
        if dst is not dest:
            dst.close()
    report.duration_s = time.monotonic() - started
    return report


def verify_backup(
    store: SessionStore,
    dest: str | os.PathLike[str] | SessionStore,
    *,
    progress: ProgressFn | None = None,
) -> BackupVerifyReport:
    """Check `dest` on its own (verify()) and against the live source, session by session."""
    if not isinstance(dest, SessionStore) and not locations.store_exists(dest):
        raise StorageError(None, "no loopstore backup here (no store marker)", path=os.fspath(dest))
    dst = open_dest(store, dest)
    try:
        report = BackupVerifyReport(store.location, dst.location, dst.verify(progress=progress))
        dest_ids = sorted(dst.backend.list_sessions())
        for sid in dest_ids:
            try:
                d = dst.session_state(sid)
            except SessionError:
                continue  # verify() reported it (or it is incomplete)
            report.sessions_checked += 1
            try:
                s = store.session_state(sid)
            except SessionNotFound:
                report.extra.append(sid)
                continue
            except SessionError as exc:
                report.source_unreadable.append(BackupFailure(sid, exc.cause))
                continue
            if _same(d, s):
                report.current.append(sid)
            elif d.committed_at_ns < s.committed_at_ns:
                report.behind.append(sid)
            else:
                report.diverged.append(sid)
        present = set(report.current + report.behind + report.diverged + report.extra)
        present.update(f.session_id for f in report.source_unreadable)
        for sid in sorted(store.backend.list_sessions()):
            if sid not in present and store.backend.has_manifest(sid):
                report.missing.append(sid)
        return report
    finally:
        if dst is not dest:
            dst.close()


__all__ = [
    "DEST_LOCK_TIMEOUT_S",
    "BackupFailure",
    "BackupReport",
    "BackupVerifyReport",
    "backup",
    "verify_backup",
]
