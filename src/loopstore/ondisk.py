"""On-disk format v2: the only module that knows names, paths and encodings.

Layout (docs/FORMAT.md has the whole protocol)::

    ROOT/
      loopstore.json                  store marker (format, version, hash, codec)
      sessions/<session_id>/
        manifest.json                 checkpoint: header + ordered loop index + checksum
        journal-<generation>.log      commit records since that checkpoint (loopstore.journal)
        loops/<xxh3-128 hex>.zst      immutable loop blobs (one zstd frame each)
      locks/<session_id>.lock         lock files, never unlinked
      locks/<session_id>.q/           group-commit hand-off files (transient, never synced)
      tmp/                            staging for atomic writes
      catalog.sqlite                  listing index derived from the sessions (a cache)

Everything here is pure (bytes in, bytes out), so the codecs can be tested without a
filesystem and the object-store backend reuses them unchanged. pydantic_core is imported
by the two functions that write pretty JSON, so that listings start fast.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from pathlib import Path, PurePath
from types import MappingProxyType
from typing import Any, Final

import xxhash
import zstandard

from loopstore._timestamps import timestamp_nanos
from loopstore.errors import CorruptSession, InvalidSessionId, UnsupportedFormat

FORMAT_NAME: Final = "loopstore"
FORMAT_VERSION: Final = 2
#: Version 1 (no journal: every commit rewrote manifest.json) is read, and upgraded on write.
OLDEST_READABLE_VERSION: Final = 1
HASH_NAME: Final = "xxh3_128"
CODEC_NAME: Final = "zstd"
MANIFEST_FORMAT: Final = "loopstore.manifest"

MARKER_NAME: Final = "loopstore.json"
SESSIONS_DIR: Final = "sessions"
LOCKS_DIR: Final = "locks"
TMP_DIR: Final = "tmp"
MANIFEST_NAME: Final = "manifest.json"
LOOPS_DIR: Final = "loops"
BLOB_SUFFIX: Final = ".zst"
LOCK_SUFFIX: Final = ".lock"
QUEUE_SUFFIX: Final = ".q"
JOURNAL_PREFIX: Final = "journal-"
JOURNAL_SUFFIX: Final = ".log"
RECORDS_DIR: Final = "log"
RECORD_SUFFIX: Final = ".rec"
#: On an object store a session's records are objects log/<seq, 20 digits>.rec.
TMP_SUFFIX: Final = ".tmp"
DELETED_PREFIX: Final = "deleted-"
NEW_SESSION_PREFIX: Final = "new-"
CATALOG_NAME: Final = "catalog.sqlite"
#: SQLite adds "-wal" and "-shm" beside it; all three are derived and never backed up.

MAX_SESSION_ID_BYTES: Final = 200
#: Session ids name directories; 200 bytes leaves room for suffixes within NAME_MAX (255).
HASH_HEX_CHARS: Final = 32
JSON_INDENT: Final = 2
#: Blobs hold each loop exactly as phi-core's pretty JSON has it (2-space indent, at the
#: loop's own level): a session's file is then its blobs spliced into its header, with
#: no parsing, and `cat`, `export-legacy` and `load_json` cost what reading them costs.
DEFAULT_COMPRESSION_LEVEL: Final = 3
#: zstd level 3 compresses loop JSON ~20-30x at ~1 GB/s on one core; higher levels cost
#: several times the CPU for a few percent.

_BLOB_NAME_RE = re.compile(r"^[0-9a-f]{32}\.zst$")
_CHECKSUM_KEY = b',"checksum":"'
_CHECKSUM_PREFIX = HASH_NAME + ":"


# --------------------------------------------------------------------------- ids


def validate_session_id(session_id: object) -> str:
    """Return `session_id` if it can name a directory, else raise InvalidSessionId.

    Refused: non-str, empty, more than 200 bytes of UTF-8 (or not encodable), a path
    separator or NUL, and the names `.` and `..`. Everything else is a valid id.
    """
    if not isinstance(session_id, str):
        raise InvalidSessionId(None, f"session id must be a str, got {type(session_id).__name__}")
    if session_id == "":
        raise InvalidSessionId(session_id, "session id is empty")
    try:
        size = len(session_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidSessionId(session_id, "session id is not valid UTF-8 text") from None
    if size > MAX_SESSION_ID_BYTES:
        raise InvalidSessionId(
            session_id, f"session id is {size} bytes of UTF-8 (max {MAX_SESSION_ID_BYTES})"
        )
    for bad, what in (("/", "'/'"), ("\\", "'\\\\'"), ("\x00", "NUL")):
        if bad in session_id:
            raise InvalidSessionId(session_id, f"session id contains {what}")
    if session_id in (".", ".."):
        raise InvalidSessionId(session_id, "session id cannot be '.' or '..'")
    return session_id


def is_valid_session_id(name: str) -> bool:
    try:
        validate_session_id(name)
    except InvalidSessionId:
        return False
    return True


def is_store_entry(name: str) -> bool:
    """True for a name a store (or one being created) has at its root.

    A directory holding anything else is someone's files: it is never made a store.
    """
    return (
        name in (SESSIONS_DIR, LOCKS_DIR, TMP_DIR)
        or name.startswith("loopstore")  # the marker, a demo's own marker
        or name.startswith(CATALOG_NAME.split(".", 1)[0])  # catalog.sqlite*, catalog.pending
    )


def is_blob_name(name: str) -> bool:
    return _BLOB_NAME_RE.match(name) is not None


# --------------------------------------------------------------------------- names/paths


def blob_filename(digest: str) -> str:
    return digest + BLOB_SUFFIX


def journal_filename(generation: int) -> str:
    """The journal that follows the checkpoint of `generation`."""
    return f"{JOURNAL_PREFIX}{generation}{JOURNAL_SUFFIX}"


def journal_generation(name: str) -> int | None:
    """The checkpoint generation a journal file name belongs to, or None if not one."""
    if not (name.startswith(JOURNAL_PREFIX) and name.endswith(JOURNAL_SUFFIX)):
        return None
    digits = name[len(JOURNAL_PREFIX) : -len(JOURNAL_SUFFIX)]
    return int(digits) if digits.isdigit() and digits == str(int(digits)) else None


def record_name(seq: int) -> str:
    """An object store's commit record `seq` (one object per record, under the session)."""
    return f"{RECORDS_DIR}/{seq:020d}{RECORD_SUFFIX}"


