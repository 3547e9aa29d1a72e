"""The session journal (format v2): framed, checksummed commit records and session state.

A session's state is its checkpoint (``manifest.json``) plus the records of its journal,
applied in order. This module is pure (bytes in, state out): the filesystem and the
object-store backends store the same frames, and every reader and writer replays them
with the same `SessionState.apply`.

Frame (little-endian), the unit of the journal file and of a hand-off item::

    0   4  magic  b"LSJ1"
    4   1  kind   b"R" record, b"M" sync mark, b"I" hand-off item
    5   3  zero
    8   4  meta length (u32)
    12  4  payload length (u32)
    16  8  xxh3-64 of bytes 4..16, meta and payload
    24     meta: UTF-8 JSON
    ..     payload: the zstd blobs the record introduces, back to back

A frame that is short or whose checksum fails ends the journal: it is a torn tail that
no call acknowledged (a writer truncates it under the lock). A mark says "every byte
before me is durable, and so is the directory state that makes this journal reachable";
writers append one after their fdatasync, readers that find none make the journal
durable themselves before they return what it holds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final

import xxhash

from loopstore import ondisk

MAGIC: Final = b"LSJ1"
FRAME_HEADER = struct.Struct("<4sc3xIIQ")
#: Bytes before a frame's meta: magic, kind, padding, two lengths and the checksum.
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size
KIND_RECORD: Final = b"R"
KIND_MARK: Final = b"M"
KIND_ITEM: Final = b"I"
MAX_META_BYTES: Final = 1 << 30
#: A meta or payload longer than this is not a frame we wrote (u32 fields; sanity bound).
MARK_BYTES: Final = FRAME_HEADER_BYTES

_EMPTY: Mapping[Any, Any] = MappingProxyType({})
_BLOB = attrgetter("blob")


class JournalError(ValueError):
    """A frame that checksums correctly but does not decode: damage, not a torn tail."""


# --------------------------------------------------------------------------- frames


def _frame_end(view: memoryview, pos: int) -> int | None:
    """The end of the whole, checksummed frame at `pos`, or None if there is none."""
    if len(view) - pos < FRAME_HEADER_BYTES:
        return None
    magic, _kind, meta_len, payload_len, checksum = FRAME_HEADER.unpack_from(view, pos)
    end = pos + FRAME_HEADER_BYTES + meta_len + payload_len
    if magic != MAGIC or meta_len > MAX_META_BYTES or end > len(view):
        return None
    h = xxhash.xxh3_64(view[pos + 4 : pos + 16])
    h.update(view[pos + FRAME_HEADER_BYTES : end])
    return end if h.intdigest() == checksum else None


def is_partial_frame(data: bytes) -> bool:
    """True if `data` is shorter than the one frame it starts (nothing at all counts):
    what an interrupted write leaves. A whole-length frame that fails its checksum is
    damage, not this."""
    n = len(data)
    if n < FRAME_HEADER_BYTES:
        return data == MAGIC[:n] or data[: len(MAGIC)] == MAGIC
    magic, _kind, meta_len, payload_len, _sum = FRAME_HEADER.unpack_from(data)
    return bool(
        magic == MAGIC
        and meta_len <= MAX_META_BYTES
        and FRAME_HEADER_BYTES + meta_len + payload_len > n
    )


def _good_frame_after(view: memoryview, start: int) -> bool:
    """True if a whole, checksummed frame starts anywhere from `start` on.

    A crash tears only the end of a journal: a bad frame followed by a good one is
    damage (bit rot, an edit), which must be reported, never cut off as a torn tail.
    """
    data = view.tobytes()  # only on the rare path where a frame failed
    pos = data.find(MAGIC, start)
    while pos >= 0:
        if _frame_end(view, pos) is not None:
            return True
        pos = data.find(MAGIC, pos + 1)
    return False


def encode_frame(kind: bytes, meta: Mapping[str, Any] | None, payload: bytes = b"") -> bytes:
    meta_bytes = (
        json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode() if meta else b""
    )
    head = struct.pack("<c3xII", kind, len(meta_bytes), len(payload))
    h = xxhash.xxh3_64(head)
    h.update(meta_bytes)
    h.update(payload)
    return b"".join((MAGIC, head, struct.pack("<Q", h.intdigest()), meta_bytes, payload))


MARK: Final = encode_frame(KIND_MARK, None)
"""A sync mark: the frame is always the same 24 bytes."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame; `offset` is where it starts, `payload_at` where its payload does."""

    kind: bytes
    offset: int
    end: int
    meta: Mapping[str, Any]
    payload_at: int
    payload: memoryview


