"""Store-wide work: verify, gc, stats and legacy import, through the backend interface.

Each goes session by session and never stops at a broken one: a session that cannot be
read (a permission, a symlink planted in the store, a damaged checkpoint) is reported
by name and cause, and the others are still done. Memory stays bounded by one session.
The models (and pydantic) are imported on first use, so that `stats` starts fast.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from loopstore import journal, ondisk
from loopstore.backend import FileStat, SessionHandle
from loopstore.catalog import CatalogUnusable
from loopstore.errors import (
    InvalidSessionId,
    SessionError,
    SessionLocked,
    SessionNotFound,
    StorageError,
)
from loopstore.reports import (
    GcReport,
    ImportFailure,
    ImportReport,
    MigrateReport,
    Orphan,
    Problem,
    StoreStats,
    VerifyReport,
)
from loopstore.store import (
    GC_GRACE_S,
    HANDOFF_STALE_S,
    READ_RETRIES,
    SessionStore,
    StateRead,
    decode_loops,
    first_error,
)

if TYPE_CHECKING:
    from loopstore.models import Session

ProgressFn = Callable[[int, int], None]


VERIFY_PARALLEL_MIN_SESSIONS: Final = 2_000
#: Fewer sessions are checked in this process: a spawned worker takes ~0.3 s to start.
VERIFY_CHUNK: Final = 250
#: Sessions per task (and per progress step).


def grace_seconds(grace: float | timedelta) -> float:
    """A grace period in seconds (a timedelta is accepted too)."""
    seconds = grace.total_seconds() if isinstance(grace, timedelta) else float(grace)
    if seconds < 0:
        raise ValueError("grace must be >= 0")
    return seconds


def _problem_kind(err: SessionError) -> str:
    if isinstance(err, ondisk.DamagedBlob):
        return err.kind
    if isinstance(err, (StorageError, SessionLocked)):
        return "unreadable"
    if "journal" in err.cause:
        return "bad_journal"
    return "bad_manifest"


def _problem(err: SessionError, session_id: str) -> Problem:
    return Problem(err.session_id or session_id, err.path, _problem_kind(err), err.cause)


def _ids(store: SessionStore, session_id: str | None) -> list[str]:
    if session_id is not None:
        return [ondisk.validate_session_id(session_id)]
    return sorted(store.backend.list_sessions())


def _session_files(store: SessionStore, sid: str, r: StateRead) -> Iterator[Orphan]:
    """Files of a session that its state does not name (any age)."""
    b = store.backend
    referenced = {ondisk.blob_filename(d) for d in r.state.blobs}
    for f in b.list_blobs(sid):
        if f.name not in referenced:
            kind = "orphan_blob" if ondisk.is_blob_name(f.name) else "stray_file"
            yield Orphan(sid, f.path, kind, f.size, f.age_s)
    current = ondisk.journal_filename(r.state.checkpoint_generation)
    torn = (store._path(sid, current), r.torn) if r.torn else None
    for f in b.list_session_files(sid):
        if f.name in (ondisk.MANIFEST_NAME, ondisk.LOOPS_DIR, current):
            continue
        seq = ondisk.record_seq(f.name)  # an object store's record, log/<seq>.rec
        if seq is not None and seq > r.state.checkpoint_generation:
            if torn is not None and seq == r.state.generation + 1:
                torn = (f.path, f.size)  # the torn record itself
            continue  # live: after the checkpoint
        stale = seq is not None or ondisk.journal_generation(f.name) is not None
        yield Orphan(sid, f.path, "stale_journal" if stale else "stray_file", f.size, f.age_s)
    if torn is not None:
        yield Orphan(sid, torn[0], "torn_tail", torn[1], 0.0)
    for f in b.list_queue(sid):
        if f.age_s >= HANDOFF_STALE_S:
            yield Orphan(sid, f.path, "stale_handoff", f.size, f.age_s)


# --------------------------------------------------------------------------- verify


def verify(
    store: SessionStore,
    session_id: str | None = None,
    *,
    progress: ProgressFn | None = None,
    deep: bool = False,
    grace: float | timedelta = GC_GRACE_S,
    processes: int = 1,
) -> VerifyReport:
    """Check every checkpoint, journal record and blob hash (`deep`: also the models).

    `processes` > 1: a store of VERIFY_PARALLEL_MIN_SESSIONS or more is checked by that
    many spawned worker processes (at most the CPU count), in chunks; the report is the
    same, in the same order. Spawning re-imports the caller's main module, so it is
    for programs whose main module is import-safe (the command line passes 2).

    Takes no lock, so it never blocks writers; a blob that vanished is re-checked
    against a fresh state before it is reported. A session's orphans are listed whatever
    their age, tmp files only once older than `grace` (younger ones are in flight).
    """
    grace_s = grace_seconds(grace)
    report = VerifyReport()
    ids = _ids(store, session_id)
    if session_id is not None and not store.backend.has_manifest(ids[0]):
        raise SessionNotFound(ids[0], path=store._path(ids[0]))
    total = len(ids)
    chunks = [ids[i : i + VERIFY_CHUNK] for i in range(0, total, VERIFY_CHUNK)]
    done = 0
    seen: dict[str, tuple[int, int]] = {}
    for part, versions in _verify_parts(store, chunks, deep, processes):
        seen.update(versions)
        report.problems += part.problems
        report.orphans += part.orphans
        report.sessions_checked += part.sessions_checked
        report.blobs_checked += part.blobs_checked
        report.journal_records += part.journal_records
        done += part.sessions_checked
        if progress is not None:
            progress(done, total)
    if session_id is None:
        for f in store.backend.list_tmp():
            if f.age_s >= grace_s:
                report.orphans.append(Orphan(None, f.path, "stale_tmp", f.size, f.age_s))
        _verify_catalog(store, ids, seen, report)
    return report


_Versions = dict[str, tuple[int, int]]
"""(generation, committed_at_ns) of each session a check read."""


def _verify_parts(
    store: SessionStore, chunks: list[list[str]], deep: bool, processes: int
) -> Iterator[tuple[VerifyReport, _Versions]]:
    """Each chunk's report, in order: from worker processes for a big store (a
    session's check is Python work: parse, decompress, hash), else here."""
    processes = min(processes, multiprocessing.cpu_count())
    if processes < 2 or sum(map(len, chunks)) < VERIFY_PARALLEL_MIN_SESSIONS:
        for chunk in chunks:
            yield _verify_chunk(store, chunk, deep)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [pool.submit(_verify_chunk, store, chunk, deep) for chunk in chunks]
        for future in futures:
            yield future.result()