def record_seq(name: str) -> int | None:
    """The sequence number of a record object's name (relative to its session), or None."""
    if not (name.startswith(RECORDS_DIR + "/") and name.endswith(RECORD_SUFFIX)):
        return None
    digits = name[len(RECORDS_DIR) + 1 : -len(RECORD_SUFFIX)]
    return int(digits) if len(digits) == 20 and digits.isdigit() else None


def queue_dirname(session_id: str) -> str:
    return validate_session_id(session_id) + QUEUE_SUFFIX


def lock_filename(session_id: str) -> str:
    return validate_session_id(session_id) + LOCK_SUFFIX


@dataclass(frozen=True)
class Layout:
    """Path builder for one store root (paths are for messages, listings and tools)."""

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    @property
    def sessions_dir(self) -> Path:
        return self.root / SESSIONS_DIR

    @property
    def locks_dir(self) -> Path:
        return self.root / LOCKS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR

    def session_dir(self, session_id: str) -> Path:
        return self.sessions_dir / validate_session_id(session_id)

    def manifest(self, session_id: str) -> Path:
        return self.session_dir(session_id) / MANIFEST_NAME

    def loops_dir(self, session_id: str) -> Path:
        return self.session_dir(session_id) / LOOPS_DIR

    def blob(self, session_id: str, digest: str) -> Path:
        return self.loops_dir(session_id) / blob_filename(digest)

    def journal(self, session_id: str, generation: int) -> Path:
        return self.session_dir(session_id) / journal_filename(generation)

    def lock(self, session_id: str) -> Path:
        return self.locks_dir / lock_filename(session_id)

    def queue(self, session_id: str) -> Path:
        return self.locks_dir / queue_dirname(session_id)

    @property
    def catalog(self) -> Path:
        return self.root / CATALOG_NAME

    def tmp(self, name: str) -> Path:
        return self.tmp_dir / name


# --------------------------------------------------------------------------- marker