def scan(data: bytes | memoryview, base: int = 0) -> tuple[list[Frame], int]:
    """Every whole, checksummed frame of `data` (which starts at file offset `base`).

    Returns the frames and the offset just past the last good one: anything after it
    is a torn tail. Raises JournalError for damage: a bad frame with good ones after
    it, or a frame whose checksum holds but whose meta does not decode.
    """
    view = memoryview(data)
    frames: list[Frame] = []
    pos = 0
    size = len(view)
    while size - pos >= FRAME_HEADER_BYTES:
        end = _frame_end(view, pos)
        if end is None:
            if _good_frame_after(view, pos + 1):
                raise JournalError(
                    f"damaged frame at offset {base + pos} with good frames after it "
                    "(not a torn tail: the journal was altered)"
                )
            break
        _magic, kind, meta_len, _payload_len, _sum = FRAME_HEADER.unpack_from(view, pos)
        meta_at = pos + FRAME_HEADER_BYTES
        meta: Mapping[str, Any] = _EMPTY
        if meta_len:
            try:
                doc = json.loads(bytes(view[meta_at : meta_at + meta_len]))
            except (UnicodeDecodeError, ValueError) as exc:
                raise JournalError(
                    f"frame at offset {base + pos}: meta is not JSON: {exc}"
                ) from None
            if not isinstance(doc, dict):
                raise JournalError(f"frame at offset {base + pos}: meta is not an object")
            meta = doc
        payload_at = meta_at + meta_len
        frames.append(
            Frame(kind, base + pos, base + end, meta, base + payload_at, view[payload_at:end])
        )
        pos = end
    return frames, base + pos


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class BlobSpan:
    """Where a blob not yet materialized as a file sits: `length` bytes at `locator` + `start`.

    `locator` is the backend's: the payload's absolute offset in the journal file on a
    filesystem, the record's sequence number on an object store.
    """

    locator: int
    start: int
    length: int
    raw_size: int


@dataclass(frozen=True)
class BaseIndex:
    """Lookups into the checkpoint's entries, built once per checkpoint (O(loops))."""

    positions: Mapping[str, int]
    #: loop_id -> position of its first occurrence
    blob_positions: Mapping[str, tuple[int, ...]]
    #: blob -> every position that names it

    @classmethod
    def of(cls, entries: Sequence[ondisk.LoopEntry]) -> BaseIndex:
        positions: dict[str, int] = {}
        blobs: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            positions.setdefault(e.loop_id, i)
            blobs.setdefault(e.blob, []).append(i)
        return cls(positions, {b: tuple(p) for b, p in blobs.items()})


