"""The object-store backend: sessions as objects in an S3-compatible bucket.

Layout under ``s3://bucket/prefix/`` (docs/FORMAT.md section 7)::

    loopstore.json                         the store marker (the filesystem's bytes)
    sessions/<id>/manifest.json            the checkpoint (the filesystem's bytes)
    sessions/<id>/log/<seq:020d>.rec       one commit record per object: one journal frame
    sessions/<id>/loops/<xxh3-128>.zst     materialized blobs (the filesystem's bytes)
    .loopstore-probe/<unique>              the start-up probe's scratch objects (transient)

There are no locks between processes. Every write is a conditional PUT the server
decides atomically:

* a commit is a create-only PUT (``If-None-Match: *``) of record ``G + n + 1``: exactly
  one writer gets each sequence number, the others get 412 and re-read
  (`backend.CommitConflict`; `store.SessionStore._retry` runs the write again);
* a fold replaces ``manifest.json`` by compare-and-swap (``If-Match`` the ETag read);
* a new session is published by a create-only PUT of its first checkpoint.

A request whose outcome is unknown (a timeout, a dropped connection, a 5xx) is settled
by reading the key back and comparing bytes: every record and manifest is unique
(commit ids, ``at_ns``, ``committed_at_ns``), so equal bytes mean it was ours. Before
the first write of a process to an endpoint and bucket, a probe checks that the server
really refuses stale conditional writes; one that ignores them is refused.

Records are not removed when a fold supersedes them: a writer that read the session
before the fold would otherwise re-create a removed sequence number and be told it
committed while no reader looks there any more. gc removes records at or below the
checkpoint generation once they are older than its grace period, like unreferenced
blobs. A delete commits a tombstone record, removes the manifest, then every other
object; the tombstone stays (a few hundred bytes, no session data) until gc's grace
has passed, so a session created again under the same id continues the sequence
numbers after it and a record from before the delete can never be read as part of it.

`lock()` excludes threads of one process only (`locking.LockManager` with lock files in
a private temporary directory); between processes the compare-and-swap decides.
"""

from __future__ import annotations

import atexit
import contextlib
import email.utils
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from loopstore import journal, locking, ondisk
from loopstore.backend import CommitConflict, FileStat, HandoffQueue, JournalRead
from loopstore.catalog import Catalog
from loopstore.errors import (
    CorruptSession,
    SessionLocked,
    StorageError,
    UnsupportedFormat,
    storage_error,
)

try:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]
    from botocore.exceptions import (  # type: ignore[import-untyped]
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ImportError("object-store support needs boto3: pip install 'loopstore[s3]'") from _exc

if TYPE_CHECKING:
    pass

S3Client = Any
#: boto3 clients are built at run time; without stub packages their type is Any.

PROBE_DIR: Final = ".loopstore-probe/"
#: Scratch objects of the start-up probe, under the store prefix (removed after use).
CONNECT_TIMEOUT_S: Final = 5.0
READ_TIMEOUT_S: Final = 20.0
MAX_ATTEMPTS: Final = 3
#: botocore's own retries of reads and idempotent writes (standard mode, backoff).
SETTLE_MIN_S: Final = 5.0
#: A conditional write whose outcome is unknown is retried (and settled by reading the
#: key back) for max(this, lock_timeout) before the call gives up.
WORKERS: Final = 8
#: Requests in flight at once for one call (record reads, blob writes, deletes).
DELETE_SETTLE_S: Final = 30.0
#: A deleted session whose tombstone is younger than this is being cleaned up by its
#: deleter: a new session under that id waits (conflict, retried). After it, a cleanup
#: cut short (a killed deleter) is finished by whoever creates the session again.
CACHE_BYTES: Final = 64 << 20
#: Record bodies kept per store (a fold's blobs are read from them, not fetched again).
READ_AHEAD: Final = 16
#: Blobs fetched ahead while a reader walks a checkpoint's loops in order.

_GENERATION_RE = re.compile(rb',"generation":(\d+),"committed_at_ns":')
_BLOB_RE = re.compile(rb'"blob":"([0-9a-f]{32})"')
_UNSUPPORTED = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})
#: Error codes of a server that does not support a conditional request header.
_NOT_SENT = (EndpointConnectionError, ConnectTimeoutError)
#: botocore errors raised before the request reached the server: safe to send again.


# --------------------------------------------------------------------------- locations


def parse_location(location: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket[/prefix]``; the prefix is "" or ends in "/"."""
    if not location.startswith("s3://"):
        raise ValueError(f"not an s3:// location: {location!r}")
    bucket, _, prefix = location[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ValueError(f"no bucket in {location!r} (use s3://bucket/prefix)")
    if "//" in prefix:
        raise ValueError(f"empty path segment in {location!r}")
    return bucket, prefix + "/" if prefix else ""


def client_config(*, retries: bool = True, path_style: bool = True) -> Any:
    """The botocore settings of every loopstore client: bounded timeouts and retries,
    checksums only where S3 requires them (the data carries its own), path-style
    addressing for endpoints other than AWS."""
    attempts = MAX_ATTEMPTS if retries else 1
    env_attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
    if retries and env_attempts.isdigit() and int(env_attempts) > 0:
        attempts = int(env_attempts)
    return Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=4 * WORKERS,
        s3={"addressing_style": "path"} if path_style else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
    )


@dataclass(frozen=True)
class Endpoint:
    """How to reach the object store; None fields come from the AWS configuration."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    profile: str | None = None

    def clients(self) -> tuple[S3Client, S3Client]:
        """(retrying client, single-attempt client for conditional writes)."""
        session = boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            profile_name=self.profile,
        )
        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        probe = session.client("s3", config=client_config(path_style=False), **kwargs)
        aws = _is_aws(probe.meta.endpoint_url)
        if aws:
            client = probe
        else:
            probe.close()
            client = session.client("s3", config=client_config(), **kwargs)
        once = session.client(
            "s3", config=client_config(retries=False, path_style=not aws), **kwargs
        )
        return client, once


def _is_aws(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


# --------------------------------------------------------------------------- locks


class _LockDir:
    """A private temporary directory per process for the in-process lock files."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._path: Path | None = None

    def path(self) -> Path:
        with self._lock:
            if self._path is None or self._pid != os.getpid():
                self._path = Path(tempfile.mkdtemp(prefix="loopstore-s3-locks-"))
                self._pid = os.getpid()
                atexit.register(_remove_lock_dir, self._path, self._pid)
            return self._path


def _remove_lock_dir(path: Path, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


_lock_dir = _LockDir()


class _ProcessLocks(locking.LockManager):
    """Session locks that exclude the threads of this process only.

    The lock files live in a private directory of this process, so the file lock never
    waits: what remains is `LockManager`'s per-process owner lock (re-entrant, one
    budget). Stores on the same location share it (the same registry root).
    `SessionLocked` names the session's s3:// URL, not the private lock file.
    """

    def __init__(
        self, location: str, where: Callable[[str], str], timeout: float, poll_interval: float
    ) -> None:
        tag = hashlib.sha256(location.encode()).hexdigest()[:24]

        def lock_path(session_id: str) -> Path:
            d = _lock_dir.path() / tag
            d.mkdir(exist_ok=True)
            return d / (hashlib.sha256(session_id.encode()).hexdigest()[:40] + ".lock")

        root = Path(tempfile.gettempdir()) / f"loopstore-s3-{tag}"  # a registry key only
        super().__init__(root, lock_path, timeout=timeout, poll_interval=poll_interval)
        self._where = where

    def locked_error(self, session_id: str, why: str) -> SessionLocked:
        return SessionLocked(
            session_id,
            f"lock not acquired within {self.timeout:g}s ({why})",
            path=self._where(session_id),
        )


# --------------------------------------------------------------------------- probe


_probe_lock = threading.Lock()
_probed: dict[tuple[str, str], bool] = {}


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Obj:
    """One listed object: its key relative to the listed prefix."""

    name: str
    key: str
    size: int
    etag: str
    modified: float
    #: LastModified (server clock, seconds since the epoch; 1 s precision on some servers)
    age: float
    #: seconds between LastModified and the listing (both server clock)


@dataclass(frozen=True)
class _Tip:
    """Where a session's sequence stands: its manifest and last record."""

    etag: str
    generation: int
    last: int
    deleted: bool
    tombstone: _Obj | None = None
    torn: _Obj | None = None
    #: a torn record after `last` (the next commit replaces it)