def marker_bytes() -> bytes:
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "hash": HASH_NAME,
        "codec": CODEC_NAME,
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def check_marker(data: bytes, path: Path) -> int:
    """The store's format version; refuse a store this code cannot read (newer, foreign)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedFormat(None, f"store marker is not JSON: {exc}", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormat(None, "not a loopstore store marker", path=path)
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UnsupportedFormat(None, f"store marker has no valid version: {version!r}", path=path)
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            None,
            f"store format version {version} is newer than this loopstore supports "
            f"({FORMAT_VERSION}); upgrade loopstore",
            path=path,
        )
    if version < OLDEST_READABLE_VERSION:
        raise UnsupportedFormat(None, f"unknown store format version {version}", path=path)
    if doc.get("hash") != HASH_NAME or doc.get("codec") != CODEC_NAME:
        raise UnsupportedFormat(
            None,
            f"store uses hash {doc.get('hash')!r} / codec {doc.get('codec')!r}; "
            f"this loopstore supports {HASH_NAME}/{CODEC_NAME}",
            path=path,
        )
    return version


# --------------------------------------------------------------------------- blobs


class DamagedBlob(CorruptSession):
    """A blob that does not decode or does not hash to its name (`kind` says which)."""

    kind: str = "undecodable"

    def __init__(
        self,
        session_id: str | None,
        cause: str,
        *,
        path: str | PurePath | None = None,
        kind: str = "undecodable",
    ) -> None:
        super().__init__(session_id, cause, path=path)
        self.kind = kind


_codec_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_codec_local, "cctx", None)
    if cache is None:
        cache = {}
        _codec_local.cctx = cache
    cctx = cache.get(level)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        cache[level] = cctx
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_codec_local, "dctx", None)
    if dctx is None:
        dctx = zstandard.ZstdDecompressor()
        _codec_local.dctx = dctx
    return dctx


def digest(raw: bytes) -> str:
    """Content address: xxh3-128 hex digest of the uncompressed bytes."""
    return xxhash.xxh3_128_hexdigest(raw)


@dataclass(frozen=True)
class EncodedBlob:
    digest: str
    raw_size: int
    data: bytes

    @property
    def name(self) -> str:
        return blob_filename(self.digest)

    @property
    def stored_size(self) -> int:
        return len(self.data)


def encode_blob(
    raw: bytes, level: int = DEFAULT_COMPRESSION_LEVEL, *, known_digest: str | None = None
) -> EncodedBlob:
    """One zstd frame with the content size recorded, named by the raw bytes' hash
    (`known_digest`, when the caller already hashed `raw`)."""
    name = digest(raw) if known_digest is None else known_digest
    return EncodedBlob(name, len(raw), _compressor(level).compress(raw))


def decode_blob(
    data: bytes,
    expected_digest: str,
    *,
    session_id: str,
    path: Path | None,
    expected_raw_size: int | None = None,
) -> bytes:
    """Decompress and verify a blob; any damage is CorruptSession naming the file."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise DamagedBlob(session_id, f"undecodable blob: {exc}", path=path) from None
    if size < 0:
        raise DamagedBlob(session_id, "undecodable blob: no content size", path=path)
    if expected_raw_size is not None and size != expected_raw_size:
        raise DamagedBlob(
            session_id,
            f"undecodable blob: frame says {size} bytes, manifest says {expected_raw_size}",
            path=path,
        )
    try:
        raw = _decompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise DamagedBlob(session_id, f"undecodable blob: {exc}", path=path) from None
    actual = digest(raw)
    if actual != expected_digest:
        raise DamagedBlob(
            session_id,
            f"hash mismatch: blob content hashes to {actual}",
            path=path,
            kind="hash_mismatch",
        )
    return raw


