"""The session store: the commit protocol of docs/FORMAT.md over one `Backend`.

A session is a checkpoint (manifest.json: header + loop index) plus a journal of commit
records since it. Every write is the same steps (FORMAT.md, "One append"):

1. take the session (the lock on a filesystem; nothing on an object store, whose
   commit is a compare-and-swap that step 4 retries);
2. read its state: checkpoint + journal, from the per-process cache when unchanged;
3. build one record: the ops (put a loop, set header fields, replace the index) and
   the compressed blobs it introduces;
4. commit it: write, fdatasync, fsync the directories if the state built on was not
   yet known durable, append a sync mark (`SessionHandle.commit`);
5. every few hundred records, fold the journal into a new checkpoint: materialize the
   blobs it carries as files, write the manifest, start a new journal.

`append_loop` adds group commit: a caller that finds the lock busy hands its record to
the holder (`loopstore.fsbackend` hand-off files), which commits the appends of every
waiter in one record and one fdatasync, then posts each its outcome.

Readers take no lock: they read checkpoint + journal, make an unmarked journal durable
before trusting it, and re-read when a blob vanished under them.

The models (and pydantic) are imported on first use, so that listings start fast.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Final, TypeVar

from loopstore import errors, faults, journal, ondisk
from loopstore.backend import Backend, CommitConflict, HandoffQueue, SessionHandle
from loopstore.catalog import Catalog, CatalogUnusable, Summary
from loopstore.errors import (
    CorruptSession,
    InvalidSessionId,
    LoopNotFound,
    SessionError,
    SessionNotFound,
    StorageError,
    UnsupportedFormat,
)
from loopstore.fsbackend import FileSystemBackend
from loopstore.journal import Change, Item, SessionState
from loopstore.lazy import LazyLoops
from loopstore.locking import LOCK_POLL_INTERVAL_S, LOCK_TIMEOUT_S

if TYPE_CHECKING:
    import pydantic

    from loopstore.backup import BackupReport
    from loopstore.models import LoopRecord, Session
    from loopstore.reports import (
        GcReport,
        ImportReport,
        MigrateReport,
        SessionInfo,
        StoreStats,
        VerifyReport,
    )

GC_GRACE_S: Final = 15 * 60.0
#: gc spares unreferenced files younger than this: a reader may still be reading them.
SCAN_THREADS: Final = 16
#: Sessions read at once when a listing reads every session (an object store, which has
#: no catalog, answers each read in a network round trip; threads overlap them).
READ_RETRIES: Final = 8
#: A reader re-reads the state this often when blobs keep vanishing (deletes, gc, folds).
STATE_CACHE_SIZE: Final = 256
#: Parsed session states kept per store (checked against the manifest tail on every use).
FOLD_MIN_RECORDS: Final = 256
FOLD_MIN_BYTES: Final = 4 << 20
#: A journal is folded into a new checkpoint once it holds this many records (or blobs)
#: or bytes, or (whichever is larger) as many bytes as the checkpoint: folding costs
#: O(loops), so spacing folds by the checkpoint's size keeps an append's cost flat at any
#: size, and bounding the journal keeps replaying it cheap.
HANDOFF_FIRST_POLL_S: Final = 0.0005
HANDOFF_MAX_POLL_S: Final = 0.004
#: A waiting append checks for its outcome (and the lock) first after 0.5 ms, backing off
#: to every 4 ms: a holder's round takes about a millisecond, and waking often costs CPU
#: the other writers need.
HANDOFF_BELL_TIMEOUT_S: Final = 0.05
#: A waiter with a doorbell (Linux) sleeps until rung, checking on its own at least this
#: often in case the holder died without ringing.
HOLDER_EXTRA_ROUNDS: Final = 3
#: A holder serves the appends that arrived during its round, up to this many more
#: rounds, before it lets the lock go (waiters need not wake to take it).
HANDOFF_BATCH_BYTES: Final = 8 << 20
#: A holder claims waiting appends up to about this many bytes per record.
CONFLICT_FIRST_BACKOFF_S: Final = 0.002
CONFLICT_MAX_BACKOFF_S: Final = 0.1
#: After losing a compare-and-swap (object stores) a writer waits a random time up to
#: this, doubling, before it re-reads: racing writers spread out instead of colliding.
HANDOFF_STALE_S: Final = 3600.0
#: Hand-off files this old belong to a killed waiter (a live one waits lock_timeout at
#: most before it withdraws): verify lists them and gc removes them, whatever the grace.

ProgressFn = Callable[[int, int], None]
T = TypeVar("T")
Overlay = dict[str, "Summary | SessionError | None"]
"""Sessions a listing read itself (their lock was busy), by id: summary, error or gone."""


# --------------------------------------------------------------------------- helpers


def _first_loop_header(session_id: str, loop: LoopRecord) -> dict[str, Any]:
    """The header phi-core's recorder writes when a session opens with `loop`.

    Spelled out rather than built through the Session model (that costs a validation
    per append); tests/test_store.py checks the two agree.
    """
    return {
        "session_id": session_id,
        "agent_id": loop.agent_id,
        "created_at": loop.started_at,
        "last_active_at": loop.started_at,
        "formation": {"FirstLoop": {"timestamp": loop.started_at}},
        "parent_spawn_ref": None,
        "scope": "ephemeral",
    }


@dataclass(frozen=True)
class _Dumped:
    """A loop serialized once: its index entry (sizes filled once compressed) and bytes."""

    loop_id: str
    raw: bytes
    digest: str
    status: str | None
    started_at: str | None
    ended_at: str | None
    parent_loop_id: str | None

    def entry(self, stored_size: int) -> ondisk.LoopEntry:
        return ondisk.LoopEntry(
            self.loop_id,
            self.digest,
            len(self.raw),
            stored_size,
            self.status,
            self.started_at,
            self.ended_at,
            self.parent_loop_id,
        )


def _dump_loop(loop: LoopRecord) -> _Dumped:
    from loopstore.models import LoopRecord

    if not isinstance(loop, LoopRecord):
        loop = LoopRecord.model_validate(loop)
    raw = loop.dump_json(indent=ondisk.JSON_INDENT)
    status = loop.status
    return _Dumped(
        loop_id=loop.loop_id,
        raw=raw,
        digest=ondisk.digest(raw),
        status=status.value if status is not None else None,
        started_at=loop.started_at,
        ended_at=loop.ended_at,
        parent_loop_id=loop.parent_loop_id,
    )


def _later(a: str | None, b: str | None) -> bool:
    """True if timestamp text `b` is strictly later than `a` (nanosecond exact).

    Two UTC stamps of one shape (phi-core writes them so) compare as text; any other
    pair is parsed.
    """
    if a and b and len(a) == len(b) and a[-1] == b[-1] == "Z":
        return b > a
    na, nb = ondisk.timestamp_ns(a), ondisk.timestamp_ns(b)
    return na is not None and nb is not None and nb > na


class _Tokens:
    """Commit ids: time-ordered (hand-off queues serve oldest first) and unique (a
    per-process random prefix, renewed in a forked child, and a counter)."""

    def __init__(self) -> None:
        self.renew()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = f"{os.getpid()}.{os.urandom(4).hex()}"
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{time.time_ns():020d}.{self.prefix}.{next(self.counter)}"


_token = _Tokens()


def first_error(exc: pydantic.ValidationError) -> str:
    """The first validation error, located (`loops.0.usage.input: ...`)."""
    errs = exc.errors()
    if not errs:
        return str(exc)
    first = errs[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where}: {first.get('msg', '')}{more}"


def decode_loops(raws: Sequence[bytes]) -> list[LoopRecord]:
    """LoopRecords from blobs this store wrote (hash-verified): strict validation first.

    Our own canonical JSON validates strictly, which skips pydantic's lax coercions
    (about a third of the cost); anything else falls back to the lax path. One pause of
    the cyclic GC covers the whole batch.
    """
    import pydantic

    from loopstore import _lossless
    from loopstore.models import LoopRecord

    validate = LoopRecord.__pydantic_validator__.validate_json
    out: list[LoopRecord] = []
    with _lossless.gc_paused():
        for raw in raws:
            try:
                out.append(validate(raw, strict=True))
            except pydantic.ValidationError:
                out.append(validate(raw))
    return out


def _claim(
    q: HandoffQueue | None, r: StateRead | None, claimed: list[Item], done: list[str]
) -> None:
    """Take the appends waiting in the hand-off queue (oldest first), and settle the
    claims a dead holder left: committed ones are done, the others go back."""
    if q is None:
        return
    known = r.state.commit_ids if r is not None else frozenset()
    orphans, fresh = q.claim(HANDOFF_BATCH_BYTES)
    requeued = False
    for data in orphans:
        orphan = Item.decode(data)
        if orphan is None:
            continue
        if orphan.token in known:
            done.append(orphan.token)
        else:
            q.requeue(orphan.token)
            requeued = True
    if requeued:
        fresh = q.claim(HANDOFF_BATCH_BYTES)[1]
    claimed.extend(it for it in map(Item.decode, fresh) if it is not None)


def _post(q: HandoffQueue | None, token: str, error: bytes | None) -> None:
    """Tell a waiter its outcome, and wake it. If posting fails, its claim stays behind
    and the next holder resolves it (the commit ids say whether it was committed): the
    holder's own call does not fail for it."""
    if q is not None:
        with contextlib.suppress(SessionError):
            q.post(token, error)
        q.ring(token)