@dataclass(frozen=True)
class SessionState:
    """A session as of one commit: header, ordered loop index, and where each blob is.

    Built from a checkpoint and extended record by record. Entries are kept as the
    checkpoint's (`base`) plus the journal's overrides and appends, so applying a
    record costs O(records since the checkpoint), not O(loops).
    """

    session_id: str
    generation: int
    committed_at_ns: int
    header: Mapping[str, Any]
    base: tuple[ondisk.LoopEntry, ...]
    base_index: BaseIndex
    checkpoint_generation: int
    checkpoint_version: int = ondisk.FORMAT_VERSION
    replaced: Mapping[int, ondisk.LoopEntry] = field(default_factory=lambda: _EMPTY)
    appended: tuple[ondisk.LoopEntry, ...] = ()
    appended_pos: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    journal_blobs: Mapping[str, BlobSpan] = field(default_factory=lambda: _EMPTY)
    commit_ids: frozenset[str] = frozenset()
    deleted: bool = False
    #: an object store's delete: a tombstone record, then the objects are removed
    records: int = 0
    journal_bytes: int = 0
    checkpoint_bytes: int = 0

    @classmethod
    def from_manifest(cls, m: ondisk.Manifest, size: int) -> SessionState:
        return cls(
            session_id=m.session_id,
            generation=m.generation,
            committed_at_ns=m.committed_at_ns,
            header=m.header,
            base=m.loops,
            base_index=BaseIndex.of(m.loops),
            checkpoint_generation=m.generation,
            checkpoint_version=m.version,
            checkpoint_bytes=size,
        )

    @classmethod
    def new(cls, session_id: str, header: Mapping[str, Any]) -> SessionState:
        """The state before a session's first commit: its header and no loops."""
        return cls(
            session_id=session_id,
            generation=0,
            committed_at_ns=0,
            header=MappingProxyType(dict(header)),
            base=(),
            base_index=BaseIndex(_EMPTY, _EMPTY),
            checkpoint_generation=0,
        )

    # -- reading -----------------------------------------------------------------

    @cached_property
    def entries(self) -> tuple[ondisk.LoopEntry, ...]:
        if not self.replaced:
            return self.base + self.appended
        out = list(self.base)
        for pos, entry in self.replaced.items():
            out[pos] = entry
        return (*out, *self.appended)

    @property
    def loop_count(self) -> int:
        return len(self.base) + len(self.appended)

    def position(self, loop_id: str) -> int | None:
        pos = self.base_index.positions.get(loop_id)
        if pos is not None:
            return pos
        pos = self.appended_pos.get(loop_id)
        return None if pos is None else len(self.base) + pos

    def entry_at(self, pos: int) -> ondisk.LoopEntry:
        if pos >= len(self.base):
            return self.appended[pos - len(self.base)]
        return self.replaced.get(pos) or self.base[pos]

    def entry(self, loop_id: str) -> ondisk.LoopEntry | None:
        pos = self.position(loop_id)
        return None if pos is None else self.entry_at(pos)

    @cached_property
    def blobs(self) -> frozenset[str]:
        """Every blob the current loop index names."""
        return frozenset(e.blob for e in self.entries)

    def has_blob(self, digest: str) -> bool:
        """True if `digest` is stored: carried by the journal, or named by the index.

        O(records since the checkpoint): a blob the checkpoint named is still stored if
        one of its positions was not replaced by another blob.
        """
        if digest in self.journal_blobs:
            return True
        for pos in self.base_index.blob_positions.get(digest, ()):
            r = self.replaced.get(pos)
            if r is None or r.blob == digest:
                return True
        return digest in self._journal_named

    @cached_property
    def _journal_named(self) -> frozenset[str]:
        """Blobs the records since the checkpoint name (appended or replacing)."""
        return frozenset(map(_BLOB, self.appended)).union(map(_BLOB, self.replaced.values()))

    @property
    def agent_id(self) -> str | None:
        value = self.header.get("agent_id")
        return value if isinstance(value, str) else None

    @property
    def last_active_at(self) -> str | None:
        value = self.header.get("last_active_at")
        return value if isinstance(value, str) else None

    @cached_property
    def header_json(self) -> bytes:
        return ondisk.header_json(self.header)

    # -- replay ------------------------------------------------------------------

    def apply(self, meta: Mapping[str, Any], locator: int, frame_bytes: int) -> SessionState:
        """The state after one record (its meta; its payload's `locator` in the backend)."""
        seq = meta.get("seq")
        if not isinstance(seq, int) or seq != self.generation + 1:
            raise JournalError(
                f"record has sequence {seq!r}, expected {self.generation + 1} "
                f"(checkpoint {self.checkpoint_generation})"
            )
        ops = meta.get("ops")
        if not isinstance(ops, list):
            raise JournalError(f"record {seq}: no ops")
        header = self.header
        deleted = self.deleted
        base, base_index = self.base, self.base_index
        base_pos = base_index.positions
        replaced = dict(self.replaced)
        appended = list(self.appended)
        appended_pos = dict(self.appended_pos)
        for op in ops:
            kind = op.get("op") if isinstance(op, dict) else None
            if kind == "put":
                entry = _entry(op.get("entry"), seq)
                pos = base_pos.get(entry.loop_id)
                if pos is not None:
                    replaced[pos] = entry
                    continue
                apos = appended_pos.get(entry.loop_id)
                if apos is not None:
                    appended[apos] = entry
                else:
                    appended_pos[entry.loop_id] = len(appended)
                    appended.append(entry)
            elif kind == "set":
                fields = op.get("fields")
                if not isinstance(fields, dict):
                    raise JournalError(f"record {seq}: bad set op")
                header = MappingProxyType({**header, **fields})
            elif kind == "header":
                new = op.get("header")
                if not isinstance(new, dict) or new.get("session_id") != self.session_id:
                    raise JournalError(f"record {seq}: bad header op")
                header = MappingProxyType(new)
            elif kind == "delete":
                deleted = True
            elif kind == "loops":
                raw = op.get("loops")
                if not isinstance(raw, list):
                    raise JournalError(f"record {seq}: bad loops op")
                base = tuple(_entry(obj, seq) for obj in raw)
                base_index = BaseIndex.of(base)
                base_pos = base_index.positions
                replaced, appended, appended_pos = {}, [], {}
            else:
                raise JournalError(f"record {seq}: unknown op {kind!r}")
        journal_blobs = self.journal_blobs
        spans = meta.get("blobs") or ()
        if spans:
            journal_blobs = new_spans = dict(journal_blobs)
            for item in spans:
                try:
                    digest, raw_size, start, length = item
                except (TypeError, ValueError):
                    raise JournalError(f"record {seq}: bad blob span {item!r}") from None
                new_spans[digest] = BlobSpan(locator, start, length, raw_size)
            journal_blobs = MappingProxyType(new_spans)
        ids = meta.get("ids") or ()
        at_ns = meta.get("at_ns")
        return replace(
            self,
            generation=seq,
            committed_at_ns=at_ns if isinstance(at_ns, int) else self.committed_at_ns,
            header=header,
            base=base,
            base_index=base_index,
            replaced=MappingProxyType(replaced),
            appended=tuple(appended),
            appended_pos=MappingProxyType(appended_pos),
            journal_blobs=journal_blobs,
            commit_ids=self.commit_ids | frozenset(ids) if ids else self.commit_ids,
            deleted=deleted,
            records=self.records + 1,
            journal_bytes=self.journal_bytes + frame_bytes,
        )

    def after(self, rec: Record, locator: int) -> SessionState:
        """The state after `rec`, written at `locator` (as `replay` would read it back)."""
        return self.apply(rec.meta, locator + rec.payload_offset, len(rec.frame))

    def replay(self, frames: Iterable[Frame]) -> SessionState:
        """Apply every record frame (marks are skipped)."""
        state = self
        for f in frames:
            if f.kind == KIND_RECORD:
                state = state.apply(f.meta, f.payload_at, f.end - f.offset)
        return state