def blob_frame_size(data: bytes) -> int | None:
    """The content size a blob's frame header claims, or None if it has none."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        return None
    return size if size >= 0 else None


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class LoopEntry:
    """One line of the loop index: enough for listings and tree views."""

    loop_id: str
    blob: str
    raw_size: int
    stored_size: int
    status: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    parent_loop_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "loop_id": self.loop_id,
            "blob": self.blob,
            "raw_size": self.raw_size,
            "stored_size": self.stored_size,
            "status": self.status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "parent_loop_id": self.parent_loop_id,
        }

    @cached_property
    def encoded(self) -> bytes:
        return json.dumps(self.as_json(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, obj: object, line: bytes | None = None) -> LoopEntry:
        """Build from parsed JSON, checked (the blob name becomes a file name).

        `line` is the entry's exact encoded bytes, reused so that re-publishing an
        unchanged entry costs no serialization.
        """
        if type(obj) is not dict or obj.keys() != _ENTRY_KEYS:
            return cls._from_json_slow(obj)
        blob = obj["blob"]
        if (
            type(obj["loop_id"]) is not str
            or type(blob) is not str
            or _HEX32_RE.fullmatch(blob) is None
            or type(obj["raw_size"]) is not int
            or type(obj["stored_size"]) is not int
            or type(obj["status"]) not in _OPT_TYPES
            or type(obj["started_at"]) not in _OPT_TYPES
            or type(obj["ended_at"]) not in _OPT_TYPES
            or type(obj["parent_loop_id"]) not in _OPT_TYPES
        ):
            return cls._from_json_slow(obj)
        entry = cls.__new__(cls)
        entry.__dict__.update(obj)  # frozen dataclass: fields set without __setattr__
        if line is not None:
            entry.__dict__["encoded"] = line
        return entry

    @classmethod
    def _from_json_slow(cls, obj: object) -> LoopEntry:
        if not isinstance(obj, dict):
            raise ValueError("loop entry is not an object")
        loop_id, blob = obj.get("loop_id"), obj.get("blob")
        raw_size, stored_size = obj.get("raw_size"), obj.get("stored_size")
        if not isinstance(loop_id, str) or not isinstance(blob, str):
            raise ValueError("loop entry lacks loop_id/blob")
        if _HEX32_RE.fullmatch(blob) is None:
            raise ValueError(f"loop entry has a bad blob name {blob!r}")
        if not isinstance(raw_size, int) or not isinstance(stored_size, int):
            raise ValueError("loop entry lacks sizes")
        opt: dict[str, str | None] = {}
        for key in _OPTIONAL_KEYS:
            value = obj.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"loop entry field {key} is not a string")
            opt[key] = value
        return cls(loop_id, blob, raw_size, stored_size, **opt)


_OPTIONAL_KEYS = ("status", "started_at", "ended_at", "parent_loop_id")
_ENTRY_KEYS = frozenset(("loop_id", "blob", "raw_size", "stored_size", *_OPTIONAL_KEYS))
_OPT_TYPES = (str, type(None))
_HEX32_RE = re.compile(r"[0-9a-f]{32}")
_LOOPS_START = b',\n"loops":[\n'
_LOOPS_END = b"\n]" + _CHECKSUM_KEY
_LOOPS_EMPTY = b',\n"loops":[]' + _CHECKSUM_KEY


def _entry_lines(data: bytes, count: int) -> list[bytes] | None:
    """The encoded bytes of each loop entry (one per line), if the layout is ours."""
    start = data.find(_LOOPS_START)
    end = data.rfind(_LOOPS_END)
    if start < 0 or end < start or count == 0:
        return None
    lines = data[start + len(_LOOPS_START) : end].split(b",\n")
    return lines if len(lines) == count else None


_loop_id_of = attrgetter("loop_id")
_blob_of = attrgetter("blob")


@dataclass(frozen=True)
class Manifest:
    """A session's committed state: header, ordered loop index, generation."""

    session_id: str
    generation: int
    committed_at_ns: int
    header: Mapping[str, Any]
    loops: tuple[LoopEntry, ...]
    checksum: str = ""
    version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)


def header_json(header: Mapping[str, Any]) -> bytes:
    """A session header as the manifest holds it: compact JSON, keys in their order."""
    return json.dumps(dict(header), ensure_ascii=False, separators=(",", ":")).encode()


def encode_manifest(
    session_id: str,
    generation: int,
    committed_at_ns: int,
    header: Mapping[str, Any],
    loops: tuple[LoopEntry, ...],
) -> tuple[bytes, Manifest]:
    """Serialize a manifest: one loop entry per line, a checksum of the body last.

    The checksum covers the exact bytes before ``,"checksum":`` (plus the closing
    brace), so no canonical re-serialization is needed to check it.
    """
    head = {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "session_id": session_id,
        "generation": generation,
        "committed_at_ns": committed_at_ns,
    }
    manifest = Manifest(
        session_id, generation, committed_at_ns, MappingProxyType(dict(header)), loops
    )
    parts = [
        json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1].encode(),
        b',\n"header":',
        header_json(header),
        b',\n"loops":[',
    ]
    if loops:
        parts.append(b"\n")
        parts.append(b",\n".join(e.encoded for e in loops))
        parts.append(b"\n")
    parts.append(b"]")
    body = b"".join(parts)
    hasher = xxhash.xxh3_128(body)
    hasher.update(b"}")
    checksum = _CHECKSUM_PREFIX + hasher.hexdigest()
    data = body + _CHECKSUM_KEY + checksum.encode() + b'"}\n'
    object.__setattr__(manifest, "checksum", checksum)
    return data, manifest


