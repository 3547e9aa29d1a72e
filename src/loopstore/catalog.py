"""The listing catalog: session summaries in one SQLite file, derived from the sessions.

Listings (`list_ids`, `list_for_agent`, `loopstore ls`) must not read every session;
the catalog answers them with an index. It is a cache, never the authority: the
sessions' checkpoints and journals are. It can be deleted at any time, is never backed
up, and rebuilds itself (`loopstore reindex`, or automatically when it is missing,
damaged, of another schema, or from an earlier boot).

Exact (a listing reflects every acknowledged commit) with no work for writers but one
file create, no lock shared between sessions and no fsync:

* a writer marks its session (``catalog.pending/<id>``, an empty file) before each
  commit; that is all it does for the catalog;
* a lister first refreshes every marked session from the session itself (its durable
  state, read as any reader reads it) into the index; it removes a mark only while
  holding that session's lock, so a commit made after the refresh keeps its mark;
* a commit acknowledged before a listing began marked its session before that, so the
  listing sees it; a process killed mid-commit leaves a mark, refreshed like the rest;
* a power loss can lose marks and index rows (SQLite runs with synchronous=OFF), but
  it reboots the machine: the catalog records its boot and is rebuilt after any other.

Only listers write the SQLite file, one at a time (`catalog.lock`), so writers never
wait on it. A lister writes a row only for a session whose lock it holds (no commit in
flight); one whose lock is busy it reads for its own answer and leaves marked.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from loopstore import atomic, locking, ondisk
from loopstore.errors import storage_error
from loopstore.journal import SessionState

CATALOG_SCHEMA: Final = 1
#: Bumped when the table layout changes; a catalog of another schema is rebuilt.
BUSY_TIMEOUT_S: Final = 10.0
#: How long an update waits for SQLite's write lock (held microseconds at a time).
PENDING_DIR: Final = "catalog.pending"
#: Marks of sessions whose commit may not be in the catalog yet (next to catalog.sqlite).
LOCK_NAME: Final = "catalog.lock"
LOCK_TIMEOUT_S: Final = 300.0
#: Listers take the catalog one at a time (writers never do); a rebuild of 100,000
#: sessions takes seconds, so the wait is generous.

ProgressFn = Callable[[int, int], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id     TEXT PRIMARY KEY,
    agent_id       TEXT,
    created_at     TEXT,
    last_active_at TEXT,
    active_ns      INTEGER NOT NULL,
    committed_ns   INTEGER NOT NULL,
    generation     INTEGER NOT NULL,
    loops          INTEGER NOT NULL,
    raw_bytes      INTEGER NOT NULL,
    stored_bytes   INTEGER NOT NULL,
    header         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS by_activity ON sessions (active_ns DESC, committed_ns DESC);
CREATE INDEX IF NOT EXISTS by_agent ON sessions (agent_id, active_ns DESC, committed_ns DESC);
CREATE TABLE IF NOT EXISTS damaged (session_id TEXT PRIMARY KEY, cause TEXT NOT NULL);
"""

_MISSING_ACTIVE_NS: Final = -(2**63)

ORDERS: Final = {
    "active": "active_ns DESC, committed_ns DESC, session_id",
    "created": "created_at DESC, session_id",
    "size": "stored_bytes DESC, session_id",
    "loops": "loops DESC, session_id",
    "id": "session_id",
    "agent": "agent_id, active_ns DESC, session_id",
}
"""Sort orders `rows` accepts (the CLI's --sort), most interesting first."""