def _verify_chunk(
    store: SessionStore, ids: list[str], deep: bool
) -> tuple[VerifyReport, _Versions]:
    report = VerifyReport()
    versions: _Versions = {}
    for sid in ids:
        try:
            _verify_session(store, sid, report, versions, deep=deep)
        except SessionError as exc:
            report.problems.append(_problem(exc, sid))
        report.sessions_checked += 1
    return report, versions


def _verify_catalog(
    store: SessionStore, ids: list[str], seen: _Versions, report: VerifyReport
) -> None:
    """The listing catalog against the sessions; if they disagree, it is rebuilt.

    Compared in bulk with the versions the session checks read (`seen`); a session
    marked pending (a commit in flight, or not yet refreshed) is skipped: a listing
    refreshes it before it answers. A disagreement is checked again a few times before
    it counts, since writers and listers move on while this runs.
    """
    catalog = store.backend.catalog
    if catalog is None or not catalog.usable():
        return  # none yet, or from an earlier boot: the next listing rebuilds it

    def agrees(sid: str) -> bool:
        for _attempt in range(READ_RETRIES):
            if sid in set(catalog.marked()):
                return True
            listed = catalog.entry(sid)
            try:
                state = store.session_state(sid)
                actual: tuple[int, int] | None = (state.generation, state.committed_at_ns)
            except SessionNotFound:
                actual = None
            except SessionError:
                return True  # damaged: reported by the session check, not here
            if listed == actual and catalog.entry(sid) == listed:
                return True
        return False

    try:
        marked = set(catalog.marked())
        listed = catalog.entries()
        suspects = [s for s in ids if s in seen and listed.get(s) != seen[s]]
        suspects += [s for s in listed if s not in seen]
        wrong = [s for s in suspects if s not in marked and not agrees(s)]
    except CatalogUnusable as exc:
        report.problems.append(Problem(None, catalog.path, "catalog", f"unreadable: {exc}"))
        store.reindex()
        return
    if wrong:
        shown = ", ".join(repr(w) for w in wrong[:5]) + (" ..." if len(wrong) > 5 else "")
        detail = f"{len(wrong)} session(s) listed wrongly ({shown}); rebuilt from the sessions"
        report.problems.append(Problem(None, catalog.path, "catalog", detail))
        store.reindex()