def _refuse_if_newer(data: bytes, session_id: str, path: Path | None) -> None:
    """A manifest that fails our checks may simply be from a newer format: say so."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    version = doc.get("version") if isinstance(doc, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UnsupportedFormat(
            session_id,
            f"manifest format version {version} is newer than supported ({FORMAT_VERSION})",
            path=path,
        )


def salvage_agent_id(data: bytes) -> str | None:
    """Best-effort agent_id of a damaged manifest, from its header line; None if unknown.

    Lets a per-agent listing skip another agent's damaged session instead of failing,
    while damage that may concern the requested agent is still reported.
    """
    start = data.find(b',\n"header":')
    end = data.find(b',\n"loops":', start + 1)
    if start < 0 or end < 0:
        return None
    try:
        header = json.loads(data[start + len(b',\n"header":') : end])
    except (UnicodeDecodeError, ValueError):
        return None
    value = header.get("agent_id") if isinstance(header, dict) else None
    return value if isinstance(value, str) else None


def manifest_checksum(data: bytes, *, session_id: str, path: Path | None) -> str:
    """Verify a manifest's self-checksum and return it; damage is CorruptSession."""
    idx = data.rfind(_CHECKSUM_KEY)
    tail = data[idx + len(_CHECKSUM_KEY) :].rstrip(b"\n") if idx >= 0 else b""
    if idx < 0 or not tail.endswith(b'"}'):
        _refuse_if_newer(data, session_id, path)
        what = "no checksum" if idx < 0 else "truncated checksum"
        raise CorruptSession(session_id, f"bad manifest: {what}", path=path)
    stored = tail[:-2].decode("ascii", "replace")
    hasher = xxhash.xxh3_128(memoryview(data)[:idx])
    hasher.update(b"}")
    actual = _CHECKSUM_PREFIX + hasher.hexdigest()
    if stored != actual:
        _refuse_if_newer(data, session_id, path)
        if not stored.startswith(_CHECKSUM_PREFIX):
            raise CorruptSession(
                session_id, f"bad manifest: unknown checksum {stored[:40]!r}", path=path
            )
        raise CorruptSession(session_id, "bad manifest: checksum mismatch", path=path)
    return actual