def _status(exc: ClientError) -> tuple[int, str]:
    resp = getattr(exc, "response", None) or {}
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(resp.get("Error", {}).get("Code") or "")
    return status, code


def _missing(exc: ClientError) -> bool:
    status, code = _status(exc)
    return code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket")


def _server_time(resp: Mapping[str, Any]) -> float:
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(date).timestamp()
    return time.time()


def _timestamp(value: object) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    return time.time()


def _manifest_generation(data: bytes, session_id: str) -> int:
    """The generation of a manifest, read from its first line (full parse if unusual)."""
    m = _GENERATION_RE.search(data, 0, 1024 + 8 * len(session_id))
    if m is not None:
        return int(m.group(1))
    return ondisk.decode_manifest(data, session_id=session_id, path=None).generation


def _is_tombstone(frames: Sequence[journal.Frame]) -> bool:
    for f in frames:
        ops = f.meta.get("ops") if f.kind == journal.KIND_RECORD else None
        if isinstance(ops, list) and any(
            isinstance(o, dict) and o.get("op") == "delete" for o in ops
        ):
            return True
    return False


def _md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class _BodyCache:
    """Record bodies by (session, seq), least recently used out beyond `limit` bytes.

    A state's blob spans come from a record this process listed and read (or wrote),
    so serving `payload` from here returns the bytes the span was computed from.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int], tuple[str, bytes]] = OrderedDict()

    def get(self, sid: str, seq: int, etag: str | None = None) -> bytes | None:
        with self._lock:
            item = self._items.get((sid, seq))
            if item is None or (etag is not None and item[0] != etag):
                return None
            self._items.move_to_end((sid, seq))
            return item[1]

    def put(self, sid: str, seq: int, etag: str, body: bytes) -> None:
        if len(body) > self._limit // 4:
            return
        with self._lock:
            old = self._items.pop((sid, seq), None)
            if old is not None:
                self._size -= len(old[1])
            self._items[(sid, seq)] = (etag, body)
            self._size += len(body)
            while self._size > self._limit and self._items:
                _key, (_etag, dropped) = self._items.popitem(last=False)
                self._size -= len(dropped)

    def drop_session(self, sid: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == sid]:
                self._size -= len(self._items.pop(key)[1])


# --------------------------------------------------------------------------- the handle


class S3Session:
    """One call's view of one session in the bucket (cheap: no request until used).

    `commit`, `checkpoint` and `materialize` are conditional writes, safe whoever else
    writes at the same time; the handle remembers the manifest ETag it read, which the
    fold's compare-and-swap names.
    """

    def __init__(self, backend: S3Backend, session_id: str) -> None:
        self._b = backend
        self.session_id = session_id
        self._base = backend.session_key(session_id)
        self._etag: str | None = None
        #: the manifest ETag this handle last saw (the fold's If-Match)
        self._kept: dict[str, ondisk.EncodedBlob] = {}
        #: blobs materialize found already stored (refreshed, not written): checked
        #: again once the checkpoint naming them is in place
        self._ahead: dict[str, Future[bytes | None]] = {}
        self._reads = 0
        self._view: int | None = None
        #: the sequence number a reader's view of this handle ended at (see `commit`)
        self._torn: tuple[int, str] | None = None
        #: the torn last record the last read found: (sequence number, ETag)

    def close(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()

    # -- names ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self._base + name

    @property
    def _manifest_key(self) -> str:
        return self._key(ondisk.MANIFEST_NAME)

    def _record_key(self, seq: int) -> str:
        return self._key(ondisk.record_name(seq))

    def _blob_key(self, digest: str) -> str:
        return self._key(f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(digest)}")

    # -- manifest ------------------------------------------------------------------

    def manifest_id(self) -> bytes | None:
        """The manifest's ETag (HEAD), None if there is none. Manifests are unique
        (generation and commit time), so equal ETags mean an unchanged checkpoint."""
        b = self._b
        try:
            resp = b.client.head_object(Bucket=b.bucket, Key=self._manifest_key)
        except ClientError as exc:
            if _missing(exc):
                self._etag = None
                return None
            raise b.error(self.session_id, "read manifest", self._manifest_key, exc) from exc
        except BotoCoreError as exc:
            raise b.error(self.session_id, "read manifest", self._manifest_key, exc) from exc
        self._etag = str(resp["ETag"])
        return self._etag.encode()

    def manifest(self) -> tuple[bytes, bytes] | None:
        got = self._b.get(self.session_id, self._manifest_key, "read manifest")
        if got is None:
            self._etag = None
            return None
        data, etag = got
        self._etag = etag
        self._b.note_blob_order(etag, data)
        return data, etag.encode()

    # -- records ---------------------------------------------------------------------

    def read_frames(
        self, generation: int, cursor: int, *, for_write: bool = False
    ) -> JournalRead | None:
        """The records after checkpoint `generation` and the `cursor` already read.

        One listing (StartAfter the last record read), then each new record, several
        at once. Their sequence numbers must follow on without a gap, else None: the
        records were removed under us (a delete, gc after a fold) and the caller reads
        the manifest again.

        A read `for_write` on a handle that already gave a reader's view ending at
        another record raises CommitConflict (see `commit`). A torn last record (see
        `_one_frame`) ends the read: ``size`` is one past ``end``.
        """
        b = self._b
        sid = self.session_id
        self._torn = None
        expected = generation + cursor + 1
        objs = b.list_records(sid, after=expected - 1)
        run: list[tuple[int, _Obj]] = []
        for seq, o in objs:
            if seq != expected:
                return None
            run.append((seq, o))
            expected += 1
        read = self._frames(run, cursor)
        if read is None:
            return None
        last = generation + read.end  # the last whole record (a torn one is no commit)
        if not for_write:
            self._view = last
        elif self._view is not None and not b.own(sid, self._view, last):
            # A writer re-reads after handing a reader's view to its caller (`update`
            # runs `fn` on it): someone else committed in between, and building on this
            # newer state would drop that commit (or call it a no-op). Conflict: the
            # write runs again, `fn` on the newer state. (Records `fn` itself committed,
            # in this thread, are fine: the filesystem store builds on them too.)
            raise CommitConflict(sid)
        return read

    def _frames(self, run: list[tuple[int, _Obj]], cursor: int) -> JournalRead | None:
        b = self._b
        sid = self.session_id
        bodies = b.fetch_records(sid, run)
        if bodies is None:
            return None  # one vanished between the listing and its read
        frames: list[journal.Frame] = []
        for (seq, o), body in zip(run, bodies, strict=True):
            frame = _one_frame(sid, seq, body, b.url(o.key))
            if frame is None:
                if seq != run[-1][0]:
                    raise _torn_inside(sid, b.url(o.key))
                self._torn = (seq, o.etag)
                break
            frames.append(frame)
        n = len(frames)
        return JournalRead(frames, cursor + n, cursor + len(run))

    def payload(self, generation: int, span: journal.BlobSpan) -> bytes:
        """A blob carried by a record: from the record body this process read, else a
        ranged GET of the record object (locator = seq << 32 | offset in the object)."""
        b = self._b
        seq, offset = span.locator >> 32, (span.locator & 0xFFFFFFFF) + span.start
        body = b.cache.get(self.session_id, seq)
        if body is not None and offset + span.length <= len(body):
            return body[offset : offset + span.length]
        key = self._record_key(seq)
        rng = f"bytes={offset}-{offset + span.length - 1}"
        got = b.get(self.session_id, key, "read record", range_=rng)
        if got is None:
            raise FileNotFoundError(b.url(key))
        data = got[0]
        if len(data) != span.length:
            raise CorruptSession(
                self.session_id, "a record is shorter than a blob it holds", path=b.url(key)
            )
        return data

    def make_durable(self, generation: int) -> None:
        """Nothing to do: an object store acknowledges a PUT once it is durable."""

    def commit(
        self, generation: int, at: int, frame: bytes, *, seal_dirs: bool, torn: bool
    ) -> tuple[int, int]:
        """Create record ``generation + at + 1`` if nobody has (the commit point).

        Over a torn record there (as last read) it is a compare-and-swap on that
        object's ETag instead. CommitConflict if another writer has that sequence
        number, or if this handle
        gave a reader's view of the session (`update` hands it to `fn`) that ended
        elsewhere: the record would build on a state `fn` never saw, and another
        process's commit in between would be lost. Returns the record's blob locator
        base (``seq << 32``) and the new cursor.
        """
        b = self._b
        sid = self.session_id
        if self._view is not None and not b.own(sid, self._view, generation + at):
            raise CommitConflict(sid)
        b.ensure_probed()
        seq = generation + at + 1
        key = self._record_key(seq)
        over = self._torn[1] if self._torn is not None and self._torn[0] == seq else None
        etag = b.put_record(sid, key, frame, over, "commit record")
        self._torn = None
        b.cache.put(sid, seq, etag, frame)
        b.note_own(sid, seq)
        return seq << 32, at + 1

    # -- blobs -----------------------------------------------------------------------

    def blob(self, digest: str) -> bytes:
        """A materialized blob; FileNotFoundError if absent (the caller re-reads state).

        Reading a checkpoint's blobs in order fetches the next few ahead, in parallel.
        """
        fut = self._ahead.pop(digest, None)
        if fut is not None:
            with contextlib.suppress(Exception):
                data: bytes | None = fut.result()
                if data is not None:
                    self._read_ahead(digest)
                    return data
        key = self._blob_key(digest)
        got = self._b.get(self.session_id, key, "read blob")
        if got is None:
            raise FileNotFoundError(self._b.url(key))
        self._read_ahead(digest)
        return got[0]

    def _read_ahead(self, digest: str) -> None:
        self._reads += 1
        if self._reads < 2:
            return  # one loop read (load_loop): no read-ahead
        order = self._b.blob_order(self._etag)
        if order is None:
            return
        pos = order.get(digest)
        if pos is None:
            return
        names = list(order)
        pool = self._b.pool()
        for d in names[pos + 1 : pos + 1 + READ_AHEAD]:
            if d not in self._ahead:
                self._ahead[d] = pool.submit(self._fetch_quiet, d)

    def _fetch_quiet(self, digest: str) -> bytes | None:
        got = self._b.get(self.session_id, self._blob_key(digest), "read blob")
        return None if got is None else got[0]

    def blob_size(self, digest: str) -> int | None:
        return self._b.head_size(self.session_id, self._blob_key(digest), "stat blob")

    def blob_identity(self, digest: str) -> tuple[int, int] | None:
        return None  # objects are never shared between stores

    def blob_path(self, digest: str) -> str:
        return self._b.url(self._blob_key(digest))

    def materialize(
        self,
        blobs: Sequence[ondisk.EncodedBlob],
        *,
        links: Mapping[str, Path] | None = None,
        force: Collection[str] = (),
    ) -> tuple[list[str], list[str]]:
        """Create blob objects (create-only PUTs, several at once).

        A blob already there (412) holds the same content (it is named by its hash):
        it is copied onto itself so its LastModified is fresh and gc's grace covers the
        new reference; one whose bytes differ (damage) is overwritten, as is every blob
        in `force`. Nothing is ever linked. Returns ([], the digests written).
        """
        b = self._b
        b.ensure_probed()
        outcomes = b.run_parallel(lambda blob: self._place(blob, blob.digest in force), blobs)
        written = [bl.digest for bl, o in zip(blobs, outcomes, strict=True) if o]
        for bl, o in zip(blobs, outcomes, strict=True):
            if not o:
                self._kept[bl.digest] = bl
        return [], written

    def _place(self, blob: ondisk.EncodedBlob, force: bool) -> bool:
        """Store one blob; True if written, False if kept (already there, refreshed)."""
        b = self._b
        key = self._blob_key(blob.digest)
        if force:
            b.put(self.session_id, key, blob.data, "write blob")
            return True
        for _attempt in range(5):
            if b.put_blob(self.session_id, key, blob.data):
                return True
            etag = b.touch(self.session_id, key)
            if etag is None:
                continue  # removed between the two requests: create it again
            if etag != _md5_etag(blob.data) and "-" not in etag:
                b.put(self.session_id, key, blob.data, "write blob")  # damaged: replace
                return True
            return False
        raise StorageError(
            self.session_id, "cannot write blob: it keeps vanishing", path=b.url(key)
        )

    def _recheck_kept(self) -> None:
        """Blobs found already stored may have been removed by a gc that listed them
        before our refresh: once the checkpoint names them, put back any that is gone."""
        b = self._b
        kept = list(self._kept.values())
        self._kept.clear()
        if not kept:
            return

        def check(blob: ondisk.EncodedBlob) -> bool:
            key = self._blob_key(blob.digest)
            if b.head_size(self.session_id, key, "stat blob") is None:
                b.put_blob(self.session_id, key, blob.data)
            return True

        b.run_parallel(check, kept)

    # -- checkpoint ------------------------------------------------------------------

    def checkpoint(
        self, manifest: bytes, old_generation: int, new_generation: int
    ) -> tuple[bytes, int]:
        """Replace the manifest by compare-and-swap on the ETag this handle read.

        CommitConflict if another fold (or a delete) replaced it first: the store treats
        a lost fold as done by someone else. Superseded records stay for gc (see the
        module docstring). Returns the new manifest's ETag and cursor 0.
        """
        b = self._b
        b.ensure_probed()
        sid = self.session_id
        etag = self._etag
        if etag is None:
            got = b.get(sid, self._manifest_key, "read manifest")
            if got is None or _manifest_generation(got[0], sid) != old_generation:
                raise CommitConflict(sid)
            etag = got[1]
        new = b.put_replace(sid, self._manifest_key, manifest, etag, "write manifest")
        self._etag = new
        b.note_blob_order(new, manifest)
        self._recheck_kept()
        return new.encode(), 0


def _one_frame(sid: str, seq: int, body: bytes, url: str) -> journal.Frame | None:
    """The single record frame of a record object (base ``seq << 32``).

    None if the object is shorter than its frame: an upload cut off (SeaweedFS held an
    empty one after writers were SIGKILLed mid-commit). No call acknowledged it: as the
    last record it is a torn tail, which the next commit replaces; anywhere else, damage.
    """
    if journal.is_partial_frame(body):
        return None
    try:
        frames, end = journal.scan(body, seq << 32)
    except journal.JournalError as exc:
        raise CorruptSession(sid, f"bad journal record: {exc}", path=url) from None
    if len(frames) != 1 or frames[0].kind != journal.KIND_RECORD or end != (seq << 32) + len(body):
        raise CorruptSession(
            sid, "bad journal record: not exactly one whole record frame", path=url
        )
    if frames[0].meta.get("seq") != seq:
        raise CorruptSession(
            sid,
            f"bad journal record: it says sequence {frames[0].meta.get('seq')!r}, its name {seq}",
            path=url,
        )
    return frames[0]


def _torn_inside(sid: str, url: str) -> CorruptSession:
    """A short record with records after it: no commit builds on a torn record."""
    return CorruptSession(
        sid, "bad journal record: shorter than its frame, with records after it", path=url
    )


# --------------------------------------------------------------------------- the backend


class S3Backend:
    """The store's storage in an S3-compatible bucket under a key prefix."""

    scheme: Final = "s3"
    handoff: Final = False
    durable: bool = True

    def __init__(
        self,
        location: str,
        *,
        endpoint: Endpoint | None = None,
        lock_timeout: float = locking.LOCK_TIMEOUT_S,
        lock_poll_interval: float = locking.LOCK_POLL_INTERVAL_S,
        create: bool = True,
    ) -> None:
        self.bucket, self.prefix = parse_location(location)
        self._location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = endpoint or Endpoint()
        self.durable = True
        self.catalog: Catalog | None = None
        self.format_version = ondisk.FORMAT_VERSION
        self.locks: locking.LockManager = _ProcessLocks(
            f"{self.endpoint.endpoint_url}|{self._location}",
            lambda sid: self.url(self.session_key(sid)),
            lock_timeout,
            lock_poll_interval,
        )
        self.cache = _BodyCache(CACHE_BYTES)
        self._orders: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._orders_lock = threading.Lock()
        self._listed_blobs: dict[tuple[str, str], float] = {}
        self._own: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._own_lock = threading.Lock()
        self._no_conditional_delete = False
        self._pid = -1
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._pool_lock = threading.Lock()
        self._client: S3Client = None
        self._once: S3Client = None
        try:
            self._connect()
        except (BotoCoreError, ValueError) as exc:
            raise self.error(None, "connect to the object store", self.prefix, exc) from exc
        if create:
            self._open_marker()

    # -- clients -----------------------------------------------------------------------

    def _connect(self) -> None:
        self._client, self._once = self.endpoint.clients()
        self._pid = os.getpid()

    def _fresh(self) -> None:
        if self._pid != os.getpid():  # a forked child: never share the parent's sockets
            self._connect()

    @property
    def client(self) -> S3Client:
        self._fresh()
        return self._client

    @property
    def once(self) -> S3Client:
        self._fresh()
        return self._once

    @property
    def endpoint_url(self) -> str:
        return str(self.client.meta.endpoint_url)

    @property
    def location(self) -> str:
        return self._location

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True, cancel_futures=True)
        for c in (self._client, self._once):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()

    # -- names -------------------------------------------------------------------------

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @property
    def sessions_key(self) -> str:
        return f"{self.prefix}{ondisk.SESSIONS_DIR}/"

    def session_key(self, session_id: str) -> str:
        return f"{self.sessions_key}{session_id}/"

    # -- errors ------------------------------------------------------------------------

    def describe(self, exc: BaseException) -> tuple[int, str]:
        """(errno, one-line cause) of a botocore error, naming the endpoint."""
        try:
            ep = self.endpoint_url
        except Exception:  # pragma: no cover - no client
            ep = self.endpoint.endpoint_url or "the configured endpoint"
        if isinstance(exc, NoCredentialsError):
            return errno.EACCES, (
                "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile, or pass access_key=/secret_key=)"
            )
        if isinstance(exc, EndpointConnectionError):
            inner = str(getattr(exc, "kwargs", {}).get("error", exc)).lower()
            why = "connection refused" if "refused" in inner else "no connection"
            return errno.ECONNREFUSED, f"cannot reach the object store at {ep}: {why}"
        if isinstance(exc, ConnectTimeoutError):
            return errno.ETIMEDOUT, (
                f"cannot reach the object store at {ep}: "
                f"no connection within {CONNECT_TIMEOUT_S:g} s"
            )
        if isinstance(exc, ReadTimeoutError):
            return errno.ETIMEDOUT, (
                f"the object store at {ep} did not answer within {READ_TIMEOUT_S:g} s"
            )
        if isinstance(exc, ConnectionClosedError):
            return errno.ECONNRESET, f"the object store at {ep} closed the connection"
        if isinstance(exc, ClientError):
            status, code = _status(exc)
            message = str(exc.response.get("Error", {}).get("Message") or "").strip()
            if code == "NoSuchBucket":
                return errno.ENOENT, f"bucket {self.bucket!r} does not exist at {ep}"
            if status == 403 or code in (
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ):
                return errno.EACCES, (
                    f"access denied by the object store at {ep} ({code or status}): "
                    "check the credentials and the bucket policy"
                )
            if status >= 500:
                return errno.EIO, f"the object store at {ep} failed: HTTP {status} {code}".rstrip()
            detail = f": {message}" if message else ""
            return errno.EIO, f"the object store at {ep} refused: HTTP {status} {code}{detail}"
        return errno.EIO, f"object store at {ep}: {exc}"

    def error(
        self, session_id: str | None, verb: str, key: str, exc: BaseException
    ) -> StorageError:
        """The StorageError for a failed request: session, s3:// URL, clear cause."""
        code, text = self.describe(exc)
        os_err = OSError(code, text)
        os_err.__cause__ = exc
        return storage_error(session_id, verb, self.url(key), os_err)

    # -- requests ----------------------------------------------------------------------

    def get(
        self, session_id: str | None, key: str, what: str, *, range_: str | None = None
    ) -> tuple[bytes, str] | None:
        """(body, ETag) of an object, None if absent."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if range_ is not None:
            kwargs["Range"] = range_
        try:
            resp = self.client.get_object(**kwargs)
            return resp["Body"].read(), str(resp["ETag"])
        except ClientError as exc:
            if _missing(exc):
                return None
            raise self.error(session_id, what, key, exc) from exc
        except BotoCoreError as exc:
            raise self.error(session_id, what, key, exc) from exc

    def head_size(self, session_id: str | None, key: str, what: str) -> int | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise self.error(session_id, what, key, exc) from exc
        except BotoCoreError as exc:
            raise self.error(session_id, what, key, exc) from exc
        return int(resp["ContentLength"])

    def put(self, session_id: str | None, key: str, data: bytes, what: str) -> str:
        """An unconditional PUT (idempotent: retried by botocore); returns the ETag."""
        try:
            return str(self.client.put_object(Bucket=self.bucket, Key=key, Body=data)["ETag"])
        except (ClientError, BotoCoreError) as exc:
            raise self.error(session_id, what, key, exc) from exc

    def put_blob(self, session_id: str, key: str, data: bytes) -> bool:
        """Create-only PUT of a blob: True if created, False if one was there.

        Retried by botocore: a retry refused because the first attempt landed reads as
        "there" (kept), which is right for content-addressed bytes.
        """
        for _attempt in range(5):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                status, _code = _status(exc)
                if status == 412:
                    return False
                if status == 409:
                    time.sleep(0.05)
                    continue  # a concurrent create of the same blob: ask again
                raise self.error(session_id, "write blob", key, exc) from exc
            except BotoCoreError as exc:
                raise self.error(session_id, "write blob", key, exc) from exc
        return False

    def touch(self, session_id: str, key: str) -> str | None:
        """Copy an object onto itself: a fresh LastModified. Its ETag; None if absent."""
        try:
            resp = self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE",
            )
        except ClientError as exc:
            if _missing(exc):
                return None
            raise self.error(session_id, "refresh blob", key, exc) from exc
        except BotoCoreError as exc:
            raise self.error(session_id, "refresh blob", key, exc) from exc
        return str(resp.get("CopyObjectResult", {}).get("ETag") or "")

    def _settle_budget(self) -> float:
        return max(SETTLE_MIN_S, self.locks.timeout)

    def put_new(self, session_id: str | None, key: str, data: bytes, what: str) -> str:
        """Create `key` with `data` unless it exists: the commit primitive.

        Returns the ETag once the object holds our bytes; CommitConflict if it holds
        another writer's. A request whose outcome is unknown (timeout, dropped
        connection, 5xx; or a 409 for a concurrent create) is settled by reading the
        key back: our bytes there mean committed, never a guess. Sending again is the
        same create-only request, so it can never duplicate. A StorageError after the
        budget has `maybe_committed` set if any attempt may have reached the server.
        """
        return self._conditional(session_id, key, data, what, if_match=None)

    def put_record(
        self, session_id: str, key: str, data: bytes, over: str | None, what: str
    ) -> str:
        """Commit a record at `key`: create it, or replace the torn record there whose
        ETag is `over` (see `_one_frame`). Settled like `put_new`."""
        return self._conditional(session_id, key, data, what, if_match=over)

    def put_replace(
        self, session_id: str | None, key: str, data: bytes, if_match: str, what: str
    ) -> str:
        """Compare-and-swap: replace `key` if its ETag is still `if_match`.

        Settled like `put_new`: CommitConflict when someone else's object is there.
        """
        return self._conditional(session_id, key, data, what, if_match=if_match)

    def _conditional(
        self, session_id: str | None, key: str, data: bytes, what: str, *, if_match: str | None
    ) -> str:
        cond = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
        deadline = time.monotonic() + self._settle_budget()
        delay = 0.05
        ambiguous = False
        last: BaseException | None = None
        while True:
            try:
                resp = self.once.put_object(Bucket=self.bucket, Key=key, Body=data, **cond)
                return str(resp["ETag"])
            except ClientError as exc:
                status, code = _status(exc)
                if status in (412, 409):
                    if not ambiguous:
                        # Nothing of ours can have reached the server before: the
                        # object there is another writer's.
                        raise CommitConflict(session_id) from None
                    current = self.get(session_id, key, what)
                    if current is not None and current[0] == data:
                        return current[1]  # ours: an earlier attempt landed
                    # After an unknown outcome ours may still be in flight (409: a
                    # conditional write of the key is in progress): ask again while
                    # the key is as we expected it, else someone else won.
                    as_expected = (
                        current is None
                        if if_match is None
                        else (current is not None and current[1] == if_match)
                    )
                    if not as_expected:
                        raise CommitConflict(session_id) from None
                    last = exc
                elif status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
                    ambiguous, last = True, exc
                else:
                    raise self.error(session_id, what, key, exc) from exc
            except _NOT_SENT as exc:
                last = exc
            except BotoCoreError as exc:
                ambiguous, last = True, exc
                try:
                    current = self.get(session_id, key, what)
                except StorageError:
                    current = None  # unreachable for now: send again
                else:
                    if current is not None and current[0] == data:
                        return current[1]
                    if current is not None and current[1] != if_match:
                        raise CommitConflict(session_id) from None
            if time.monotonic() >= deadline:
                assert last is not None
                err = self.error(session_id, what, key, last)
                err.maybe_committed = ambiguous
                raise err from last
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def delete_keys(self, session_id: str | None, keys: Iterable[str], what: str) -> None:
        """Remove objects (batches of up to 1000; absent ones are fine)."""
        batch: list[str] = []

        def flush() -> None:
            if not batch:
                return
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self.error(session_id, what, batch[0], exc) from exc
            for e in resp.get("Errors") or ():
                if e.get("Code") not in ("NoSuchKey", None):
                    raise StorageError(
                        session_id,
                        f"cannot {what}: {e.get('Code')}: {e.get('Message', '')}".strip(),
                        path=self.url(str(e.get("Key", batch[0]))),
                    )
            batch.clear()

        for k in keys:
            batch.append(k)
            if len(batch) >= 1000:
                flush()
        flush()

    def delete_key(
        self, session_id: str | None, key: str, what: str, *, if_match: str | None = None
    ) -> bool:
        """Remove one object; with `if_match` only that version (False if it changed)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None and not self._no_conditional_delete:
            kwargs["IfMatch"] = if_match
        try:
            self.client.delete_object(**kwargs)
        except ClientError as exc:
            status, code = _status(exc)
            if status == 412:
                return False
            if _missing(exc):
                return True
            if "IfMatch" in kwargs and (status == 501 or code in _UNSUPPORTED):
                # A server without conditional deletes: the caller checked the version
                # just before; delete it plainly from now on.
                self._no_conditional_delete = True
                return self.delete_key(session_id, key, what)
            raise self.error(session_id, what, key, exc) from exc
        except BotoCoreError as exc:
            raise self.error(session_id, what, key, exc) from exc
        return True

    def list_objects(
        self, session_id: str | None, prefix: str, *, after: str | None = None
    ) -> list[_Obj]:
        """Every object under `prefix` (all pages), names relative to it."""
        out: list[_Obj] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after is not None:
            kwargs["StartAfter"] = after
        try:
            while True:
                resp = self.client.list_objects_v2(**kwargs)
                now = _server_time(resp)
                for o in resp.get("Contents") or ():
                    key = str(o["Key"])
                    modified = _timestamp(o.get("LastModified"))
                    out.append(
                        _Obj(
                            key[len(prefix) :],
                            key,
                            int(o.get("Size") or 0),
                            str(o.get("ETag") or ""),
                            modified,
                            max(0.0, now - modified),
                        )
                    )
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    return out
                kwargs["ContinuationToken"] = token
                kwargs.pop("StartAfter", None)
        except (ClientError, BotoCoreError) as exc:
            raise self.error(session_id, "list objects", prefix, exc) from exc

    def list_records(self, session_id: str, *, after: int) -> list[tuple[int, _Obj]]:
        """The session's record objects with a sequence number above `after`, in order."""
        base = self.session_key(session_id)
        start = base + ondisk.record_name(after) if after >= 0 else None
        out = []
        for o in self.list_objects(session_id, base + ondisk.RECORDS_DIR + "/", after=start):
            seq = ondisk.record_seq(f"{ondisk.RECORDS_DIR}/{o.name}")
            if seq is not None and seq > after:
                out.append((seq, o))
        out.sort(key=lambda t: t[0])
        return out

    def fetch_records(self, session_id: str, run: Sequence[tuple[int, _Obj]]) -> list[bytes] | None:
        """The bodies of listed records (cached ones reused); None if one vanished."""

        def one(item: tuple[int, _Obj]) -> bytes | None:
            seq, o = item
            body = self.cache.get(session_id, seq, o.etag)
            if body is not None:
                return body
            got = self.get(session_id, o.key, "read record")
            if got is None:
                return None
            self.cache.put(session_id, seq, got[1], got[0])
            return got[0]

        bodies = self.run_parallel(one, run)
        if any(b is None for b in bodies):
            return None
        return [b for b in bodies if b is not None]

    def pool(self) -> ThreadPoolExecutor:
        """The store's request threads (shared by its calls; tasks never submit more)."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="loopstore-s3")
                self._pool_pid = os.getpid()
            return self._pool

    def run_parallel(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """`fn` over `items`, several requests in flight; the first error is raised."""
        if len(items) <= 1:
            return [fn(i) for i in items]
        futures = [self.pool().submit(fn, i) for i in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    # -- this process's commits ----------------------------------------------------------

    def note_own(self, session_id: str, seq: int) -> None:
        """Remember that this thread committed record `seq` (see `own`)."""
        with self._own_lock:
            self._own[(session_id, seq)] = threading.get_ident()
            while len(self._own) > 4096:
                self._own.popitem(last=False)

    def own(self, session_id: str, after: int, upto: int) -> bool:
        """True if every record in (after, upto] was committed by this thread."""
        if upto < after:
            return False
        me = threading.get_ident()
        with self._own_lock:
            return all(self._own.get((session_id, q)) == me for q in range(after + 1, upto + 1))

    # -- blob order (read-ahead) ----------------------------------------------------------

    def note_blob_order(self, etag: str, manifest: bytes) -> None:
        """Remember the order of a checkpoint's blobs (readers walk them in order)."""
        order: dict[str, int] = {}
        for m in _BLOB_RE.finditer(manifest):
            order.setdefault(m.group(1).decode(), len(order))
        with self._orders_lock:
            self._orders[etag] = order
            while len(self._orders) > 64:
                self._orders.popitem(last=False)

    def blob_order(self, etag: str | None) -> dict[str, int] | None:
        if etag is None:
            return None
        with self._orders_lock:
            return self._orders.get(etag)

    def check_bucket(self) -> None:
        """StorageError if the bucket is missing or unreachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status, _code = _status(exc)
            if status == 404:
                exc.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
            raise self.error(None, "open the store", self.prefix, exc) from exc
        except BotoCoreError as exc:
            raise self.error(None, "open the store", self.prefix, exc) from exc

    # -- the probe and the marker ----------------------------------------------------------

    def ensure_probed(self) -> None:
        """Before the first write of this process to this endpoint and bucket: check the
        server refuses stale conditional writes (see `probe`). Cached per process."""
        key = (self.endpoint_url, self.bucket)
        if _probed.get(key):
            return
        with _probe_lock:
            if _probed.get(key):
                return
            self.probe()
            _probed[key] = True

    def probe(self) -> None:
        """Refuse a server that ignores If-None-Match or If-Match.

        Under ``prefix/.loopstore-probe/<unique>``: a create-only PUT, a compare-and-swap
        with the current ETag (must succeed), one with the stale ETag (must be refused
        with 412) and a second create-only PUT (must be refused with 412). loopstore's
        commits are exactly these requests: on a server that ignores them, concurrent
        writers would overwrite each other's commits silently.
        """
        key = f"{self.prefix}{PROBE_DIR}{uuid.uuid4().hex}"
        ignored: list[str] = []
        server = ""

        def put(body: bytes, **cond: str) -> tuple[bool, str]:
            nonlocal server
            try:
                resp = self.once.put_object(Bucket=self.bucket, Key=key, Body=body, **cond)
            except ClientError as exc:
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                server = server or str(headers.get("server") or "")
                status, code = _status(exc)
                if status == 412:
                    return False, ""
                if status in (400, 501) or code == "NotImplemented":
                    raise self._refuse(
                        f"it rejects conditional writes ({code or status}): "
                        "loopstore's commits need If-None-Match and If-Match",
                        server,
                    ) from exc
                raise self.error(None, "probe the object store", key, exc) from exc
            except BotoCoreError as exc:
                raise self.error(None, "probe the object store", key, exc) from exc
            headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            server = server or str(headers.get("server") or "")
            return True, str(resp["ETag"])

        try:
            ok, first = put(b"loopstore probe 1", IfNoneMatch="*")
            if not ok:
                raise self._refuse("a create-only PUT of a new key was refused", server)
            ok, _second = put(b"loopstore probe 2", IfMatch=first)
            if not ok:
                raise self._refuse("a compare-and-swap with the current ETag was refused", server)
            ok, _ = put(b"loopstore probe 3", IfMatch=first)
            if ok:
                ignored.append("If-Match (a PUT with a stale ETag was accepted)")
            ok, _ = put(b"loopstore probe 4", IfNoneMatch="*")
            if ok:
                ignored.append("If-None-Match (a create-only PUT overwrote an existing object)")
        finally:
            with contextlib.suppress(StorageError):
                self.delete_key(None, key, "remove probe object")
        if ignored:
            raise self._refuse("it ignores " + " and ".join(ignored), server)

    def _refuse(self, why: str, server: str) -> StorageError:
        named = f" ({server})" if server else ""
        return StorageError(
            None,
            f"the object store at {self.endpoint_url}{named} cannot host a loopstore store: "
            f"{why}; loopstore commits by compare-and-swap, so concurrent writers would "
            "silently overwrite each other there. Refusing to write",
            path=self.url(self.prefix),
        )

    def _open_marker(self) -> None:
        """Read the store marker (refusing a newer format); create it if missing."""
        key = self.prefix + ondisk.MARKER_NAME
        got = self.get(None, key, "read store marker")
        if got is None:
            self._refuse_foreign_prefix()
            self.ensure_probed()
            with contextlib.suppress(CommitConflict):  # another process created it
                self.put_new(None, key, ondisk.marker_bytes(), "write store marker")
            got = self.get(None, key, "read store marker")
            if got is None:
                raise StorageError(None, "store marker vanished", path=self.url(key))
        try:
            self.format_version = ondisk.check_marker(got[0], Path(ondisk.MARKER_NAME))
        except UnsupportedFormat as exc:
            raise UnsupportedFormat(None, exc.cause, path=self.url(key)) from None

    def _refuse_foreign_prefix(self) -> None:
        """A bucket prefix holding other objects and no marker is not made a store."""
        try:
            resp = self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/", MaxKeys=20
            )
        except (ClientError, BotoCoreError) as exc:
            raise self.error(None, "list store prefix", self.prefix, exc) from exc
        names = [str(o["Key"])[len(self.prefix) :] for o in resp.get("Contents") or ()]
        names += [str(p["Prefix"])[len(self.prefix) :] for p in resp.get("CommonPrefixes") or ()]
        allowed = {f"{ondisk.SESSIONS_DIR}/", PROBE_DIR, ondisk.MARKER_NAME}
        foreign = sorted(n for n in names if n not in allowed)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UnsupportedFormat(
                None,
                f"not a loopstore store: the bucket prefix is not empty ({shown}) and has no "
                f"{ondisk.MARKER_NAME}; refusing to make it a store",
                path=self.url(self.prefix),
            )

    # -- sessions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, session_id: str) -> Iterator[S3Session]:
        """A handle on the session (requests are made as it is used)."""
        h = S3Session(self, session_id)
        try:
            yield h
        finally:
            h.close()

    def tip(self, session_id: str) -> _Tip | None:
        """The manifest and the last record of a session; None without a manifest."""
        key = self.session_key(session_id) + ondisk.MANIFEST_NAME
        got = self.get(session_id, key, "read manifest")
        if got is None:
            return None
        data, etag = got
        gen = _manifest_generation(data, session_id)
        run: list[tuple[int, _Obj]] = []
        for seq, o in self.list_records(session_id, after=gen):
            if seq != gen + len(run) + 1:
                break
            run.append((seq, o))
        torn = None
        while run:
            last, last_obj = run.pop()
            body = self.get(session_id, last_obj.key, "read record")
            if body is None:
                return _Tip(etag, gen, last, False, None, torn)
            url = self.url(last_obj.key)
            frame = _one_frame(session_id, last, body[0], url)
            if frame is not None:
                dead = _is_tombstone([frame])
                return _Tip(etag, gen, last, dead, last_obj if dead else None, torn)
            if torn is not None:
                raise _torn_inside(session_id, self.url(torn.key))
            torn = last_obj
        return _Tip(etag, gen, gen, False, None, torn)

    def has_manifest(self, session_id: str) -> bool:
        """True for a live session (a manifest, and no tombstone after it)."""
        t = self.tip(session_id)
        return t is not None and not t.deleted

    def create(self, session_id: str, manifest: bytes, first: bytes) -> None:
        """Publish a new session whole: its first record folded into a checkpoint.

        The record is applied to the generation-0 state, its blobs are created, then the
        checkpoint is created (create-only): readers see no session or the whole first
        commit. CommitConflict if the session exists (the writer re-reads and appends).
        A deleted session's remains are dealt with first (see `_clear_for_create`); the
        new checkpoint's generation follows every sequence number left there.
        """
        m0 = ondisk.decode_manifest(manifest, session_id=session_id, path=None)
        state = journal.SessionState.from_manifest(m0, len(manifest))
        frames, _end = journal.scan(first, 0)
        state = state.replay(frames)
        named = state.blobs
        blobs = [
            ondisk.EncodedBlob(
                d,
                span.raw_size,
                first[span.locator + span.start : span.locator + span.start + span.length],
            )
            for d, span in state.journal_blobs.items()
            if d in named
        ]

        def build(generation: int) -> bytes:
            data, _m = ondisk.encode_manifest(
                session_id, generation, state.committed_at_ns, state.header, state.entries
            )
            return data

        self._publish(session_id, build, blobs, floor=state.generation)

    def install(
        self,
        session_id: str,
        manifest: bytes,
        generation: int,
        blobs: Sequence[ondisk.EncodedBlob],
        links: Mapping[str, Path],
    ) -> tuple[list[str], list[str]]:
        """Publish a session at rest (a backup's copy): its blobs, then its checkpoint
        (create-only). Returns ([], the digests written)."""
        m = ondisk.decode_manifest(manifest, session_id=session_id, path=None)

        def build(gen: int) -> bytes:
            if gen == m.generation:
                return manifest
            data, _m = ondisk.encode_manifest(session_id, gen, m.committed_at_ns, m.header, m.loops)
            return data

        return self._publish(session_id, build, blobs, floor=m.generation)

    def _publish(
        self,
        session_id: str,
        build: Callable[[int], bytes],
        blobs: Sequence[ondisk.EncodedBlob],
        *,
        floor: int,
    ) -> tuple[list[str], list[str]]:
        self.ensure_probed()
        after = self._clear_for_create(session_id)
        generation = max(floor, after + 1)
        data = build(generation)
        with self.session(session_id) as h:
            _linked, written = h.materialize(blobs)
            key = self.session_key(session_id) + ondisk.MANIFEST_NAME
            etag = self.put_new(session_id, key, data, "write manifest")
            h._etag = etag
            h._recheck_kept()
        self.note_blob_order(etag, data)
        return [], written

    def _clear_for_create(self, session_id: str) -> int:
        """Make way for a new session; returns the highest sequence number left there.

        Nothing there: 0. A live session: CommitConflict. A deleted one (a tombstone,
        with or without its manifest): if the tombstone is younger than DELETE_SETTLE_S
        and other objects remain, its deleter is still at work: CommitConflict (the
        writer retries); otherwise its cleanup is finished here (only what predates the
        tombstone). Records left by writers that raced a delete are left for gc; they
        sit at or below the returned number, which the new checkpoint's generation
        passes, so they are never read.
        """
        base = self.session_key(session_id)
        objs = self.list_objects(session_id, base)
        if not objs:
            return 0
        manifest = next((o for o in objs if o.name == ondisk.MANIFEST_NAME), None)
        records = sorted((seq, o) for o in objs if (seq := ondisk.record_seq(o.name)) is not None)
        top = records[-1][0] if records else 0
        if manifest is not None:
            t = self.tip(session_id)
            if t is not None and not t.deleted:
                raise CommitConflict(session_id)
            if t is not None:
                tomb_obj = t.tombstone
                if tomb_obj is None or tomb_obj.age < DELETE_SETTLE_S:
                    raise CommitConflict(session_id)
                self._finish_delete(session_id, t.last, t.etag, tomb_obj.modified)
            return max(top, t.last if t is not None else 0)
        if not records:
            return 0
        tomb_seq, tomb = records[-1]
        got = self.get(session_id, tomb.key, "read record")
        if got is None:
            raise CommitConflict(session_id)  # removed as we looked: look again
        frame = _one_frame(session_id, tomb_seq, got[0], self.url(tomb.key))
        if frame is None or not _is_tombstone([frame]):
            return top
        others = [o for o in objs if o.key != tomb.key and o.modified <= tomb.modified + 1]
        if others:
            if tomb.age < DELETE_SETTLE_S:
                raise CommitConflict(session_id)
            self._finish_delete(session_id, tomb_seq, None, tomb.modified)
        return top

    def delete(self, session_id: str) -> bool:
        """Delete a live session (the store's delete): a tombstone record, then its objects.

        The tombstone is committed by compare-and-swap at the next sequence number
        (retried within lock_timeout): a concurrent append either takes its number
        first (and the tombstone lands after it) or conflicts and finds the session
        deleted. Then the manifest goes (readers: not found), then every other object
        but the tombstone (see the module docstring).
        """
        return self._delete_live(session_id)

    def remove_remains(self, session_id: str) -> bool:
        """Remove only what a deleted or never-published session left behind (gc); a
        live session is never touched. True if anything was removed."""
        return self._remove_remains(session_id)

    def _delete_live(self, session_id: str) -> bool:
        self.ensure_probed()
        deadline = time.monotonic() + self.locks.timeout
        delay = 0.002
        base = self.session_key(session_id)
        while True:
            t = self.tip(session_id)
            if t is None:
                return self._remove_remains(session_id)
            if t.deleted:
                break
            seq = t.last + 1
            meta = {
                "seq": seq,
                "at_ns": time.time_ns(),
                "ids": [f"delete.{uuid.uuid4().hex}"],
                "ops": [{"op": "delete"}],
            }
            frame = journal.encode_frame(journal.KIND_RECORD, meta)
            key = base + ondisk.record_name(seq)
            over = t.torn.etag if t.torn is not None else None
            try:
                self.put_record(session_id, key, frame, over, "commit tombstone")
                break
            except CommitConflict:
                pass
            if time.monotonic() >= deadline:
                raise self.locks.locked_error(session_id, "other writers kept committing first")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        t = self.tip(session_id)
        if t is None or not t.deleted:  # pragma: no cover - someone else finished it
            return True
        self._finish_delete(session_id, t.last, t.etag, None)
        return True

    def _finish_delete(
        self, session_id: str, tomb_seq: int, manifest_etag: str | None, before: float | None
    ) -> None:
        """Remove a deleted session's manifest (that version only), then every other
        object except the tombstone record. `before` (a takeover of a cleanup cut
        short) limits it to objects no newer than the tombstone and records at or
        below it: a session being created again meanwhile keeps its own objects."""
        base = self.session_key(session_id)
        if manifest_etag is not None:
            for _attempt in range(8):
                if self.delete_key(
                    session_id,
                    base + ondisk.MANIFEST_NAME,
                    "delete manifest",
                    if_match=manifest_etag,
                ):
                    break
                t = self.tip(session_id)  # a fold raced the tombstone: still deleted?
                if t is None:
                    break  # removed by someone else
                if not t.deleted:
                    return  # a new session already: not ours
                manifest_etag = t.etag
        tomb_key = base + ondisk.record_name(tomb_seq)
        doomed = []
        for o in self.list_objects(session_id, base):
            if o.key == tomb_key or o.name == ondisk.MANIFEST_NAME:
                continue
            seq = ondisk.record_seq(o.name)
            if before is not None and (
                (seq is not None and seq > tomb_seq) or (seq is None and o.modified > before + 1)
            ):
                continue
            doomed.append(o.key)
        self.delete_keys(session_id, doomed, "delete session objects")
        self.cache.drop_session(session_id)

    def _remove_remains(self, session_id: str) -> bool:
        """Remove what a session without a live manifest left (gc's "incomplete")."""
        base = self.session_key(session_id)
        objs = self.list_objects(session_id, base)
        if not objs:
            return False
        if any(o.name == ondisk.MANIFEST_NAME for o in objs):
            t = self.tip(session_id)
            if t is not None and not t.deleted:
                return False  # live: not ours to remove
            if t is not None:
                before = t.tombstone.modified if t.tombstone is not None else None
                self._finish_delete(session_id, t.last, t.etag, before)
                objs = self.list_objects(session_id, base)
        keys = [o.key for o in objs if o.name != ondisk.MANIFEST_NAME]
        self.delete_keys(session_id, keys, "delete session objects")
        self.cache.drop_session(session_id)
        return bool(keys)

    def list_sessions(self) -> list[str]:
        prefix = self.sessions_key
        out: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        try:
            while True:
                resp = self.client.list_objects_v2(**kwargs)
                for p in resp.get("CommonPrefixes") or ():
                    name = str(p["Prefix"])[len(prefix) : -1]
                    if ondisk.is_valid_session_id(name):
                        out.append(name)
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    return out
                kwargs["ContinuationToken"] = token
        except (ClientError, BotoCoreError) as exc:
            raise self.error(None, "list sessions", prefix, exc) from exc

    # -- group commit: not on object stores ------------------------------------------------

    @contextlib.contextmanager
    def queue(self, session_id: str, *, create: bool) -> Iterator[HandoffQueue | None]:
        """There is no hand-off queue (`handoff` is False): writers commit by
        compare-and-swap. Looking for one finds none; creating one is an error."""
        if create:
            raise NotImplementedError("object stores commit by compare-and-swap: no hand-off")
        yield None

    # -- maintenance -----------------------------------------------------------------------

    def _stat(self, o: _Obj, name: str) -> FileStat:
        return FileStat(name, self.url(o.key), o.size, o.age)

    def list_session_files(self, session_id: str) -> list[FileStat]:
        """The session's objects other than blobs: manifest.json and its records, named
        relative to the session (``log/<seq:020d>.rec``; `ondisk.record_seq` reads them)."""
        base = self.session_key(session_id)
        loops = ondisk.LOOPS_DIR + "/"
        return [
            self._stat(o, o.name)
            for o in self.list_objects(session_id, base)
            if not o.name.startswith(loops)
        ]

    def list_blobs(self, session_id: str) -> list[FileStat]:
        base = self.session_key(session_id) + ondisk.LOOPS_DIR + "/"
        objs = self.list_objects(session_id, base)
        for o in objs:
            self._listed_blobs[(session_id, o.name)] = o.modified
        return [self._stat(o, o.name) for o in objs]

    def delete_blob(self, session_id: str, name: str) -> None:
        """Remove a blob gc found unreferenced, unless a writer refreshed it since the
        listing (it is being named again)."""
        key = self.session_key(session_id) + ondisk.LOOPS_DIR + "/" + name
        listed = self._listed_blobs.pop((session_id, name), None)
        if listed is not None:
            try:
                resp = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _missing(exc):
                    return
                raise self.error(session_id, "stat blob", key, exc) from exc
            except BotoCoreError as exc:
                raise self.error(session_id, "stat blob", key, exc) from exc
            if _timestamp(resp.get("LastModified")) > listed:
                return
        self.delete_key(session_id, key, "delete blob")

    def delete_session_file(self, session_id: str, name: str) -> None:
        """Remove a session object by its name (``log/…rec``; a bare ``…rec`` works too)."""
        if "/" not in name and name.endswith(ondisk.RECORD_SUFFIX):
            name = f"{ondisk.RECORDS_DIR}/{name}"
        self.delete_key(session_id, self.session_key(session_id) + name, "delete session object")

    def session_dir_age(self, session_id: str) -> float | None:
        """Age of the newest object of the session (None if it has none)."""
        objs = self.list_objects(session_id, self.session_key(session_id))
        if not objs:
            return None
        return min(o.age for o in objs)

    def list_tmp(self) -> list[FileStat]:
        return []

    def delete_tmp(self, name: str) -> None:
        return None

    def list_queue(self, session_id: str) -> list[FileStat]:
        return []

    def delete_queue_file(self, session_id: str, name: str) -> None:
        return None


def s3_store_exists(location: str, endpoint: Endpoint | None = None) -> bool:
    """True if the marker object is there (nothing is created)."""
    backend = S3Backend(location, endpoint=endpoint, create=False)
    try:
        key = backend.prefix + ondisk.MARKER_NAME
        try:
            backend.client.head_object(Bucket=backend.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                backend.check_bucket()
                return False
            raise backend.error(None, "find the store", key, exc) from exc
        except BotoCoreError as exc:
            raise backend.error(None, "find the store", key, exc) from exc
        return True
    finally:
        backend.close()


__all__ = ["Endpoint", "S3Backend", "S3Session", "parse_location", "s3_store_exists"]