def boot_id() -> str:
    """An id of the running boot: the kernel's where it has one, else the boot time."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return f"boot-{round(time.time() - time.monotonic())}"


@dataclass(frozen=True)
class Summary:
    """One session as the catalog lists it (what `loopstore ls` shows)."""

    session_id: str
    agent_id: str | None
    created_at: str | None
    last_active_at: str | None
    committed_at_ns: int
    generation: int
    loop_count: int
    raw_bytes: int
    stored_bytes: int
    header_json: str

    @property
    def header(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.header_json)
        return doc

    @classmethod
    def of(cls, state: SessionState) -> Summary:
        created = state.header.get("created_at")
        unique = {e.blob: e for e in state.entries}
        return cls(
            session_id=state.session_id,
            agent_id=state.agent_id,
            created_at=created if isinstance(created, str) else None,
            last_active_at=state.last_active_at,
            committed_at_ns=state.committed_at_ns,
            generation=state.generation,
            loop_count=state.loop_count,
            raw_bytes=sum(e.raw_size for e in unique.values()),
            stored_bytes=sum(e.stored_size for e in unique.values()),
            header_json=state.header_json.decode(),
        )

    def sort_key(self, order: str) -> tuple[Any, ...]:
        """The key `rows` sorts by, for listings made without a catalog (ascending)."""
        active = ondisk.timestamp_ns(self.last_active_at)
        keys: dict[str, tuple[Any, ...]] = {
            "active": (
                -(active if active is not None else _MISSING_ACTIVE_NS),
                -self.committed_at_ns,
                self.session_id,
            ),
            "created": (_desc(self.created_at or ""), self.session_id),
            "size": (-self.stored_bytes, self.session_id),
            "loops": (-self.loop_count, self.session_id),
            "id": (self.session_id,),
            "agent": (self.agent_id or "", -(active or 0), self.session_id),
        }
        return keys[order]

    def params(self) -> tuple[Any, ...]:
        active = ondisk.timestamp_ns(self.last_active_at)
        return (
            self.session_id,
            self.agent_id,
            self.created_at,
            self.last_active_at,
            active if active is not None else _MISSING_ACTIVE_NS,
            self.committed_at_ns,
            self.generation,
            self.loop_count,
            self.raw_bytes,
            self.stored_bytes,
            self.header_json,
        )


def _desc(text: str) -> tuple[int, ...]:
    """A key that sorts text descending."""
    return tuple(-ord(c) for c in text)


class CatalogUnusable(Exception):
    """The catalog file cannot be opened or read as a catalog: rebuild it."""


class Catalog:
    """The catalog of one filesystem store (one SQLite connection per thread)."""

    def __init__(self, root: Path, root_fd: int) -> None:
        self.path = root / ondisk.CATALOG_NAME
        self.pending_path = root / PENDING_DIR
        lock_path = root / LOCK_NAME
        self._lock = locking.LockManager(lock_path, lambda _name: lock_path, timeout=LOCK_TIMEOUT_S)
        self._root_fd = root_fd
        self._pending_fd = -1
        self._local = threading.local()
        self._boot = boot_id()

    # -- connections -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, reopened when a rebuild renamed a new file in."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = None
        if (
            conn is not None
            and getattr(self._local, "pid", None) == os.getpid()
            and getattr(self._local, "ino", None) == ino
        ):
            return conn
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")
        except sqlite3.Error as exc:
            raise CatalogUnusable(f"cannot open {self.path}: {exc}") from exc
        self._local.conn = conn
        self._local.pid = os.getpid()
        self._local.ino = os.stat(self.path).st_ino
        return conn

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        if self._pending_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pending_fd)
            self._pending_fd = -1

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The catalog to ourselves (listers and rebuilds; writers never take it)."""
        with self._lock.hold("catalog"):
            yield

    # -- the writer's side ---------------------------------------------------------------

    def mark(self, session_id: str) -> None:
        """Mark `session_id` before a commit (no fsync: see the module doc)."""
        try:
            fd = atomic.open_file(session_id, self._pending_dir(), write=True, create=True)
        except FileNotFoundError:
            self._pending_fd = -1  # the catalog was deleted: start its marks again
            fd = atomic.open_file(session_id, self._pending_dir(), write=True, create=True)
        except OSError as exc:
            raise storage_error(session_id, "mark the catalog", self.pending_path, exc) from exc
        os.close(fd)

    def _pending_dir(self) -> int:
        if self._pending_fd < 0:
            atomic.mkdir(self._root_fd, PENDING_DIR)
            self._pending_fd = atomic.open_dir(PENDING_DIR, self._root_fd)
        return self._pending_fd

    # -- the lister's side ---------------------------------------------------------------

    def usable(self) -> bool:
        """True if the catalog exists, is ours, whole, and from this boot."""
        if not self.path.exists():
            return False
        try:
            meta = dict(self._conn().execute("SELECT key, value FROM meta").fetchall())
        except (sqlite3.Error, CatalogUnusable):
            return False
        return (
            meta.get("schema") == str(CATALOG_SCHEMA)
            and meta.get("boot") == self._boot
            and meta.get("complete") == "1"
        )

    def marked(self) -> list[str]:
        """Sessions marked since their last refresh."""
        try:
            fd = atomic.open_dir(PENDING_DIR, self._root_fd)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error(None, "list catalog marks", self.pending_path, exc) from exc
        try:
            with os.scandir(fd) as it:
                return [e.name for e in it if ondisk.is_valid_session_id(e.name)]
        finally:
            os.close(fd)

    def unmark(self, session_id: str) -> None:
        """Drop a mark (the caller holds the session's lock and refreshed the session)."""
        with contextlib.suppress(OSError):
            atomic.unlink_quiet(self._pending_dir(), session_id)

    def put(self, item: Summary | BaseException | None, session_id: str) -> None:
        """Record a refreshed session: its summary, or why it cannot be read (None: gone)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            _write(conn, item, session_id)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise CatalogUnusable(str(exc)) from exc

    def remove(self, session_id: str) -> None:
        conn = self._conn()
        try:
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM damaged WHERE session_id = ?", (session_id,))
        except sqlite3.Error as exc:
            raise CatalogUnusable(str(exc)) from exc

    def rebuild(
        self,
        items: Callable[[], Iterable[tuple[str, Summary | BaseException | None]]],
        total: int,
        progress: ProgressFn | None = None,
    ) -> None:
        """Replace the catalog's contents by what `items()` yields.

        The sessions are read into temporary tables first, then swapped in with one
        short transaction: listers never see half a catalog and never wait long. Marks
        are left as they are: sessions a writer changed meanwhile are refreshed by the
        listing that follows. A file that is not a database any more is replaced.
        """
        try:
            self._rebuild(items, total, progress)
        except (sqlite3.DatabaseError, CatalogUnusable):
            self.close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            try:
                self._rebuild(items, total, progress)
            except sqlite3.Error as exc:
                raise storage_error(
                    None, "rebuild the catalog", self.path, OSError(str(exc))
                ) from exc
        except sqlite3.Error as exc:
            raise storage_error(None, "rebuild the catalog", self.path, OSError(str(exc))) from exc

    def _rebuild(
        self,
        items: Callable[[], Iterable[tuple[str, Summary | BaseException | None]]],
        total: int,
        progress: ProgressFn | None,
    ) -> None:
        conn = self._conn()
        meta = dict(conn.execute("SELECT name, 1 FROM sqlite_master WHERE type='table'").fetchall())
        if "meta" in meta:
            schema = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if schema is None or schema[0] != str(CATALOG_SCHEMA):
                conn.execute("BEGIN IMMEDIATE")
                for table in ("sessions", "damaged", "meta"):
                    conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute("COMMIT")
        conn.executescript(_SCHEMA)
        conn.execute("DROP TABLE IF EXISTS temp.new_sessions")
        conn.execute("DROP TABLE IF EXISTS temp.new_damaged")
        conn.execute("CREATE TEMP TABLE new_sessions AS SELECT * FROM main.sessions WHERE 0")
        conn.execute("CREATE TEMP TABLE new_damaged AS SELECT * FROM main.damaged WHERE 0")
        conn.execute("BEGIN")
        for done, (sid, item) in enumerate(items(), 1):
            if isinstance(item, Summary):
                conn.execute(
                    "INSERT INTO new_sessions VALUES (?,?,?,?,?,?,?,?,?,?,?)", item.params()
                )
            elif item is not None:
                cause = getattr(item, "cause", None) or str(item)
                conn.execute("INSERT INTO new_damaged VALUES (?, ?)", (sid, cause))
            if progress is not None:
                progress(done, total)
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM main.sessions")
        conn.execute("INSERT INTO main.sessions SELECT * FROM new_sessions")
        conn.execute("DELETE FROM main.damaged")
        conn.execute("INSERT INTO main.damaged SELECT * FROM new_damaged")
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("schema", str(CATALOG_SCHEMA)), ("boot", self._boot), ("complete", "1")],
        )
        conn.execute("COMMIT")
        conn.execute("DROP TABLE temp.new_sessions")
        conn.execute("DROP TABLE temp.new_damaged")

    def rows(
        self,
        *,
        agent_id: str | None = None,
        order: str = "active",
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Summary]:
        sql = "SELECT session_id, agent_id, created_at, last_active_at, committed_ns, "
        sql += "generation, loops, raw_bytes, stored_bytes, header FROM sessions"
        params: list[Any] = []
        if agent_id is not None:
            sql += " WHERE agent_id = ?"
            params.append(agent_id)
        clause = ORDERS[order]
        if reverse:
            clause = ", ".join(
                p.replace(" DESC", "") if " DESC" in p else f"{p} DESC" for p in clause.split(", ")
            )
        sql += f" ORDER BY {clause}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        try:
            return [Summary(*r) for r in self._conn().execute(sql, params)]
        except sqlite3.Error as exc:
            raise CatalogUnusable(str(exc)) from exc

    def ids(self) -> list[str]:
        """Every readable session id, most recently active first."""
        try:
            cur = self._conn().execute(
                f"SELECT session_id FROM sessions ORDER BY {ORDERS['active']}"
            )
            return [r[0] for r in cur]
        except sqlite3.Error as exc:
            raise CatalogUnusable(str(exc)) from exc

    def damaged(self) -> list[tuple[str, str]]:
        """(session_id, cause) of every session the catalog could not read, by id."""
        try:
            return list(
                self._conn().execute("SELECT session_id, cause FROM damaged ORDER BY session_id")
            )
        except sqlite3.Error as exc:
            raise CatalogUnusable(str(exc)) from exc

    def entries(self) -> dict[str, tuple[int, int]]:
        """(generation, committed_ns) of every listed session, for verify."""
        try:
            cur = self._conn().execute("SELECT session_id, generation, committed_ns FROM sessions")
            return {r[0]: (int(r[1]), int(r[2])) for r in cur}
        except sqlite3.Error as exc:
            raise CatalogUnusable(str(exc)) from exc

    def entry(self, session_id: str) -> tuple[int, int] | None:
        """(generation, committed_ns) the catalog lists for a session, for verify."""
        try:
            row = (
                self._conn()
                .execute(
                    "SELECT generation, committed_ns FROM sessions WHERE session_id = ?",
                    (session_id,),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise CatalogUnusable(str(exc)) from exc
        return None if row is None else (int(row[0]), int(row[1]))


def _write(conn: sqlite3.Connection, item: Summary | BaseException | None, session_id: str) -> None:
    conn.execute("DELETE FROM damaged WHERE session_id = ?", (session_id,))
    if item is None:
        conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
    elif isinstance(item, BaseException):
        conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        cause = getattr(item, "cause", None) or str(item)
        conn.execute("INSERT INTO damaged VALUES (?, ?)", (session_id, cause))
    else:
        conn.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?)", item.params()
        )