def _verify_session(
    store: SessionStore, sid: str, report: VerifyReport, versions: _Versions, *, deep: bool
) -> None:
    b = store.backend
    for _attempt in range(READ_RETRIES):
        with b.session(sid) as h:
            if h is None:
                return  # deleted while we looked
            r = store.read_state(h, fresh=True)
            if r is None:
                age = b.session_dir_age(sid)
                if age is not None:
                    report.orphans.append(
                        Orphan(sid, store._path(sid), "incomplete_session", 0, age)
                    )
                return
            problems, vanished, checked = _check_blobs(store, h, r, deep=deep)
        if vanished:
            with b.session(sid) as h2:
                again = store.read_state(h2, fresh=True) if h2 is not None else None
            if again is None:
                return
            if again.state.generation != r.state.generation or again.tail != r.tail:
                continue  # rewritten while we looked: check the new state
        report.problems.extend(problems)
        report.blobs_checked += checked
        report.journal_records += r.state.records
        versions[sid] = (r.state.generation, r.state.committed_at_ns)
        report.orphans.extend(_session_files(store, sid, r))
        return
    report.problems.append(
        Problem(sid, store._path(sid), "unreadable", f"kept changing over {READ_RETRIES} reads")
    )


def _check_blobs(
    store: SessionStore, h: SessionHandle, r: StateRead, *, deep: bool
) -> tuple[list[Problem], bool, int]:
    sid = h.session_id
    state = r.state
    gen = state.checkpoint_generation
    problems: list[Problem] = []
    vanished = False
    checked = 0
    unique = {e.blob: e for e in state.entries}
    for e in unique.values():
        span = state.journal_blobs.get(e.blob)
        where = (
            ondisk.journal_filename(gen)
            if span is not None
            else f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(e.blob)}"
        )
        path = store._path(sid, where)
        checked += 1
        try:
            data = h.payload(gen, span) if span is not None else h.blob(e.blob)
        except FileNotFoundError:
            vanished = True
            problems.append(Problem(sid, path, "missing_blob", f"loop {e.loop_id!r}"))
            continue
        try:
            raw = ondisk.decode_blob(
                data, e.blob, session_id=sid, path=None, expected_raw_size=e.raw_size
            )
        except ondisk.DamagedBlob as exc:
            problems.append(Problem(sid, path, exc.kind, exc.cause))
            continue
        if deep:
            import pydantic

            try:
                loop = decode_loops([raw])[0]
            except pydantic.ValidationError as exc:
                problems.append(Problem(sid, path, "undecodable", first_error(exc)))
                continue
            if loop.loop_id != e.loop_id:
                problems.append(
                    Problem(
                        sid,
                        path,
                        "undecodable",
                        f"blob holds loop {loop.loop_id!r}, not {e.loop_id!r}",
                    )
                )
    return problems, vanished, checked


# --------------------------------------------------------------------------- gc