def _encode_error(err: SessionError) -> bytes:
    return json.dumps(
        {
            "type": type(err).__name__,
            "cause": err.cause,
            "path": str(err.path or ""),
            "maybe_committed": bool(getattr(err, "maybe_committed", False)),
        }
    ).encode()


def _decode_error(session_id: str, data: bytes) -> SessionError:
    try:
        doc = json.loads(data)
        cls = getattr(errors, doc["type"], errors.StorageError)
        if not (isinstance(cls, type) and issubclass(cls, SessionError)):
            cls = errors.StorageError
        err: SessionError = cls(session_id, str(doc["cause"]), path=doc.get("path") or None)
        if doc.get("maybe_committed") and isinstance(err, errors.StorageError):
            err.maybe_committed = True
        return err
    except (ValueError, KeyError, TypeError):
        return errors.StorageError(session_id, "the group-commit holder failed")


@dataclass(frozen=True)
class StateRead:
    """A session state as read, and where its journal stands.

    `cursor` is the end of the journal's good frames (where the next record goes),
    `sealed` whether the journal ends in a sync mark (everything read is durable),
    `tail` the manifest id the state was built from, `torn` the bytes after the good
    frames when last read (a torn tail, cut by the next writer).
    """

    state: SessionState
    cursor: int
    sealed: bool
    tail: bytes
    torn: int = 0
    folded: bool = False
    #: this read upgraded a v1 checkpoint (a fold happened on the way)


# --------------------------------------------------------------------------- store