def _split_loops(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """(everything but the loop index, as a JSON object; one line per loop entry)."""
    start = data.find(_LOOPS_START)
    if start >= 0:
        end = data.rfind(_LOOPS_END)
        if end < start:
            return None
        return data[:start] + b"}", data[start + len(_LOOPS_START) : end].split(b",\n")
    empty = data.find(_LOOPS_EMPTY)
    if empty >= 0:
        return data[:empty] + b"}", []
    return None


_MANIFEST_KEYS: Final = frozenset(
    (
        "format",
        "version",
        "session_id",
        "generation",
        "committed_at_ns",
        "header",
        "loops",
        "checksum",
    )
)


def known_lines(entries: Iterable[LoopEntry]) -> dict[bytes, LoopEntry]:
    """Entries by their encoded line, for decoding a successor checkpoint incrementally."""
    return {e.encoded: e for e in entries}


def _decode_incremental(
    data: bytes, known: Mapping[bytes, LoopEntry]
) -> tuple[dict[str, Any], tuple[LoopEntry, ...]] | None:
    """Parse only the lines `known` lacks (a fold rewrites a checkpoint that other
    processes have already parsed, plus what its journal added); None if the layout is
    not the one we write."""
    split = _split_loops(data)
    if split is None:
        return None
    head, lines = split
    try:
        doc = json.loads(head)
        entries = tuple(
            known.get(line) or LoopEntry.from_json(json.loads(line), line) for line in lines
        )
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or "loops" in doc:
        return None
    return doc, entries


def decode_manifest(
    data: bytes,
    *,
    session_id: str,
    path: Path | None,
    checksum: str | None = None,
    known: Mapping[bytes, LoopEntry] | None = None,
) -> Manifest:
    """Parse and verify a manifest (checksum first, then structure).

    `known` (`known_lines` of an older state of the same session) lets unchanged loop
    entries be reused instead of parsed again.
    """
    if checksum is None:
        checksum = manifest_checksum(data, session_id=session_id, path=path)
    fast = _decode_incremental(data, known) if known else None
    if fast is not None:
        doc, entries = fast
        loops: object = []
    else:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptSession(session_id, f"bad manifest: {exc}", path=path) from None
        if not isinstance(doc, dict):
            raise CorruptSession(session_id, "bad manifest: not an object", path=path)
        loops = doc.get("loops")
    if doc.get("format") != MANIFEST_FORMAT:
        raise CorruptSession(session_id, "bad manifest: not a loopstore manifest", path=path)
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise CorruptSession(session_id, f"bad manifest: version {version!r}", path=path)
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            session_id,
            f"manifest format version {version} is newer than supported ({FORMAT_VERSION})",
            path=path,
        )
    generation = doc.get("generation")
    committed = doc.get("committed_at_ns", 0)
    header = doc.get("header")
    if (
        not isinstance(generation, int)
        or not isinstance(committed, int)
        or not isinstance(header, dict)
        or not isinstance(loops, list)
    ):
        raise CorruptSession(session_id, "bad manifest: missing fields", path=path)
    if doc.get("session_id") != session_id or header.get("session_id") != session_id:
        raise CorruptSession(
            session_id,
            f"bad manifest: it belongs to session {doc.get('session_id')!r}",
            path=path,
        )
    if fast is None:
        lines = _entry_lines(data, len(loops))
        try:
            if lines is None:
                entries = tuple(LoopEntry.from_json(obj) for obj in loops)
            else:
                entries = tuple(map(LoopEntry.from_json, loops, lines))
        except ValueError as exc:
            raise CorruptSession(session_id, f"bad manifest: {exc}", path=path) from None
    extra = {k: v for k, v in doc.items() if k not in _MANIFEST_KEYS}
    return Manifest(
        session_id,
        generation,
        committed,
        MappingProxyType(header),
        entries,
        checksum,
        version,
        MappingProxyType(extra),
    )


# --------------------------------------------------------------------------- session JSON


def pretty_loop(raw: bytes) -> bytes:
    """A loop blob's JSON in phi-core's pretty form (format v1 blobs were compact)."""
    if raw.startswith(b"{\n") or raw == b"{}":
        return raw
    import pydantic_core

    return pydantic_core.to_json(json.loads(raw), indent=JSON_INDENT)


_LOOPS_PLACEHOLDER = b'\n  "loops": []'


def session_json(header: Mapping[str, Any], declared: list[str], loops: list[bytes]) -> bytes:
    """phi-core's file for a session: its header with `loops` (pretty blobs) spliced in.

    `declared` is the Session model's field order: `loops` goes after the declared
    fields and before keys the model does not know, as the model would write it. The
    loops are indented one level more; JSON strings hold no raw newline, so that is a
    plain replace.
    """
    import pydantic_core

    ordered: dict[str, Any] = {k: header[k] for k in declared if k in header}
    ordered["loops"] = []
    ordered.update((k, v) for k, v in header.items() if k not in ordered)
    head = pydantic_core.to_json(ordered, indent=JSON_INDENT)
    if not loops:
        return head
    before, _, after = head.partition(_LOOPS_PLACEHOLDER)
    parts = [before, b'\n  "loops": [\n    ']
    for i, raw in enumerate(loops):
        if i:
            parts.append(b",\n    ")
        parts.append(pretty_loop(raw).replace(b"\n", b"\n    "))
    parts += (b"\n  ]", after)
    return b"".join(parts)  # one copy of the whole document


# --------------------------------------------------------------------------- time


def timestamp_ns(text: str | None) -> int | None:
    """RFC 3339 text -> integer nanoseconds since the epoch (full precision), or None."""
    if not text:
        return None
    try:
        return timestamp_nanos(text.strip())
    except ValueError:
        return None