def gc(
    store: SessionStore,
    grace: float | timedelta,
    *,
    progress: ProgressFn | None = None,
    dry_run: bool = False,
) -> GcReport:
    """Remove what nothing names and is older than `grace`: blobs, old journals, hand-off
    leftovers, sessions that never got a manifest, tmp files.

    Each session is handled under its lock with a fresh state, so a writer never loses a
    blob it is about to name; readers that lose one re-read. A session that cannot be
    read or locked is reported and left alone. `dry_run` counts and removes nothing.
    """
    grace_s = grace_seconds(grace)
    b = store.backend
    report = GcReport()
    ids = sorted(b.list_sessions())
    total = len(ids) + 1
    for done, sid in enumerate(ids, 1):
        report.sessions_scanned += 1
        try:
            with store.lock(sid):
                _gc_session(store, sid, grace_s, report, dry_run)
        except SessionError as exc:
            report.sessions_skipped += 1
            report.problems.append(_problem(exc, sid))
        if progress is not None:
            progress(done, total)
    for f in b.list_tmp():
        if f.age_s < grace_s:
            report.kept_young += 1
            continue
        if not dry_run:
            b.delete_tmp(f.name)
        if f.is_dir:
            report.dirs_removed += 1
        else:
            report.tmp_removed += 1
            report.bytes_freed += f.size
    if progress is not None:
        progress(total, total)
    return report


def _gc_session(
    store: SessionStore, sid: str, grace: float, report: GcReport, dry_run: bool
) -> None:
    b = store.backend
    with b.session(sid) as h:
        r = store.read_state(h, fresh=True) if h is not None else None
    if r is None:
        age = b.session_dir_age(sid)
        if age is not None and age >= grace:
            if not dry_run:
                b.remove_remains(sid)
            report.dirs_removed += 1
        elif age is not None:
            report.kept_young += 1
        return

    def old(f: FileStat) -> bool:
        if f.age_s >= grace:
            return True
        report.kept_young += 1
        return False

    for o in _session_files(store, sid, r):
        name = _name(o)
        if o.kind == "orphan_blob" and old(_stat(o)):
            if not dry_run:
                b.delete_blob(sid, name)
            report.blobs_removed += 1
            report.bytes_freed += o.size
        elif o.kind == "stale_journal" and old(_stat(o)):
            if not dry_run:
                b.delete_session_file(sid, name)
            report.journals_removed += 1
            report.bytes_freed += o.size
        elif o.kind == "stale_handoff" and old(_stat(o)):
            if not dry_run:
                b.delete_queue_file(sid, name)
            report.handoffs_removed += 1


def _name(o: Orphan) -> str:
    """The file's name in its directory (`o.path` is a path or an object URL)."""
    return str(o.path).rsplit("/", 1)[-1]


def _stat(o: Orphan) -> FileStat:
    return FileStat(_name(o), o.path, o.size, o.age_s)


# --------------------------------------------------------------------------- stats


def stats(store: SessionStore, *, progress: ProgressFn | None = None) -> StoreStats:
    """Counts from session indexes and listings (no blob is decompressed).

    `blobs` counts the distinct blobs the sessions name (materialized or still in a
    journal), as verify checks them; `orphans` what verify lists (a session's files
    nothing names, tmp files older than the gc grace); a session that cannot be read
    counts in `damaged`, by name in `problems`.
    """
    b = store.backend
    st = StoreStats()
    ids = sorted(b.list_sessions())
    for done, sid in enumerate(ids, 1):
        try:
            with b.session(sid) as h:
                r = store.read_state(h, fresh=True) if h is not None else None
            if r is None:
                st.orphans += 1 if b.session_dir_age(sid) is not None else 0
                continue
            files = b.list_blobs(sid) + b.list_session_files(sid)
            st.disk_bytes += sum(f.size for f in files if not f.is_dir)
            s = r.state
            st.sessions += 1
            st.loops += s.loop_count
            unique = {e.blob: e for e in s.entries}
            st.blobs += len(unique)
            st.raw_bytes += sum(e.raw_size for e in unique.values())
            st.stored_bytes += sum(e.stored_size for e in unique.values())
            st.journal_records += s.records
            st.journal_bytes += s.journal_bytes
            st.orphans += sum(1 for _o in _session_files(store, sid, r))
        except SessionError as exc:
            st.damaged += 1
            st.problems.append(_problem(exc, sid))
        if progress is not None:
            progress(done, len(ids))
    st.orphans += sum(1 for f in b.list_tmp() if f.age_s >= GC_GRACE_S)
    return st