class SessionStore:
    """Sessions as checkpoints + journals + content-addressed blobs, over a Backend."""

    def __init__(
        self, backend: Backend, *, compression_level: int, options: dict[str, Any]
    ) -> None:
        self._backend = backend
        self._options = options
        self.compression_level = compression_level
        self.durable = backend.durable
        self._cache: OrderedDict[str, StateRead] = OrderedDict()

    # -- plumbing ------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def location(self) -> str:
        return self._backend.location

    @property
    def lock_timeout(self) -> float:
        return self._backend.locks.timeout

    @property
    def lock_poll_interval(self) -> float:
        return self._backend.locks.poll_interval

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (type(self), self.location, dict(self._options)))

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, session_id: str, name: str | None = None) -> PurePath | str:
        """Where a session (or a file of it) lives, for error messages."""
        base = self._backend.location.rstrip("/") + f"/{ondisk.SESSIONS_DIR}/{session_id}"
        text = base if name is None else f"{base}/{name}"
        return text if "://" in text else Path(text)

    # The state cache has no lock (a lock held across fork would deadlock the child);
    # single dict operations are atomic under the GIL, and entries are immutable.

    def _cache_put(self, session_id: str, r: StateRead) -> None:
        cache = self._cache
        cache.pop(session_id, None)
        cache[session_id] = r
        while len(cache) > STATE_CACHE_SIZE:
            try:
                cache.popitem(last=False)
            except KeyError:
                break

    def _parse_manifest(
        self, session_id: str, data: bytes, prior: SessionState | None = None
    ) -> ondisk.Manifest:
        """Decode a checkpoint; entries of `prior` (an older state of this session,
        typically the one a fold just rewrote) are reused, not parsed again."""
        known = ondisk.known_lines(prior.entries) if prior is not None else None
        try:
            return ondisk.decode_manifest(data, session_id=session_id, path=None, known=known)
        except (CorruptSession, UnsupportedFormat) as exc:
            raise type(exc)(
                session_id, exc.cause, path=self._path(session_id, ondisk.MANIFEST_NAME)
            ) from None

    # -- reading state -----------------------------------------------------------------

    def read_state(
        self, h: SessionHandle, *, fresh: bool = False, for_write: bool = False
    ) -> StateRead | None:
        """The session's state: checkpoint + journal (a cached parse reused when current;
        `fresh` parses everything again, as verify does).

        None if the session has no manifest. A missing journal is the old one rotated
        away by a fold (read again), or, when the manifest stays the same, a crash that
        kept the checkpoint's rename but not its empty journal's creation.
        """
        sid = h.session_id
        for _attempt in range(READ_RETRIES):
            tail = h.manifest_id()
            if tail is None:
                return None
            cached = None if fresh else self._cache.get(sid)
            if cached is not None and cached.tail == tail:
                state, cursor, sealed = cached.state, cached.cursor, cached.sealed
            else:
                got = h.manifest()
                if got is None:
                    return None
                data, tail = got
                m = self._parse_manifest(sid, data, cached.state if cached else None)
                state, cursor, sealed = SessionState.from_manifest(m, len(data)), 0, False
            read = h.read_frames(state.checkpoint_generation, cursor, for_write=for_write)
            if read is None and state.checkpoint_version >= 2 and h.manifest_id() != tail:
                continue  # folded meanwhile: read the new checkpoint
            if read is not None and read.frames:
                try:
                    state = state.replay(read.frames)
                except journal.JournalError as exc:
                    path = self._path(sid, ondisk.journal_filename(state.checkpoint_generation))
                    raise CorruptSession(sid, f"bad journal: {exc}", path=path) from None
                sealed = read.frames[-1].kind == journal.KIND_MARK
            if read is None:
                r = StateRead(state, 0, sealed, tail)
            else:
                r = StateRead(state, read.end, sealed, tail, read.size - read.end)
            self._cache_put(sid, r)
            return None if state.deleted else r
        raise CorruptSession(
            sid,
            f"session kept changing; gave up after {READ_RETRIES} reads",
            path=self._path(sid, ondisk.MANIFEST_NAME),
        )

    def _read_durable(self, h: SessionHandle) -> StateRead | None:
        """`_read`, made durable first if no sync mark vouches for it (a call returns
        only durable state, whoever wrote it)."""
        r = self.read_state(h)
        if r is None or r.sealed:
            return r
        h.make_durable(r.state.checkpoint_generation)
        r = replace(r, sealed=True)
        self._cache_put(h.session_id, r)
        return r

    def _raws(
        self, h: SessionHandle, r: StateRead, entries: Sequence[ondisk.LoopEntry]
    ) -> list[bytes] | ondisk.LoopEntry:
        """The verified JSON of each entry's blob, or the entry whose blob vanished."""
        state = r.state
        sid = h.session_id
        gen = state.checkpoint_generation
        raws: dict[str, bytes] = {}
        out: list[bytes] = []
        for e in entries:
            raw = raws.get(e.blob)
            if raw is None:
                span = state.journal_blobs.get(e.blob)
                try:
                    data = h.payload(gen, span) if span is not None else h.blob(e.blob)
                except FileNotFoundError:
                    return e
                try:
                    raw = ondisk.decode_blob(
                        data, e.blob, session_id=sid, path=None, expected_raw_size=e.raw_size
                    )
                except ondisk.DamagedBlob as exc:
                    where = (
                        ondisk.journal_filename(gen)
                        if span
                        else f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(e.blob)}"
                    )
                    raise ondisk.DamagedBlob(
                        sid, exc.cause, path=self._path(sid, where), kind=exc.kind
                    ) from None
                raws[e.blob] = raw
            out.append(raw)
        return out

    def _snapshot(
        self,
        session_id: str,
        pick: Callable[[SessionState], Sequence[ondisk.LoopEntry]],
        *,
        h: SessionHandle | None = None,
    ) -> tuple[StateRead, list[bytes]]:
        """A durable state and the verified blobs `pick` chooses from it, consistently."""
        last: SessionState | None = None
        for _attempt in range(READ_RETRIES):
            with contextlib.ExitStack() as stack:
                handle = h or stack.enter_context(self._backend.session(session_id))
                r = self._read_durable(handle) if handle is not None else None
                if handle is None or r is None:
                    raise SessionNotFound(session_id, path=self._path(session_id))
                raws = self._raws(handle, r, pick(r.state))
                if not isinstance(raws, ondisk.LoopEntry):
                    return r, raws
                missing = raws
                if last is not None and last.generation == r.state.generation:
                    raise CorruptSession(
                        session_id,
                        f"missing blob for loop {missing.loop_id!r}",
                        path=self._path(
                            session_id, f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(missing.blob)}"
                        ),
                    )
                last = r.state
                self._cache.pop(session_id, None)
        raise CorruptSession(
            session_id,
            f"session kept changing; gave up after {READ_RETRIES} reads",
            path=self._path(session_id, ondisk.MANIFEST_NAME),
        )

    def _session_from(self, state: SessionState, raws: Sequence[bytes]) -> Session:
        import pydantic

        from loopstore.models import Session

        try:
            session = Session.model_validate_json(
                state.header_json[:-1] + b',"loops":[]}'
                if state.header_json != b"{}"
                else b'{"loops":[]}'
            )
        except pydantic.ValidationError as exc:
            raise CorruptSession(
                state.session_id,
                f"undecodable session header: {first_error(exc)}",
                path=self._path(state.session_id, ondisk.MANIFEST_NAME),
            ) from None
        try:
            session.loops = decode_loops(raws)
        except pydantic.ValidationError as exc:
            raise CorruptSession(
                state.session_id,
                f"undecodable loop: {first_error(exc)}",
                path=self._path(state.session_id),
            ) from None
        return session

    # -- the write path --------------------------------------------------------------------

    @contextlib.contextmanager
    def _held(self, session_id: str) -> Iterator[None]:
        """The session lock (waiting up to lock_timeout), timed for the observation hook."""
        t0 = time.monotonic()
        try:
            owner = self._backend.locks.acquire(session_id)
        finally:
            faults.note_lock_wait(session_id, time.monotonic() - t0)
        try:
            yield
        finally:
            self._backend.locks.release(session_id, owner)

    def _read_for_write(self, h: SessionHandle | None) -> StateRead | None:
        """The state a writer builds on; a v1 checkpoint is upgraded to v2 first."""
        if h is None:
            return None
        r = self.read_state(h, for_write=True)
        if r is not None and r.state.checkpoint_version < ondisk.FORMAT_VERSION:
            r = replace(self._fold(h, r), folded=True)
        return r

    def _commit(
        self,
        session_id: str,
        h: SessionHandle | None,
        r: StateRead | None,
        change: Change,
        *,
        at_ns: int | None = None,
    ) -> StateRead:
        """Write `change` as one record (step 4) and return the state after it.

        The caller holds the session. A new session is published whole by
        `Backend.create` (its directory, or its objects, appear at once). `at_ns` is
        the commit time recorded (a backup carries its source state's over).
        """
        at_ns = time.time_ns() if at_ns is None else at_ns
        if self._backend.catalog is not None:
            self._backend.catalog.mark(session_id)
        if r is None:
            base = change.base
            rec = journal.record(base, change, at_ns)
            manifest, _m = ondisk.encode_manifest(session_id, 0, at_ns, base.header, ())
            self._backend.create(session_id, manifest, rec.frame)
            self._cache.pop(session_id, None)  # the next read parses the new checkpoint
            return StateRead(base.after(rec, 0), len(rec.frame), True, b"")
        assert h is not None
        rec = journal.record(r.state, change, at_ns)
        locator, cursor = h.commit(
            r.state.checkpoint_generation,
            r.cursor,
            rec.frame,
            seal_dirs=not r.sealed,
            torn=r.torn > 0,
        )
        new = StateRead(r.state.after(rec, locator), cursor, True, r.tail)
        self._cache_put(session_id, new)
        return new

    def _install(
        self,
        state: SessionState,
        blobs: Sequence[ondisk.EncodedBlob],
        links: Mapping[str, Path],
    ) -> tuple[list[str], list[str]]:
        """Publish a session this store lacks, at rest, as another store's state (a
        backup); the caller holds the session. Returns the digests linked and written."""
        sid = state.session_id
        if self._backend.catalog is not None:
            self._backend.catalog.mark(sid)
        data, _m = ondisk.encode_manifest(
            sid, state.generation, state.committed_at_ns, state.header, state.entries
        )
        done = self._backend.install(sid, data, state.generation, blobs, links)
        self._cache.pop(sid, None)
        return done

    def _settle(self, h: SessionHandle | None, r: StateRead | None) -> None:
        """Nothing to write: still vouch only for durable state."""
        if h is not None and r is not None and not r.sealed:
            h.make_durable(r.state.checkpoint_generation)
            self._cache_put(h.session_id, replace(r, sealed=True))

    def _maybe_fold(self, session_id: str, r: StateRead) -> None:
        """Fold the journal once it is long enough (step 9; the caller holds the session).

        The caller's commit is durable already: a fold that fails on I/O (a full disk)
        leaves checkpoint and journal as they were, for the next writer to fold, and the
        call still returns. Damage found while folding is raised.
        """
        s = r.state
        held = len(s.journal_blobs)
        if (
            s.records < FOLD_MIN_RECORDS
            and held < FOLD_MIN_RECORDS
            and s.journal_bytes < max(FOLD_MIN_BYTES, s.checkpoint_bytes)
        ):
            return
        with (
            contextlib.suppress(CommitConflict, StorageError),
            self._backend.session(session_id) as h,
        ):
            if h is not None:  # a lost race means another writer folded: as good
                self._fold(h, r)

    def _fold(self, h: SessionHandle, r: StateRead) -> StateRead:
        """Step 5: materialize journal-held blobs, write the checkpoint, start a journal."""
        s = r.state
        sid = h.session_id
        gen = s.checkpoint_generation
        needed = {e.blob for e in s.entries if e.blob in s.journal_blobs}
        blobs = [
            ondisk.EncodedBlob(d, s.journal_blobs[d].raw_size, h.payload(gen, s.journal_blobs[d]))
            for d in sorted(needed)
        ]
        h.materialize(blobs)
        data, m = ondisk.encode_manifest(sid, s.generation, s.committed_at_ns, s.header, s.entries)
        tail, cursor = h.checkpoint(data, gen, s.generation)
        new = StateRead(SessionState.from_manifest(m, len(data)), cursor, True, tail)
        self._cache_put(sid, new)
        return new

    # -- append_loop and group commit ----------------------------------------------------------

    def append_loop(
        self, session_id: str, loop: LoopRecord, *, session: Session | None = None
    ) -> None:
        """Add `loop` at the end, or replace the loop with the same loop_id in place.

        Costs one record in the journal whatever the session's size. `session` gives the
        header when the session does not exist yet; without it a new session gets the
        header phi-core's recorder would write for a first loop (agent and times of
        `loop`, formation FirstLoop). Like phi-core's recorder, a new loop that started
        later than the header's `last_active_at` moves it on.
        """
        from loopstore.models import LoopRecord

        session_id = ondisk.validate_session_id(session_id)
        if not isinstance(loop, LoopRecord):
            loop = LoopRecord.model_validate(loop)
        if loop.session_id != session_id:
            raise InvalidSessionId(
                session_id,
                f"loop {loop.loop_id!r} belongs to session {loop.session_id!r}, not {session_id!r}",
            )
        # session= gives the header of a new session only (checked when it is used).
        new_header = (
            session.header() if session is not None else _first_loop_header(session_id, loop)
        )
        d = _dump_loop(loop)
        blob = ondisk.encode_blob(d.raw, self.compression_level, known_digest=d.digest)
        item = Item(_token(), d.entry(blob.stored_size), blob, new_header)
        locks = self._backend.locks
        t0 = time.monotonic()
        own: Item | None = item
        try:
            owner = locks.try_acquire(session_id)
            if owner is None and (locks.timeout <= 0 or not self._backend.handoff):
                owner = locks.acquire(session_id)  # lock_timeout=0 means one try
            if owner is None:
                handed = self._hand_off(session_id, item, t0 + locks.timeout)
                if handed is None:
                    return  # a holder committed it
                owner, own = handed
        finally:
            faults.note_lock_wait(session_id, time.monotonic() - t0)
        claimed = 0
        try:
            try:
                claimed = self._serve(session_id, own)
            except SessionError as exc:
                if own is not None:
                    raise
                self._orphan_outcome(session_id, item, exc)
                return  # committed after all
            # Appends that arrived during our round are served now, while we hold the
            # lock, instead of waiting for one of their writers to wake and take it. Our
            # own call is done: a failed round was told to the appends it claimed.
            for _round in range(HOLDER_EXTRA_ROUNDS):
                if not claimed:
                    break
                try:
                    claimed = self._serve(session_id, None)
                except SessionError:
                    break
        finally:
            locks.release(session_id, owner)
            if claimed and self._backend.handoff:
                # More arrived than our rounds served: wake one of them to take the lock.
                with self._backend.queue(session_id, create=False) as q:
                    if q is not None:
                        q.ring_oldest()
        if own is None:
            self._await_outcome(session_id, item)

    def _hand_off(
        self, session_id: str, item: Item, deadline: float
    ) -> tuple[object, Item | None] | None:
        """Wait for the lock with our append handed to whoever holds it.

        Returns None once a holder committed it (raising the holder's error if it
        failed), or the lock and the item still to commit (None: our item is a claim a
        dead holder left; serving the queue resolves it). At the deadline an unclaimed
        item is withdrawn and SessionLocked raised: the unlink decides atomically.
        """
        locks = self._backend.locks
        with (
            self._backend.queue(session_id, create=True) as q,
            q.doorbell(item.token) if q is not None else contextlib.nullcontext() as bell,
        ):
            assert q is not None
            q.deposit(item.token, item.encode())
            delay = HANDOFF_FIRST_POLL_S
            while True:
                owner = locks.try_acquire(session_id)
                if owner is not None:
                    if q.withdraw(item.token):
                        return owner, item
                    outcome = q.outcome(item.token)
                    if outcome is not None:
                        locks.release(session_id, owner)
                        self._raise_outcome(session_id, outcome)
                        return None
                    return owner, None
                now = time.monotonic()
                if now >= deadline and q.withdraw(item.token):
                    raise locks.locked_error(session_id, "held by another writer")
                if bell is not None:
                    # Rung when our outcome is posted or the lock comes free; the timeout
                    # only covers a holder that died before ringing.
                    bell.wait(min(HANDOFF_BELL_TIMEOUT_S, max(deadline - now, 0.0) + 0.001))
                else:
                    time.sleep(delay)
                    delay = min(delay * 2, HANDOFF_MAX_POLL_S)
                outcome = q.outcome(item.token)
                if outcome is not None:
                    self._raise_outcome(session_id, outcome)
                    return None

    def _orphan_outcome(self, session_id: str, item: Item, exc: SessionError) -> None:
        """Serving failed while our append sat in the queue (a dead holder's claim, put
        back and maybe claimed again): return if it was committed, else raise. Only an
        append taken back out of the queue is known not to be committed later."""
        outcome: bytes | None = None
        gone = False
        with (
            contextlib.suppress(SessionError),  # unknown: reported as maybe committed
            self._backend.queue(session_id, create=False) as q,
        ):
            outcome = q.outcome(item.token) if q is not None else None
            gone = q is None or (outcome is None and q.withdraw(item.token))
        if outcome is not None:
            self._raise_outcome(session_id, outcome)
            return
        if gone:
            raise exc
        err = (
            exc
            if isinstance(exc, StorageError)
            else StorageError(session_id, exc.cause, path=exc.path)
        )
        err.maybe_committed = True
        raise err

    def _await_outcome(self, session_id: str, item: Item) -> None:
        """After serving the queue as holder: our orphaned claim's outcome, or commit it."""
        with self._backend.queue(session_id, create=False) as q:
            outcome = q.outcome(item.token) if q is not None else None
        if outcome is not None:
            self._raise_outcome(session_id, outcome)
            return
        # The claim file was unreadable and dropped: the append was never committed.
        with self._held(session_id):
            self._serve(session_id, item)

    @staticmethod
    def _raise_outcome(session_id: str, outcome: bytes) -> None:
        if outcome:
            raise _decode_error(session_id, outcome)

    def _serve(self, session_id: str, own: Item | None) -> int:
        """The holder's round: resolve dead holders' claims, claim waiting appends,
        commit them with our own as one record, post every outcome, maybe fold.
        Returns how many waiting appends it claimed."""
        b = self._backend
        claimed: list[Item] = []
        done: list[str] = []
        refused: dict[str, SessionError] = {}
        with contextlib.ExitStack() as stack:
            q = stack.enter_context(b.queue(session_id, create=False)) if b.handoff else None

            def attempt(h: SessionHandle | None, r: StateRead | None) -> StateRead | None:
                if not claimed and not done:
                    _claim(q, r, claimed, done)
                refused.clear()
                items = ([own] if own is not None else []) + claimed
                if r is None:
                    # The first item whose session= header names this session creates it;
                    # a header for another session before it is refused (later ignored).
                    for it in items:
                        named = (it.new_header or {}).get("session_id")
                        if named == session_id:
                            break
                        refused[it.token] = InvalidSessionId(
                            session_id, f"session= describes session {named!r}"
                        )
                    items = [it for it in items if it.token not in refused]
                if items:
                    return self._commit_items(session_id, h, r, items)
                self._settle(h, r)
                return r

            try:
                r = self._retry(session_id, attempt)
            except SessionError as exc:
                for it in claimed:
                    _post(q, it.token, _encode_error(refused.get(it.token, exc)))
                for token in done:
                    _post(q, token, None)
                raise
            for token in done:
                _post(q, token, None)
            for it in claimed:
                err = refused.get(it.token)
                _post(q, it.token, _encode_error(err) if err else None)
        if own is not None and own.token in refused:
            raise refused[own.token]
        if r is not None:
            self._maybe_fold(session_id, r)
        return len(claimed)

    def _retry(
        self,
        session_id: str,
        attempt: Callable[[SessionHandle | None, StateRead | None], T],
    ) -> T:
        """Run a write on a fresh state until it commits: once on a filesystem (the lock
        excludes other writers); on an object store, again after every compare-and-swap
        lost to another writer, until lock_timeout is spent (then SessionLocked)."""
        import random

        deadline = time.monotonic() + self._backend.locks.timeout
        delay = CONFLICT_FIRST_BACKOFF_S
        while True:
            with self._backend.session(session_id) as h:
                try:
                    return attempt(h, self._read_for_write(h))
                except CommitConflict:
                    self._cache.pop(session_id, None)
            if time.monotonic() >= deadline:
                raise self._backend.locks.locked_error(
                    session_id, "other writers kept committing first"
                )
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, CONFLICT_MAX_BACKOFF_S)

    def _commit_items(
        self, session_id: str, h: SessionHandle | None, r: StateRead | None, items: Sequence[Item]
    ) -> StateRead:
        header = items[0].new_header or {}
        base = r.state if r is not None else SessionState.new(session_id, header)
        change = Change(base)
        for it in items:
            change.ids.append(it.token)
            is_new = not change.has_loop(it.entry.loop_id)
            if change.put(it.entry, it.blob) and is_new:
                active = change.header_value("last_active_at")
                if _later(active if isinstance(active, str) else None, it.entry.started_at):
                    change.set_fields({"last_active_at": it.entry.started_at})
        if change.empty and r is not None:
            self._settle(h, r)
            return r
        return self._commit(session_id, h, r, change)

    # -- save / update / delete ------------------------------------------------------------

    def _plan_loops(
        self, dumped: Sequence[_Dumped], state: SessionState | None
    ) -> tuple[list[ondisk.LoopEntry], dict[str, ondisk.EncodedBlob]]:
        """Index entries for `dumped`; a blob `state` already stores is not compressed again."""
        known = {e.blob: e for e in state.entries} if state is not None else {}
        entries: list[ondisk.LoopEntry] = []
        blobs: dict[str, ondisk.EncodedBlob] = {}
        for d in dumped:
            old = known.get(d.digest)
            if old is not None:
                entries.append(d.entry(old.stored_size))
                continue
            blob = blobs.get(d.digest) or ondisk.encode_blob(
                d.raw, self.compression_level, known_digest=d.digest
            )
            blobs[d.digest] = blob
            entries.append(d.entry(blob.stored_size))
        return entries, blobs

    def _save(self, session: Session) -> str:
        """save() that says what happened: 'created', 'updated' or 'unchanged'."""
        from loopstore.models import Session

        if not isinstance(session, Session):
            raise TypeError(f"save() needs a Session, got {type(session).__name__}")
        session_id = ondisk.validate_session_id(session.session_id)
        header = session.header()
        dumped = [_dump_loop(lp) for lp in session.loops]
        for d in dumped:
            if ondisk.digest(d.raw) != d.digest:  # pragma: no cover - defensive
                raise CorruptSession(session_id, "loop changed while saving")
        # Compress outside the lock what is probably new (a guess; the plan under the lock counts).
        with self._backend.session(session_id) as h:
            try:
                guess = self.read_state(h) if h is not None else None
            except SessionError:
                guess = None
        _entries, precompressed = self._plan_loops(dumped, guess.state if guess else None)

        def attempt(h: SessionHandle | None, r: StateRead | None) -> tuple[str, StateRead]:
            entries, blobs = self._plan_loops(dumped, r.state if r else None)
            for digest, blob in precompressed.items():
                blobs.setdefault(digest, blob)
            if r is None:
                change = Change(SessionState.new(session_id, header))
                change.set_loops(entries, blobs)
                return "created", self._commit(session_id, h, None, change)
            change = Change(r.state)
            change.set_header(header)
            repair = self._damaged_blobs(h, r, entries)
            for e in entries:
                if e.blob in repair and e.blob not in blobs:
                    d = next(x for x in dumped if x.digest == e.blob)
                    blobs[e.blob] = ondisk.encode_blob(
                        d.raw, self.compression_level, known_digest=d.digest
                    )
            change.set_loops(entries, blobs, repair=repair)
            if change.empty:
                self._settle(h, r)
                return "unchanged", r
            return "updated", self._commit(session_id, h, r, change)

        with self._held(session_id):
            outcome, r = self._retry(session_id, attempt)
            if outcome != "unchanged":
                self._maybe_fold(session_id, r)
        return outcome

    def _damaged_blobs(
        self, h: SessionHandle | None, r: StateRead, entries: Sequence[ondisk.LoopEntry]
    ) -> set[str]:
        """Materialized blobs `entries` reuse that are missing or of the wrong size.

        save() replaces the stored session, so it rewrites them (one stat per blob; a
        same-size damaged blob is left to verify()).
        """
        if h is None:
            return set()
        state = r.state
        sizes = {e.blob: e.stored_size for e in state.entries}
        bad: set[str] = set()
        for e in {e.blob: e for e in entries}.values():
            if (
                e.blob in sizes
                and e.blob not in state.journal_blobs
                and h.blob_size(e.blob) != sizes[e.blob]
            ):
                bad.add(e.blob)
        return bad

    def save(self, session: Session) -> None:
        """Replace the stored session with `session`; only new blobs are written."""
        self._save(session)

    def update(self, session_id: str, fn: Callable[[Session], Session | None]) -> Session:
        """Read-modify-write under the session lock: no lost updates.

        On an object store there is no lock: `fn` runs on the latest state and its
        result commits by compare-and-swap; when another writer committed first, `fn`
        runs again on the newer state.
        """
        from loopstore.models import Session

        session_id = ondisk.validate_session_id(session_id)

        def attempt(h: SessionHandle | None, r: StateRead | None) -> tuple[Session, StateRead]:
            if h is None or r is None:
                raise SessionNotFound(session_id, path=self._path(session_id))
            r, raws = self._snapshot(session_id, lambda s: s.entries, h=h)
            session = self._session_from(r.state, raws)
            result = fn(session)
            new = session if result is None else result
            if not isinstance(new, Session):
                raise TypeError(f"update fn returned {type(new).__name__}, not Session")
            if new.session_id != session_id:
                raise ValueError(
                    f"update fn changed session_id {session_id!r} to {new.session_id!r}"
                )
            # fn may itself have committed (the lock is re-entrant): build on the latest.
            latest = self._read_for_write(h)
            if latest is None:
                raise SessionNotFound(session_id, path=self._path(session_id))
            entries, blobs = self._plan_loops([_dump_loop(lp) for lp in new.loops], latest.state)
            change = Change(latest.state)
            change.set_header(new.header())
            change.set_loops(entries, blobs)
            if change.empty:
                self._settle(h, latest)
                return new, latest
            return new, self._commit(session_id, h, latest, change)

        with self._held(session_id):
            new, r = self._retry(session_id, attempt)
            self._maybe_fold(session_id, r)
        return new

    def delete(self, session_id: str) -> None:
        """Remove a session (one atomic rename on a filesystem), then its files."""
        session_id = ondisk.validate_session_id(session_id)
        with self._held(session_id):
            if not self._backend.has_manifest(session_id):
                raise SessionNotFound(session_id, path=self._path(session_id))
            if self._backend.catalog is not None:
                self._backend.catalog.mark(session_id)
            self._backend.delete(session_id)
            self._cache.pop(session_id, None)

    def checkpoint(self, session_id: str) -> bool:
        """Fold the session's journal into a new checkpoint now; False if there was nothing.

        Every blob then is a file in loops/ (what rsync and snapshots see at rest); a v1
        session is upgraded to v2. Writers do this on their own every few hundred
        records; backups, migrations and tests call it to get there at once.
        """
        session_id = ondisk.validate_session_id(session_id)

        def attempt(h: SessionHandle | None, r: StateRead | None) -> bool:
            # _read_for_write already folded a v1 checkpoint (the upgrade).
            if h is None or r is None:
                raise SessionNotFound(session_id, path=self._path(session_id))
            if not r.state.records:
                self._settle(h, r)
                return r.folded
            self._fold(h, r)
            return True

        with self._held(session_id):
            return self._retry(session_id, attempt)

    @contextlib.contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        """The exclusive lock writers take; re-entrant for the holder."""
        session_id = ondisk.validate_session_id(session_id)
        with self._held(session_id):
            yield

    # -- reads -----------------------------------------------------------------------------

    def exists(self, session_id: str) -> bool:
        return self._backend.has_manifest(ondisk.validate_session_id(session_id))

    def load(self, session_id: str, *, lazy: bool = False) -> Session:
        """The whole session; SessionNotFound if absent, CorruptSession if damaged.

        `lazy`: read the session's index now and each loop when first touched
        (`loopstore.lazy`): a program that reads the header and a loop or two pays for
        those only. An eager load reads and checks every blob before it returns.
        """
        session_id = ondisk.validate_session_id(session_id)
        if not lazy:
            r, raws = self._snapshot(session_id, lambda s: s.entries)
            return self._session_from(r.state, raws)
        with self._backend.session(session_id) as h:
            got = self._read_durable(h) if h is not None else None
            if h is None or got is None:
                raise SessionNotFound(session_id, path=self._path(session_id))
            state = got.state
            # Blobs still in the journal are taken now (a fold removes the journal):
            # compressed, a few MiB at most. Blob files stay until gc's grace period.
            held = {
                e.blob: h.payload(state.checkpoint_generation, state.journal_blobs[e.blob])
                for e in state.entries
                if e.blob in state.journal_blobs
            }
        session = self._session_from(state, ())
        session.loops = LazyLoops(state.loop_count, self._fetcher(state, held))
        return session

    def _fetcher(
        self, state: SessionState, held: Mapping[str, bytes]
    ) -> Callable[[int], LoopRecord]:
        """Fetch loop `i` of `state` (a lazy load's snapshot; `held`: its journal blobs)."""
        import pydantic

        sid = state.session_id
        entries = state.entries

        def fetch(i: int) -> LoopRecord:
            e = entries[i]
            data = held.get(e.blob)
            if data is None:
                with self._backend.session(sid) as h:
                    try:
                        data = h.blob(e.blob) if h is not None else None
                    except FileNotFoundError:
                        data = None
            if data is None:
                where = f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(e.blob)}"
                raise CorruptSession(
                    sid,
                    f"the blob of loop {e.loop_id!r} is gone (replaced and collected since)",
                    path=self._path(sid, where),
                )
            try:
                raw = ondisk.decode_blob(
                    data, e.blob, session_id=sid, path=None, expected_raw_size=e.raw_size
                )
                return decode_loops([raw])[0]
            except ondisk.DamagedBlob as exc:
                raise ondisk.DamagedBlob(
                    sid, exc.cause, path=self._path(sid), kind=exc.kind
                ) from None
            except pydantic.ValidationError as exc:
                cause = f"undecodable loop: {first_error(exc)}"
                raise CorruptSession(sid, cause, path=self._path(sid)) from None

        return fetch

    def load_json(self, session_id: str) -> bytes:
        """The session as phi-core's file (pretty JSON, byte for byte), with no model
        built: its blobs spliced into its header."""
        from loopstore.models import Session

        session_id = ondisk.validate_session_id(session_id)
        r, raws = self._snapshot(session_id, lambda s: s.entries)
        return ondisk.session_json(r.state.header, list(Session.model_fields), raws)

    def iter_loop_json(self, session_id: str) -> Iterator[bytes]:
        """Each loop's JSON (phi-core's pretty form), in order, one blob read at a time.

        The loops are those of the state the first step reads; blobs are immutable, so
        later commits do not change what this yields (a gc that removes a replaced
        loop's blob before it is read, within its grace period, cannot happen).
        """
        session_id = ondisk.validate_session_id(session_id)
        with self._backend.session(session_id) as h:
            r = self._read_durable(h) if h is not None else None
            if h is None or r is None:
                raise SessionNotFound(session_id, path=self._path(session_id))
            for entry in r.state.entries:
                raws = self._raws(h, r, (entry,))
                if isinstance(raws, ondisk.LoopEntry):
                    raise CorruptSession(
                        session_id,
                        f"the blob of loop {entry.loop_id!r} vanished while it was read",
                        path=self._path(session_id),
                    )
                yield ondisk.pretty_loop(raws[0])

    def load_loop_json(self, session_id: str, loop_id: str) -> bytes:
        """One loop's JSON (phi-core's pretty form) without building its model."""
        session_id = ondisk.validate_session_id(session_id)
        _r, raws = self._snapshot(session_id, self._pick_loop(session_id, loop_id))
        return ondisk.pretty_loop(raws[0])

    def _pick_loop(
        self, session_id: str, loop_id: str
    ) -> Callable[[SessionState], Sequence[ondisk.LoopEntry]]:
        def pick(s: SessionState) -> Sequence[ondisk.LoopEntry]:
            entry = s.entry(loop_id)
            if entry is None:
                raise LoopNotFound(
                    session_id, f"no loop {loop_id!r} in session", path=self._path(session_id)
                )
            return (entry,)

        return pick

    def load_loop(self, session_id: str, loop_id: str) -> LoopRecord:
        """One loop, decoding only its blob."""
        import pydantic

        session_id = ondisk.validate_session_id(session_id)
        _r, raws = self._snapshot(session_id, self._pick_loop(session_id, loop_id))
        try:
            return decode_loops(raws)[0]
        except pydantic.ValidationError as exc:
            raise CorruptSession(
                session_id, f"undecodable loop: {first_error(exc)}", path=self._path(session_id)
            ) from None

    def session_state(self, session_id: str) -> SessionState:
        """The session's durable index state (no loop decoded); SessionNotFound if absent."""
        session_id = ondisk.validate_session_id(session_id)
        with self._backend.session(session_id) as h:
            r = self._read_durable(h) if h is not None else None
        if r is None:
            raise SessionNotFound(session_id, path=self._path(session_id))
        return r.state

    def session_info(self, session_id: str) -> SessionInfo:
        from loopstore.reports import SessionInfo

        return SessionInfo.from_state(self.session_state(session_id))

    # -- listings (the catalog) --------------------------------------------------------

    def _summary(self, session_id: str) -> Summary | SessionError | None:
        """A session's catalog summary from its durable state (None: gone; or its error)."""
        try:
            state = self.session_state(session_id)
        except SessionNotFound:
            return None
        except SessionError as exc:
            return exc
        return Summary.of(state)

    def reindex(self, *, progress: ProgressFn | None = None) -> int:
        """Rebuild the listing catalog from the sessions; returns how many it lists.

        Listings do this on their own when the catalog is missing, damaged or from an
        earlier boot; `loopstore reindex` runs it on demand.
        """
        catalog = self._backend.catalog
        if catalog is None:
            return len(self._backend.list_sessions())
        with catalog.exclusive():
            self._rebuild(catalog, progress)
            self._refresh(catalog)
        return len(catalog.ids())

    def _rebuild(self, catalog: Catalog, progress: ProgressFn | None) -> None:
        ids = sorted(self._backend.list_sessions())
        catalog.rebuild(lambda: ((sid, self._summary(sid)) for sid in ids), len(ids), progress)

    def _refresh(self, catalog: Catalog) -> Overlay:
        """Bring every marked session up to date (the caller holds the catalog).

        A session whose lock we can take has no commit in flight: its row is written
        and its mark removed. One whose lock is busy is read as any reader reads it, for
        this answer only (`Overlay`): never written, so no listing can put an older
        state over a newer one.
        """
        locks = self._backend.locks
        overlay: Overlay = {}
        for sid in catalog.marked():
            try:
                owner = locks.try_acquire(sid)
            except SessionError:
                owner = None
            if owner is None:
                overlay[sid] = self._summary(sid)
                continue
            try:
                catalog.put(self._summary(sid), sid)
                catalog.unmark(sid)
            finally:
                locks.release(sid, owner)
        return overlay

    def _catalog(self, progress: ProgressFn | None = None) -> tuple[Catalog, Overlay] | None:
        """The catalog, current (rebuilt if unusable, marked sessions refreshed), and the
        sessions read for this answer only (a commit in flight)."""
        catalog = self._backend.catalog
        if catalog is None:
            return None
        with catalog.exclusive():
            for attempt in range(2):
                try:
                    if not catalog.usable():
                        self._rebuild(catalog, progress)
                    return catalog, self._refresh(catalog)
                except CatalogUnusable:
                    if attempt:
                        raise
                    catalog.close()
                    self._rebuild(catalog, progress)
        raise AssertionError("unreachable")  # pragma: no cover

    def sessions(
        self,
        *,
        agent_id: str | None = None,
        order: str = "active",
        limit: int | None = None,
        reverse: bool = False,
        progress: ProgressFn | None = None,
    ) -> list[Summary]:
        """Session summaries from the catalog (no session read), sorted by `order`
        (`catalog.ORDERS`: active, created, size, loops, id, agent)."""
        current = self._catalog(progress)
        if current is None:
            rows, _damaged = self._scan()
            return _sort_summaries(rows, agent_id, order, limit, reverse)
        catalog, overlay = current
        more = None if limit is None else limit + len(overlay)
        rows = catalog.rows(agent_id=agent_id, order=order, limit=more, reverse=reverse)
        if not overlay:
            return rows
        rows = [r for r in rows if r.session_id not in overlay]
        rows += [s for s in overlay.values() if isinstance(s, Summary)]
        return _sort_summaries(rows, agent_id, order, limit, reverse)

    def damaged_sessions(self) -> list[tuple[str, str]]:
        """(session_id, cause) of sessions the listing could not read."""
        current = self._catalog()
        if current is None:
            return self._scan()[1]
        catalog, overlay = current
        damaged = [(sid, cause) for sid, cause in catalog.damaged() if sid not in overlay]
        damaged += [(sid, e.cause) for sid, e in overlay.items() if isinstance(e, SessionError)]
        return sorted(damaged)

    def _scan(self) -> tuple[list[Summary], list[tuple[str, str]]]:
        """Every session read directly (a store without a catalog), SCAN_THREADS at a
        time: summaries, and (session_id, cause) of the sessions that cannot be read."""
        from concurrent.futures import ThreadPoolExecutor

        ids = sorted(self._backend.list_sessions())
        with ThreadPoolExecutor(max(1, min(SCAN_THREADS, len(ids)))) as pool:
            items = list(pool.map(self._summary, ids))
        rows = [item for item in items if isinstance(item, Summary)]
        damaged = [
            (sid, item.cause)
            for sid, item in zip(ids, items, strict=True)
            if isinstance(item, SessionError)
        ]
        return rows, damaged

    def list_ids(self) -> list[str]:
        """Every stored session, most recently active first.

        Order: header `last_active_at` descending, then last commit time descending.
        A session that cannot be read is listed last (load() will report it).
        """
        current = self._catalog()
        if current is None:
            rows, broken = self._scan()
            ordered = _sort_summaries(rows, None, "active", None, False)
            return [s.session_id for s in ordered] + [sid for sid, _cause in broken]
        catalog, overlay = current
        if not overlay:
            return catalog.ids() + [sid for sid, _cause in catalog.damaged()]
        damaged = [sid for sid, _cause in self.damaged_sessions()]
        return [s.session_id for s in self.sessions()] + damaged

    def list_for_agent(self, agent_id: str, *, lazy: bool = False) -> list[Session]:
        """Sessions of `agent_id`, most recent first; other agents' loops are never read.

        A session that cannot be read fails the listing if it may be this agent's.
        `lazy` loads each session as `load(..., lazy=True)` does: headers at once, loops
        when touched.
        """
        for sid, cause in self.damaged_sessions():
            if self._salvage_agent(sid) in (agent_id, None):
                raise CorruptSession(sid, cause, path=self._path(sid))
        out: list[Session] = []
        for row in self.sessions(agent_id=agent_id):
            try:
                out.append(self.load(row.session_id, lazy=lazy))
            except SessionNotFound:
                continue
        return out

    def _salvage_agent(self, session_id: str) -> str | None:
        """Best-effort agent of a session that does not read, from its manifest's header."""
        try:
            with self._backend.session(session_id) as h:
                got = h.manifest() if h is not None else None
        except SessionError:
            return None
        return ondisk.salvage_agent_id(got[0]) if got is not None else None

    # -- maintenance (loopstore.maintenance) ------------------------------------------------

    def verify(
        self,
        session_id: str | None = None,
        *,
        progress: ProgressFn | None = None,
        deep: bool = False,
        grace: float | timedelta = GC_GRACE_S,
        processes: int = 1,
    ) -> VerifyReport:
        """Check every checkpoint, journal record and blob hash (deep: also the models);
        `processes` > 1 checks a big store from that many spawned worker processes
        (the caller's main module must be import-safe, as multiprocessing requires)."""
        from loopstore import maintenance

        return maintenance.verify(
            self, session_id, progress=progress, deep=deep, grace=grace, processes=processes
        )

    def gc(
        self,
        grace: float | timedelta = GC_GRACE_S,
        *,
        progress: ProgressFn | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove unreferenced blobs, stale journals and tmp files older than `grace`."""
        from loopstore import maintenance

        return maintenance.gc(self, grace, progress=progress, dry_run=dry_run)

    def stats(self) -> StoreStats:
        """Counts from indexes and listings (no blob is decompressed)."""
        from loopstore import maintenance

        return maintenance.stats(self)

    def migrate(self, *, progress: ProgressFn | None = None) -> MigrateReport:
        """Upgrade every format v1 session to v2 now (loopstore.maintenance.migrate)."""
        from loopstore import maintenance

        return maintenance.migrate(self, progress=progress)

    def import_legacy(
        self,
        directory: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        overwrite: bool = False,
    ) -> ImportReport:
        """Import phi-core `{session_id}.json` files (never drops what the store has more)."""
        from loopstore import maintenance

        return maintenance.import_legacy(self, directory, progress=progress, overwrite=overwrite)

    def export_legacy(self, session_id: str, directory: str | os.PathLike[str]) -> Path:
        """Write `{directory}/{session_id}.json` with phi-core's exact bytes."""
        from loopstore import legacy

        return legacy.write_session_file(session_id, self.load_json(session_id), Path(directory))

    def backup(
        self,
        dest: str | os.PathLike[str] | SessionStore,
        *,
        prune: bool = True,
        progress: ProgressFn | None = None,
        link: bool = True,
        check: bool = False,
    ) -> BackupReport:
        """A consistent, incremental snapshot of this live store in `dest` (loopstore.backup)."""
        from loopstore.backup import backup

        return backup(self, dest, prune=prune, progress=progress, link=link, check=check)


def check_options(
    lock_timeout: float, lock_poll_interval: float, durable: bool, compression_level: int
) -> dict[str, Any]:
    """The options every store takes, checked before anything is opened or created."""
    if lock_timeout < 0:
        raise ValueError("lock_timeout must be >= 0")
    if lock_poll_interval <= 0:
        raise ValueError("lock_poll_interval must be > 0")
    if not isinstance(compression_level, int) or not -7 <= compression_level <= 22:
        raise ValueError("compression_level must be an int in -7..22")
    return {
        "lock_timeout": lock_timeout,
        "lock_poll_interval": lock_poll_interval,
        "durable": durable,
        "compression_level": compression_level,
    }


def _sort_summaries(
    rows: list[Summary], agent_id: str | None, order: str, limit: int | None, reverse: bool
) -> list[Summary]:
    """What `Catalog.rows` answers, for a store without a catalog."""
    if agent_id is not None:
        rows = [r for r in rows if r.agent_id == agent_id]
    rows.sort(key=lambda r: r.sort_key(order), reverse=reverse)
    return rows if limit is None else rows[:limit]


def _reopen(cls: Callable[..., Any], location: str, options: dict[str, Any]) -> Any:
    return cls(location, **options)


class FileSystemSessionStore(SessionStore):
    """Sessions in a plain directory that many processes and threads share."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        lock_timeout: float = LOCK_TIMEOUT_S,
        lock_poll_interval: float = LOCK_POLL_INTERVAL_S,
        durable: bool = True,
        compression_level: int = ondisk.DEFAULT_COMPRESSION_LEVEL,
    ) -> None:
        options = check_options(lock_timeout, lock_poll_interval, durable, compression_level)
        backend = FileSystemBackend(
            root, durable=durable, lock_timeout=lock_timeout, lock_poll_interval=lock_poll_interval
        )
        super().__init__(backend, compression_level=compression_level, options=options)
        self._fs = backend

    @property
    def root(self) -> Path:
        return self._fs.layout.root

    @property
    def layout(self) -> ondisk.Layout:
        return self._fs.layout

    def __enter__(self) -> FileSystemSessionStore:
        return self


__all__ = [
    "GC_GRACE_S",
    "FileSystemSessionStore",
    "SessionStore",
]