def _entry(obj: object, seq: int) -> ondisk.LoopEntry:
    try:
        return ondisk.LoopEntry.from_json(obj)
    except ValueError as exc:
        raise JournalError(f"record {seq}: {exc}") from None


# --------------------------------------------------------------------------- building


@dataclass
class Change:
    """One commit being built against a state: its ops, the blobs it carries, its ids.

    Puts and header fields are tracked as they are added, so several hand-off items can
    be applied one after another, each seeing the ones before it, at O(1) per item; the
    rare whole-index and whole-header ops (save, update) follow along in `state`.
    """

    state: SessionState
    ops: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[str, ondisk.EncodedBlob] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = self.state
        self._puts: dict[str, ondisk.LoopEntry] = {}
        self._fields: dict[str, Any] = {}

    @property
    def empty(self) -> bool:
        return not self.ops

    def has_loop(self, loop_id: str) -> bool:
        return loop_id in self._puts or self.state.position(loop_id) is not None

    def header_value(self, key: str) -> Any:
        if key in self._fields:
            return self._fields[key]
        return self.state.header.get(key, _MISSING)

    def _has_blob(self, digest: str) -> bool:
        return (
            digest in self.blobs
            or self.state.has_blob(digest)
            or any(e.blob == digest for e in self._puts.values())
        )

    def _carry(self, blob: ondisk.EncodedBlob | None) -> None:
        if blob is not None and not self._has_blob(blob.digest):
            self.blobs[blob.digest] = blob

    def put(self, entry: ondisk.LoopEntry, blob: ondisk.EncodedBlob | None) -> bool:
        """Add or replace one loop; False if the index already holds exactly that."""
        current = self._puts.get(entry.loop_id) or self.state.entry(entry.loop_id)
        if current is not None and current.blob == entry.blob:
            return False
        self._carry(blob)
        self.ops.append({"op": "put", "entry": entry.as_json()})
        self._puts[entry.loop_id] = entry
        return True

    def set_fields(self, fields: Mapping[str, Any]) -> None:
        changed = {k: v for k, v in fields.items() if self.header_value(k) != v}
        if changed:
            self.ops.append({"op": "set", "fields": changed})
            self._fields.update(changed)

    def set_header(self, header: Mapping[str, Any]) -> None:
        if dict(self.state.header) != dict(header):
            self._push({"op": "header", "header": dict(header)})

    def set_loops(
        self,
        entries: Sequence[ondisk.LoopEntry],
        blobs: Mapping[str, ondisk.EncodedBlob],
        *,
        repair: Collection[str] = (),
    ) -> None:
        """Replace the whole loop index (save, update), if it differs.

        Blobs in `repair` (stored but found missing or damaged) are carried again even
        when the index does not change, so a save writes them anew.
        """
        for digest in repair:
            blob = blobs.get(digest)
            if blob is not None:
                self.blobs.setdefault(digest, blob)
        current = self.state.entries
        if [(e.loop_id, e.blob) for e in current] == [(e.loop_id, e.blob) for e in entries]:
            if self.blobs and not self.ops:
                self._push({"op": "loops", "loops": [e.as_json() for e in entries]})
            return
        for e in entries:
            self._carry(blobs.get(e.blob))
        self._push({"op": "loops", "loops": [e.as_json() for e in entries]})

    def _push(self, op: dict[str, Any]) -> None:
        """A whole-header or whole-index op: `state` follows (with earlier puts/fields)."""
        self.ops.append(op)
        if self._puts or self._fields:  # fold them in first (never mixed in practice)
            prior = [{"op": "put", "entry": e.as_json()} for e in self._puts.values()]
            if self._fields:
                prior.append({"op": "set", "fields": dict(self._fields)})
            self._follow(prior)
            self._puts.clear()
            self._fields.clear()
        self._follow([op])

    def _follow(self, ops: list[dict[str, Any]]) -> None:
        # A provisional state (locator -1: its blobs are not placed yet).
        nxt = self.state.apply({"seq": self.state.generation + 1, "ops": ops}, -1, 0)
        self.state = replace(
            nxt,
            generation=self.state.generation,
            records=self.state.records,
            journal_blobs=self.state.journal_blobs,
        )


