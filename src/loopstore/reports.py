"""What store-wide work returns: session summaries, verify, gc, stats and import reports.

Plain dataclasses with no I/O, shared by the store, `maintenance`, `backup` and the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from loopstore import journal, ondisk

PROBLEM_KINDS = (
    "missing_blob",
    "hash_mismatch",
    "undecodable",
    "bad_manifest",
    "bad_journal",
    "unreadable",
    "catalog",
)
"""Damage verify reports: a blob missing, not matching its name or not decoding; a
manifest or journal that does not decode; a session that cannot be read at all (a
permission, a symlink planted in the store); the listing catalog disagreeing with the
sessions (it is rebuilt on the spot)."""

ORPHAN_KINDS = (
    "orphan_blob",
    "stray_file",
    "stale_tmp",
    "incomplete_session",
    "stale_journal",
    "torn_tail",
    "stale_handoff",
)
"""Harmless leftovers: nothing names them, `gc` removes them (a torn tail is cut by the
session's next writer)."""


@dataclass(frozen=True)
class Problem:
    """Damage found by verify (a `kind` from PROBLEM_KINDS), naming session and cause."""

    session_id: str | None
    path: PurePath | str | None
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class Orphan:
    """A harmless leftover (a `kind` from ORPHAN_KINDS)."""

    session_id: str | None
    path: PurePath | str
    kind: str
    size: int = 0
    age_s: float = 0.0


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    sessions_checked: int = 0
    blobs_checked: int = 0
    journal_records: int = 0

    @property
    def ok(self) -> bool:
        """False only for damage; orphans never make a store unhealthy."""
        return not self.problems

    @property
    def damaged_sessions(self) -> int:
        return len({p.session_id for p in self.problems if p.session_id is not None})


@dataclass
class GcReport:
    sessions_scanned: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    tmp_removed: int = 0
    dirs_removed: int = 0
    journals_removed: int = 0
    handoffs_removed: int = 0
    kept_young: int = 0
    #: unreferenced files left alone because they are younger than the grace period
    sessions_skipped: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: sessions gc could not read or lock (named, with the cause); the others were done

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class ImportFailure:
    path: PurePath | str
    reason: str


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    #: stored sessions holding loops (or a newer state) the file lacks: left unchanged
    failed: list[ImportFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.conflicts

    @property
    def total(self) -> int:
        return (
            len(self.imported)
            + len(self.updated)
            + len(self.unchanged)
            + len(self.conflicts)
            + len(self.failed)
        )


@dataclass
class MigrateReport:
    """`loopstore migrate`: sessions upgraded from format v1 to v2 (folded as v2)."""

    sessions: int = 0
    upgraded: int = 0
    current: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class StoreStats:
    """Store-wide counts. `damaged` sessions (unreadable) are counted apart, by name."""

    sessions: int = 0
    loops: int = 0
    blobs: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    orphans: int = 0
    disk_bytes: int = 0
    damaged: int = 0
    journal_records: int = 0
    journal_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class SessionInfo:
    """What a session's index says, without decoding any loop."""

    session_id: str
    agent_id: str | None
    created_at: str | None
    last_active_at: str | None
    generation: int
    committed_at_ns: int
    loop_count: int
    raw_bytes: int
    stored_bytes: int
    loops: tuple[ondisk.LoopEntry, ...]
    header: Mapping[str, Any]
    journal_records: int = 0

    @classmethod
    def from_state(cls, s: journal.SessionState) -> SessionInfo:
        created = s.header.get("created_at")
        entries = s.entries
        unique = {e.blob: e for e in entries}
        return cls(
            session_id=s.session_id,
            agent_id=s.agent_id,
            created_at=created if isinstance(created, str) else None,
            last_active_at=s.last_active_at,
            generation=s.generation,
            committed_at_ns=s.committed_at_ns,
            loop_count=len(entries),
            raw_bytes=sum(e.raw_size for e in unique.values()),
            stored_bytes=sum(e.stored_size for e in unique.values()),
            loops=entries,
            header=s.header,
            journal_records=s.records,
        )