# --------------------------------------------------------------------------- migrate


def migrate(store: SessionStore, *, progress: ProgressFn | None = None) -> MigrateReport:
    """Upgrade every format v1 session to v2 now (writers do it on a session's first
    write anyway). Each is one checkpoint under its lock; a session that cannot be
    read is reported and left as it is."""
    report = MigrateReport()
    ids = sorted(store.backend.list_sessions())
    for done, sid in enumerate(ids, 1):
        report.sessions += 1
        try:
            if store.session_state(sid).checkpoint_version < ondisk.FORMAT_VERSION:
                store.checkpoint(sid)
                report.upgraded += 1
            else:
                report.current += 1
        except SessionNotFound:
            report.sessions -= 1
        except SessionError as exc:
            report.problems.append(_problem(exc, sid))
        if progress is not None:
            progress(done, len(ids))
    return report


# --------------------------------------------------------------------------- legacy import


def _covers(stored: journal.SessionState, dumped_ids: list[tuple[str, str]]) -> bool:
    """True if `session` (the file) keeps every stored loop as it is, in order."""
    file_loops = dict(dumped_ids)
    position = {lid: i for i, (lid, _d) in enumerate(dumped_ids)}
    last = -1
    for e in stored.entries:
        if file_loops.get(e.loop_id) != e.blob:
            return False
        if position[e.loop_id] < last:
            return False
        last = position[e.loop_id]
    return True


def import_legacy(
    store: SessionStore,
    directory: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Import phi-core `{session_id}.json` files; never stops on a bad file.

    A stored session the file would take loops from (a loop the file lacks, or holds in
    another version) is a conflict: left unchanged, unless `overwrite` says the file
    wins. Otherwise the file's loops and header are imported (a file that grew is an
    update). Re-importing the same files changes nothing.
    """
    import pydantic

    from loopstore.models import Session

    report = ImportReport()
    base = Path(directory)
    try:
        files = sorted(p for p in base.iterdir() if p.name.endswith(".json") and p.is_file())
    except OSError as exc:
        report.failed.append(ImportFailure(base, f"cannot list directory: {exc.strerror or exc}"))
        return report
    total = len(files)
    for done, path in enumerate(files, 1):
        try:
            session = Session.model_validate_json(path.read_bytes())
            outcome = _import_one(store, session, overwrite)
        except OSError as exc:
            report.failed.append(ImportFailure(path, f"cannot read: {exc.strerror or exc}"))
        except pydantic.ValidationError as exc:
            report.failed.append(ImportFailure(path, f"not a phi-core session: {first_error(exc)}"))
        except InvalidSessionId as exc:
            report.failed.append(ImportFailure(path, f"invalid session id: {exc.cause}"))
        except SessionError as exc:
            report.failed.append(ImportFailure(path, str(exc)))
        else:
            {
                "created": report.imported,
                "updated": report.updated,
                "unchanged": report.unchanged,
                "conflict": report.conflicts,
            }[outcome].append(session.session_id)
        if progress is not None:
            progress(done, total)
    return report


def _import_one(store: SessionStore, session: Session, overwrite: bool) -> str:
    sid = ondisk.validate_session_id(session.session_id)
    with store.lock(sid):  # the check and the save see the same state
        if not overwrite:
            try:
                current = store.session_state(sid)
            except SessionNotFound:
                current = None
            if current is not None:
                dumped = [
                    (
                        lp.loop_id,
                        ondisk.digest(lp.model_dump_json(indent=ondisk.JSON_INDENT).encode()),
                    )
                    for lp in session.loops
                ]
                if not _covers(current, dumped):
                    return "conflict"
        return store._save(session)


__all__ = ["gc", "grace_seconds", "import_legacy", "migrate", "stats", "verify"]