_MISSING = object()


@dataclass(frozen=True)
class Record:
    """A record frame as built, with its meta: the writer applies it without parsing it
    back (`SessionState.after`)."""

    frame: bytes
    meta: Mapping[str, Any]

    @property
    def payload_offset(self) -> int:
        """Where the payload starts within `frame`."""
        _magic, _kind, meta_len, _payload_len, _sum = FRAME_HEADER.unpack_from(self.frame)
        return FRAME_HEADER_BYTES + int(meta_len)


def record(base: SessionState, change: Change, at_ns: int) -> Record:
    """The record for `change` on `base` (which `SessionState.after` applies)."""
    spans: list[list[Any]] = []
    payload: list[bytes] = []
    pos = 0
    for digest, blob in change.blobs.items():
        spans.append([digest, blob.raw_size, pos, len(blob.data)])
        payload.append(blob.data)
        pos += len(blob.data)
    meta: dict[str, Any] = {"seq": base.generation + 1, "at_ns": at_ns, "ops": change.ops}
    if change.ids:
        meta["ids"] = change.ids
    if spans:
        meta["blobs"] = spans
    return Record(encode_frame(KIND_RECORD, meta, b"".join(payload)), meta)


# --------------------------------------------------------------------------- hand-off items


@dataclass(frozen=True)
class Item:
    """An append handed to the lock holder (group commit): one loop and its blob."""

    token: str
    entry: ondisk.LoopEntry
    blob: ondisk.EncodedBlob
    new_header: Mapping[str, Any] | None

    def encode(self) -> bytes:
        meta: dict[str, Any] = {
            "token": self.token,
            "entry": self.entry.as_json(),
            "raw_size": self.blob.raw_size,
        }
        if self.new_header is not None:
            meta["new_header"] = dict(self.new_header)
        return encode_frame(KIND_ITEM, meta, self.blob.data)

    @classmethod
    def decode(cls, data: bytes) -> Item | None:
        """The item in `data`, or None if the file is torn or not an item."""
        try:
            frames, _ = scan(data)
        except JournalError:
            return None
        if len(frames) != 1 or frames[0].kind != KIND_ITEM:
            return None
        f = frames[0]
        try:
            entry = ondisk.LoopEntry.from_json(f.meta.get("entry"))
        except ValueError:
            return None
        token, raw_size = f.meta.get("token"), f.meta.get("raw_size")
        header = f.meta.get("new_header")
        if not isinstance(token, str) or not isinstance(raw_size, int):
            return None
        blob = ondisk.EncodedBlob(entry.blob, raw_size, bytes(f.payload))
        return cls(token, entry, blob, header if isinstance(header, dict) else None)
