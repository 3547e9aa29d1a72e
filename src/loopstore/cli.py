"""The `loopstore` command line: inspect, verify, repair and migrate a store from the shell.

Conventions (git/restic style): human output on stdout by default, ``--json`` for scripts,
progress bars and colour only on a terminal, one-line errors on stderr, and exit codes a
script can trust (see EXIT_*). Reading commands never create a store.

The store is ``--root``, else ``$LOOPSTORE_ROOT``, else ``./.loopstore``: a directory, a
``file://`` URL or an object store (``s3://bucket/prefix``), opened through
`loopstore.locations`. Start-up stays light: the store, the models, rich's console and
text, and the demo's options are loaded by the commands that use them (a table printed
off a terminal needs no rich).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path, PurePath
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeAlias

from rich.cells import cell_len

from loopstore import __version__, _timestamps
from loopstore.errors import (
    CorruptSession,
    InvalidSessionId,
    SessionError,
    SessionLocked,
    SessionNotFound,
    StorageError,
    UnsupportedFormat,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from loopstore.catalog import Summary
    from loopstore.models import LoopRecord, Session
    from loopstore.ondisk import LoopEntry
    from loopstore.reports import Orphan, Problem
    from loopstore.store import SessionStore

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130

DEFAULT_ROOT = "./.loopstore"
ROOT_ENV = "LOOPSTORE_ROOT"

PROG = "loopstore"
VERIFY_PROCESSES = 2
"""`verify` of a big store runs in this many processes (the check is Python work)."""


# ---------------------------------------------------------------------------------------------
# Errors internal to the CLI
# ---------------------------------------------------------------------------------------------


class CliError(Exception):
    """An error the CLI reports itself (not from the store), with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _ParserExit(Exception):
    """Raised instead of SystemExit so that `main()` can return the code in-process."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line and never calls sys.exit.

    `define` adds the arguments when the parser is first used (to parse, or for its
    usage or help): a command whose options need a heavier module (the demo's bounds)
    then costs nothing to the other commands."""

    def __init__(
        self,
        *args: Any,
        define: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._define = define

    def _defined(self) -> None:
        if self._define is not None:
            define, self._define = self._define, None
            define(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._defined()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._defined()
        return super().format_usage()

    def format_help(self) -> str:
        self._defined()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise _ParserExit(EXIT_USAGE)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def exit_code_for(err: BaseException) -> int:
    """The documented exit code for an error raised by the store."""
    if isinstance(err, SessionNotFound):
        return EXIT_NOT_FOUND
    if isinstance(err, SessionLocked):
        return EXIT_LOCKED
    if isinstance(err, InvalidSessionId | UnsupportedFormat):
        # UnsupportedFormat: --root is not a store this loopstore may use (a non-empty
        # directory that is not a store, a store from a newer loopstore).
        return EXIT_USAGE
    if isinstance(err, CorruptSession):
        return EXIT_PROBLEMS
    if isinstance(err, CliError):
        return err.code
    return EXIT_PROBLEMS


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Formatting helpers (pure; unit-tested)
# ---------------------------------------------------------------------------------------------

_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n: int | float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 12.0 MiB."""
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in _SIZE_UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def parse_timestamp(text: str | None) -> datetime | None:
    """An RFC 3339 timestamp as phi-core writes it, or None when absent or malformed."""
    if not text:
        return None
    try:
        return _timestamps.parse_timestamp(text.strip())
    except ValueError:
        return None


def format_relative(when: datetime | None, now: datetime | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', '2 d ago'; beyond 30 days: '2025-06-04 16:45' (UTC)."""
    if when is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = (now - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 10:
        return "just now"
    if seconds < 60:
        amount = f"{int(seconds)} s"
    elif seconds < 3600:
        amount = f"{int(seconds // 60)} min"
    elif seconds < 86400:
        amount = f"{int(seconds // 3600)} h"
    elif seconds < 30 * 86400:
        amount = f"{int(seconds // 86400)} d"
    else:
        return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return f"in {amount}" if future else f"{amount} ago"


def format_duration(seconds: float | None) -> str:
    """Short elapsed time: 850 ms, 4.0 s, 2m05s, 1h02m."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(int(seconds), 60)
        return f"{m}m{s:02d}s"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m"


def format_count(n: int) -> str:
    return f"{n:,}"


def format_ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "-"


# ---------------------------------------------------------------------------------------------
# Output: aligned tables, colour only on a terminal
# ---------------------------------------------------------------------------------------------


def _wants_colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


PIPE_WIDTH = 160
"""Width for rich renderables (demo tables, trees) when output is not a terminal; our own
lines never wrap (soft_wrap), this only keeps others' renderables from being cut at 80."""


def _make_console(stream: IO[str]) -> Console:
    from rich.console import Console

    class _Console(Console):
        """rich's Console, but a closed pipe raises BrokenPipeError for `main` to handle
        (rich's own handler exits with status 1, which reads as "problems found")."""

        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    tty = _wants_colour(stream)
    isatty = getattr(stream, "isatty", None)
    width = None if (isatty and isatty()) or os.environ.get("COLUMNS") else PIPE_WIDTH
    return _Console(
        file=stream,
        width=width,
        force_terminal=tty,
        color_system="auto" if tty else None,
        no_color=not tty,
        highlight=False,
        soft_wrap=True,
        emoji=False,
        markup=False,
    )


@dataclass
class Column:
    header: str
    right: bool = False
    style: str = ""


Cell: TypeAlias = "str | Text"
Piece: TypeAlias = "tuple[Cell, str]"
"""Part of a table line: a cell or padding, and the style over it."""


def _plain(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell.plain


def table_lines(columns: Sequence[Column], rows: Iterable[Sequence[Cell]]) -> list[list[Piece]]:
    """Plain aligned columns (no borders) so output greps and diffs well: each line as the
    pieces `Ctx.print_table` prints (styles show only on a terminal)."""
    materialized = [list(r) for r in rows]
    widths = [cell_len(c.header) for c in columns]
    for row in materialized:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], cell_len(_plain(cell)))

    def line(cells: Sequence[Cell], header: bool) -> list[Piece]:
        out: list[Piece] = []
        last = len(cells) - 1
        for i, (col, cell) in enumerate(zip(columns, cells, strict=True)):
            piece = (cell, "bold" if header else col.style)
            pad = (" " * (widths[i] - cell_len(_plain(cell))), "")
            if col.right:
                out += [pad, piece]
            else:
                out += [piece, pad] if i != last else [piece]
            if i != last:
                out.append(("  ", ""))
        return out

    return [line([c.header for c in columns], header=True)] + [
        line(row, header=False) for row in materialized
    ]


def _rich_line(pieces: Sequence[Piece]) -> Text:
    from rich.text import Text

    out = Text()
    for cell, style in pieces:
        text = Text(cell) if isinstance(cell, str) else cell.copy()
        if style:
            text.stylize(style)
        out.append_text(text)
    out.rstrip()
    return out


STATUS_STYLES = {
    "Completed": "green",
    "Running": "cyan",
    "Pending": "cyan",
    "Rejected": "yellow",
    "Aborted": "red",
}


def styled(text: str, style: str = "") -> Text:
    """Text whose style covers only `text`, not what is appended later (Text(style=) would)."""
    from rich.text import Text

    out = Text()
    out.append(text, style=style)
    return out


def _status_text(status: str) -> Text:
    return styled(status, STATUS_STYLES.get(status, ""))


# ---------------------------------------------------------------------------------------------
# Progress: a rich bar on a terminal (stderr), nothing otherwise
# ---------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int], None]


@contextlib.contextmanager
def _progress(ctx: Ctx, label: str) -> Iterator[ProgressFn | None]:
    """Yield a (done, total) callback drawing a bar on stderr when it is a terminal.

    Yields None off a terminal so the store skips progress bookkeeping entirely. The bar
    appears at the first report, so work that reports nothing (a listing whose catalog is
    current) draws nothing."""
    if not ctx.stderr_tty:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=ctx.err,
        transient=True,
    )
    task = bar.add_task(label, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            bar.stop()


# ---------------------------------------------------------------------------------------------
# Context and store access
# ---------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    location: str
    """The store as given (--root / $LOOPSTORE_ROOT): a path, a file:// or an s3:// URL."""
    local_root: Path | None
    """The directory of a local store; None for an object store."""
    json: bool
    stderr_tty: bool
    lock_timeout: float | None = None
    _store: SessionStore | None = field(default=None, repr=False)
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The store as shown to people and in JSON (`root`)."""
        return str(self.local_root) if self.local_root is not None else self.location

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = _make_console(sys.stdout)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = _make_console(sys.stderr)
        return self._err

    def store_exists(self) -> bool:
        """Whether a store is there, checked before opening, so that reading commands never
        turn an arbitrary (or missing) directory or bucket prefix into a store."""
        with _location_errors(self.location):
            return _store_exists(self.location)

    def store(self, *, create: bool = False) -> SessionStore:
        """Open the store; without `create`, a missing store is 'not found' (exit 3) and
        nothing is written."""
        if self._store is None:
            if not create and not self.store_exists():
                raise CliError(
                    f"store: no loopstore store at {self.where}{self._what_is_there()}",
                    EXIT_NOT_FOUND,
                )
            from loopstore import locations

            options: dict[str, Any] = {}
            if self.lock_timeout is not None:
                options["lock_timeout"] = self.lock_timeout
            with _location_errors(self.location):
                self._store = locations.open_store(self.location, **options)
        return self._store

    def _what_is_there(self) -> str:
        if self.local_root is None:
            return ""
        try:
            if any(self.local_root.iterdir()):
                return " (a directory with other files and no loopstore.json)"
        except OSError:
            pass
        return ""

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None

    def emit_json(self, obj: object) -> None:
        text = json.dumps(obj, indent=2, ensure_ascii=False)
        _write_text(text + "\n")

    def print(self, *parts: str | Text) -> None:
        self.out.print(*parts)

    def print_table(self, columns: Sequence[Column], rows: Iterable[Sequence[Cell]]) -> None:
        """Without colour, a table of plain printable text is written as is: rich would print
        the same bytes (it changes only tabs and control characters, which still go
        through it), and loading rich took a fifth of `ls`'s start-up."""
        lines = table_lines(columns, rows)
        if not _wants_colour(sys.stdout) and all(
            isinstance(cell, str) and cell.isprintable() for line in lines for cell, _ in line
        ):
            for line in lines:
                sys.stdout.write("".join(_plain(cell) for cell, _ in line).rstrip() + "\n")
            return
        for line in lines:
            self.print(_rich_line(line))

    def note(self, message: str) -> None:
        """A one-line remark on stderr (keeps stdout clean for pipes and --json)."""
        self.err.print(styled(f"{PROG}: {message}", style="dim"))

    def warn(self, message: str) -> None:
        """A one-line warning on stderr, such as a session a listing could not read."""
        _write_stderr(f"{PROG}: warning: {_one_line(message)}\n")


def _store_exists(location: str) -> bool:
    """A store marker is at `location` (nothing is created; an unknown scheme is refused)."""
    from loopstore import locations

    return locations.store_exists(location)


@contextlib.contextmanager
def _location_errors(location: str) -> Iterator[None]:
    """A location this loopstore cannot open (an unknown URL scheme, an object store
    whose client is not installed) is a usage error naming it, in one line."""
    try:
        yield
    except ImportError as exc:
        raise CliError(f"store {location}: cannot open it here: {exc}", EXIT_USAGE) from exc
    except ValueError as exc:
        if isinstance(exc, SessionError):
            raise
        raise CliError(f"store {location}: {exc}", EXIT_USAGE) from exc


def _write_text(text: str) -> None:
    _write_bytes(text.encode("utf-8"))


def _write_bytes(data: bytes) -> None:
    """Exact UTF-8 bytes to stdout whatever its text encoding (byte-identical `cat`)."""
    stdout = sys.stdout
    buffer = getattr(stdout, "buffer", None)
    if buffer is not None:
        stdout.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stdout.write(data.decode("utf-8"))
        stdout.flush()


def plain(value: Any) -> Any:
    """A model, enum or container as plain JSON-ready data (phi-core JSON form for models)."""
    if isinstance(value, Enum):
        return plain(value.value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return {name: plain(getattr(value, name)) for name in fields}
    if hasattr(value, "_asdict"):
        return plain(value._asdict())
    return str(value)


def _enum_text(value: Any) -> str:
    out = plain(value)
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)


MAX_TAG_CHARS = 24
"""Rerun/branch tags are free text; human output shortens them (--json keeps them whole)."""


def continuation_label(kind: Any) -> str:
    """'initial', 'continue', 'rerun (tag)', 'branch (…)' from the externally tagged form."""
    data = plain(kind)
    if data is None:
        return "-"
    names = {"Initial": "initial", "Default": "continue", "Rerun": "rerun", "Branch": "branch"}
    if isinstance(data, str):
        return names.get(data, data.lower())
    if isinstance(data, dict) and len(data) == 1:
        ((variant, payload),) = data.items()
        label = names.get(variant, str(variant).lower())
        if isinstance(payload, dict):
            detail = ", ".join(f"{v}" for v in payload.values() if v not in (None, "", {}, []))
        elif payload not in (None, "", {}, []):
            detail = str(payload)
        else:
            detail = ""
        if len(detail) > MAX_TAG_CHARS:
            detail = detail[: MAX_TAG_CHARS - 1] + "…"
        return f"{label} ({detail})" if detail else label
    return json.dumps(data, ensure_ascii=False)


def formation_label(formation: Any) -> str:
    data = plain(formation)
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((variant, payload),) = data.items()
        if isinstance(payload, dict):
            extra = {k: v for k, v in payload.items() if k != "timestamp" and v is not None}
            if extra:
                return f"{variant} ({', '.join(f'{k}={v}' for k, v in extra.items())})"
        return str(variant)
    return json.dumps(data, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Store adapters: one place that knows the shape of what the store returns
# ---------------------------------------------------------------------------------------------


@dataclass
class SessionRow:
    """What `ls` shows for one session, from the listing catalog only."""

    session_id: str
    agent_id: str | None
    loops: int
    created_at: str | None
    last_active_at: str | None
    scope: str | None
    parent_session_id: str | None
    raw_bytes: int
    stored_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "agent_id": self.agent_id,
            "loops": self.loops,
            "created_at": self.created_at,
            "last_active_at": self.last_active_at,
            "scope": self.scope,
            "parent_session_id": self.parent_session_id,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
        }


def _opt_text(value: Any) -> str | None:
    return None if value is None else _enum_text(value)


def session_row(summary: Summary) -> SessionRow:
    """A listing row from a catalog summary (its header is parsed here, nothing is read)."""
    header = summary.header
    spawn = header.get("parent_spawn_ref")
    scope = header.get("scope")
    return SessionRow(
        session_id=summary.session_id,
        agent_id=summary.agent_id,
        loops=summary.loop_count,
        created_at=summary.created_at,
        last_active_at=summary.last_active_at,
        scope=scope if isinstance(scope, str) else None,
        parent_session_id=spawn.get("parent_session_id") if isinstance(spawn, dict) else None,
        raw_bytes=summary.raw_bytes,
        stored_bytes=summary.stored_bytes,
    )


def _path_text(path: PurePath | str | None) -> str | None:
    """A report's path: a filesystem path or an object-store URL, as text."""
    return None if path is None else str(path)


def problem_json(p: Problem) -> dict[str, Any]:
    return {
        "session_id": p.session_id,
        "path": _path_text(p.path),
        "kind": p.kind,
        "detail": p.detail,
    }


def orphan_json(o: Orphan) -> dict[str, Any]:
    return {
        "session_id": o.session_id,
        "path": _path_text(o.path),
        "kind": o.kind,
        "size": o.size,
        "age_s": round(o.age_s, 3),
    }


def _problem_line(p: Problem, label: str = "PROBLEM") -> Text:
    """`PROBLEM session 'x': unreadable: cannot read manifest: Permission denied  (path)`."""
    line = styled(f"{label} ", "bold red")
    where = f"session {p.session_id!r}" if p.session_id is not None else "store"
    line.append(f"{where}: {p.kind}: {_one_line(p.detail)}")
    if p.path is not None:
        line.append(f"  ({p.path})", style="dim")
    return line


def _print_problems(ctx: Ctx, problems: Iterable[Problem]) -> None:
    for p in problems:
        ctx.print(_problem_line(p))


def _error_json(session_id: str, err: SessionError) -> dict[str, Any]:
    """A per-session failure in --json output (rm, export-legacy, checkpoint)."""
    return {
        "session_id": session_id,
        "error": type(err).__name__,
        "cause": err.cause,
        "path": _path_text(err.path),
    }


def _orphan_hint(kinds: set[str]) -> str:
    """What clears the orphans verify found: gc, except a torn tail (its next write)."""
    hints = [f"`{PROG} gc` removes orphans"] if kinds - {"torn_tail"} else []
    if "torn_tail" in kinds:
        hints.append("a torn tail is cut by its session's next write")
    return " (" + "; ".join(hints) + ")"


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{format_count(n)} {word if n == 1 else (many or word + 's')}"


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

SORT_ORDERS = ("active", "agent", "created", "id", "loops", "size")
"""`ls --sort` choices: the listing catalog's orders (`loopstore.catalog.ORDERS`). active,
created, size and loops list the largest (most recent) first; id and agent A to Z."""


def _damaged_json(damaged: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"session_id": sid, "error": cause} for sid, cause in damaged]


def _warn_damaged(ctx: Ctx, damaged: Sequence[tuple[str, str]]) -> None:
    for sid, cause in damaged:
        ctx.warn(f"session {sid!r}: {cause} (`{PROG} verify` says more)")


def _nothing_recorded_yet(ctx: Ctx) -> bool:
    """No store yet where one is expected (`ls` and `stats` then show an empty store, so
    a fleet that has recorded nothing is not an error): a missing or empty directory, or
    an object-store prefix without a store. A directory holding other files is not a
    store: the command goes on and reports it (exit 3), as a mistyped --root."""
    if ctx.store_exists():
        return False
    if ctx.local_root is None:
        return True
    try:
        return not any(ctx.local_root.iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False


def cmd_ls(ctx: Ctx, args: argparse.Namespace) -> int:
    """From the listing catalog only: no session file is read, whatever the store's size
    (the catalog rebuilds itself from the sessions when it is missing or stale)."""
    if _nothing_recorded_yet(ctx):
        if ctx.json:
            ctx.emit_json({"root": ctx.where, "exists": False, "sessions": [], "damaged": []})
        else:
            ctx.note(f"no store at {ctx.where} (nothing recorded yet)")
        return EXIT_OK
    store = ctx.store()
    with _progress(ctx, "indexing sessions") as progress:
        summaries = store.sessions(
            agent_id=args.agent,
            order=args.sort,
            limit=args.limit,
            reverse=args.reverse,
            progress=progress,
        )
    damaged = store.damaged_sessions()
    code = EXIT_PROBLEMS if damaged else EXIT_OK
    if ctx.json:
        ctx.emit_json(
            {
                "root": ctx.where,
                "exists": True,
                "sessions": [session_row(s).to_json() for s in summaries],
                "damaged": _damaged_json(damaged),
            }
        )
        _warn_damaged(ctx, damaged)
        return code
    _warn_damaged(ctx, damaged)
    if not summaries:
        ctx.note("no sessions" + (f" for agent {args.agent!r}" if args.agent else ""))
        return code
    now = datetime.now(timezone.utc)
    columns = [
        Column("SESSION", style="bold cyan"),
        Column("AGENT"),
        Column("LOOPS", right=True),
        Column("LAST ACTIVE", right=True),
        Column("SIZE", right=True),
    ]
    table = [
        [
            s.session_id,
            s.agent_id or "-",
            format_count(s.loop_count),
            format_relative(parse_timestamp(s.last_active_at), now),
            format_size(s.stored_bytes),
        ]
        for s in summaries
    ]
    ctx.print_table(columns, table)
    return code


def _usage_dict(usage: Any) -> dict[str, Any]:
    data = plain(usage)
    return data if isinstance(data, dict) else {}


USAGE_KEYS = ("input", "output", "reasoning", "cache_read", "cache_write", "total_tokens")


def _sum_usage(usages: Iterable[dict[str, Any]]) -> dict[str, int]:
    total = dict.fromkeys(USAGE_KEYS, 0)
    for u in usages:
        for k in USAGE_KEYS:
            v = u.get(k)
            if isinstance(v, int):
                total[k] += v
    return total


def _loop_json(index: int, loop: LoopRecord, entry: LoopEntry | None) -> dict[str, Any]:
    started = loop.started_at
    ended = loop.ended_at
    t0, t1 = parse_timestamp(started), parse_timestamp(ended)
    return {
        "index": index,
        "loop_id": loop.loop_id,
        "parent_loop_id": loop.parent_loop_id,
        "continuation_kind": plain(loop.continuation_kind),
        "status": _enum_text(loop.status),
        "started_at": started,
        "ended_at": ended,
        "duration_s": (t1 - t0).total_seconds() if t0 and t1 else None,
        "turns": len(loop.turns),
        "messages": len(loop.messages),
        "events": len(loop.events),
        "model": loop.config.model if loop.config is not None else None,
        "usage": _usage_dict(loop.usage),
        "raw_bytes": entry.raw_size if entry else None,
        "stored_bytes": entry.stored_size if entry else None,
        "children_loop_ids": list(loop.children_loop_ids),
        "child_loop_refs": plain(list(loop.child_loop_refs)),
        "parallel_group": plain(loop.parallel_group),
    }


def _header_json(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "agent_id": session.agent_id,
        "created_at": session.created_at,
        "last_active_at": session.last_active_at,
        "formation": plain(session.formation),
        "parent_spawn_ref": plain(session.parent_spawn_ref),
        "scope": _opt_text(session.scope),
    }


def _with_relative(stamp: str | None, now: datetime) -> str:
    """The exact timestamp, plus how long ago when that is recent enough to say."""
    if stamp is None:
        return "-"
    relative = format_relative(parse_timestamp(stamp), now)
    return stamp if relative[:4].isdigit() else f"{stamp}  ({relative})"


def _short_loop_id(session_id: str, loop_id: str) -> str:
    """Loop ids are '{session_id}.{config}.{N}': the session prefix is noise in a table."""
    prefix = session_id + "."
    return loop_id[len(prefix) :] if loop_id.startswith(prefix) else loop_id


def _storage_label(generation: int, journal_records: int) -> str:
    """Where the session's last commits are: folded into its checkpoint, or still in its
    journal (what `loopstore checkpoint` folds)."""
    if not journal_records:
        return f"generation {generation}, at rest (every loop in loops/, no journal records)"
    return (
        f"generation {generation}, {_plural(journal_records, 'journal record')} not yet "
        f"folded (`{PROG} checkpoint` folds them)"
    )


def cmd_show(ctx: Ctx, args: argparse.Namespace) -> int:
    store = ctx.store()
    session = store.load(args.session)
    # Sizes come from the session's index; it may be a commit newer than the loaded session.
    info = store.session_info(args.session)
    entries = {e.loop_id: e for e in info.loops}
    loops = [_loop_json(i, lp, entries.get(lp.loop_id)) for i, lp in enumerate(session.loops, 1)]
    total = _sum_usage(lp["usage"] for lp in loops)
    raw, stored = info.raw_bytes, info.stored_bytes
    if ctx.json:
        ctx.emit_json(
            {
                "session": _header_json(session),
                "loops": loops,
                "usage": total,
                "raw_bytes": raw,
                "stored_bytes": stored,
                "generation": info.generation,
                "journal_records": info.journal_records,
            }
        )
        return EXIT_OK
    header = _header_json(session)
    now = datetime.now(timezone.utc)
    created = header["created_at"]
    active = header["last_active_at"]
    pairs: list[tuple[str, str]] = [
        ("session", session.session_id),
        ("agent", session.agent_id),
        ("created", _with_relative(created, now)),
        ("last active", _with_relative(active, now)),
        ("formation", formation_label(session.formation)),
        ("scope", header["scope"] or "-"),
    ]
    spawn = header["parent_spawn_ref"]
    if isinstance(spawn, dict):
        pairs.append(
            (
                "spawned by",
                f"session {spawn.get('parent_session_id')} loop "
                f"{spawn.get('parent_loop_id')} via {spawn.get('tool_name')}",
            )
        )
    pairs.append(
        (
            "loops",
            f"{len(loops)}  ({format_size(raw)} raw, {format_size(stored)} stored, "
            f"{format_ratio(raw, stored)})",
        )
    )
    pairs.append(("storage", _storage_label(info.generation, info.journal_records)))
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        line = styled(f"{k + ':':<{width + 1}} ", style="bold")
        line.append(v)
        ctx.print(line)
    ctx.print("")
    columns = [
        Column("#", right=True),
        Column("LOOP"),
        Column("KIND"),
        Column("STATUS"),
        Column("STARTED", right=True),
        Column("TOOK", right=True),
        Column("TURNS", right=True),
        Column("TOKENS", right=True),
        Column("SIZE", right=True),
    ]
    rows: list[list[Cell]] = []
    for lp in loops:
        rows.append(
            [
                str(lp["index"]),
                _short_loop_id(session.session_id, lp["loop_id"]),
                continuation_label(lp["continuation_kind"]),
                _status_text(lp["status"]),
                format_relative(parse_timestamp(lp["started_at"]), now),
                format_duration(lp["duration_s"]),
                str(lp["turns"]),
                format_count(int(lp["usage"].get("total_tokens", 0) or 0)),
                format_size(lp["stored_bytes"] or 0),
            ]
        )
    ctx.print_table(columns, rows)
    ctx.print("")
    usage_line = styled("usage: ", style="bold")
    usage_line.append(
        "  ".join(f"{k.replace('_', ' ')} {format_count(total[k])}" for k in USAGE_KEYS)
    )
    ctx.print(usage_line)
    return EXIT_OK


def tree_json(ctx: Ctx, session: Session) -> dict[str, Any]:
    """The loop tree as a flat list (no nesting, so a chain of thousands of continuations
    neither recurses nor nests): each loop names its children; `roots` are the loops to
    start from (no same-session parent; loops cut off by a parent cycle are added)."""
    loops = list(session.loops)
    by_id = {lp.loop_id: lp for lp in loops}
    index = {lp.loop_id: i for i, lp in enumerate(loops, 1)}
    children: dict[str, list[str]] = {lp.loop_id: [] for lp in loops}
    roots: list[str] = []
    for lp in loops:
        parent = lp.parent_loop_id
        if parent is not None and parent in by_id and parent != lp.loop_id:
            children[parent].append(lp.loop_id)
        else:
            roots.append(lp.loop_id)
    for lp in loops:
        kids = children[lp.loop_id]
        for cid in lp.children_loop_ids:
            if cid in by_id and cid not in kids and cid != lp.loop_id:
                kids.append(cid)
        kids.sort(key=lambda c: index[c])

    def reach(starts: list[str], seen: set[str]) -> None:
        stack = list(starts)
        while stack:
            lid = stack.pop()
            if lid not in seen:
                seen.add(lid)
                stack.extend(children[lid])

    seen: set[str] = set()
    reach(roots, seen)
    for lp in loops:
        if lp.loop_id not in seen:
            roots.append(lp.loop_id)
            reach([lp.loop_id], seen)

    store = ctx.store()
    exists_cache: dict[str, bool] = {}

    def in_store(session_id: str) -> bool:
        if session_id not in exists_cache:
            try:
                exists_cache[session_id] = store.exists(session_id)
            except InvalidSessionId:
                exists_cache[session_id] = False
        return exists_cache[session_id]

    nodes = []
    for lp in loops:
        group = plain(lp.parallel_group)
        nodes.append(
            {
                "index": index[lp.loop_id],
                "loop_id": lp.loop_id,
                "parent_loop_id": lp.parent_loop_id,
                "continuation_kind": plain(lp.continuation_kind),
                "status": _enum_text(lp.status),
                "turns": len(lp.turns),
                "parallel_group": group,
                "selected": group.get("is_selected") if isinstance(group, dict) else None,
                "sub_agents": [
                    {**ref, "in_store": in_store(str(ref.get("child_session_id")))}
                    for ref in plain(list(lp.child_loop_refs))
                    if isinstance(ref, dict)
                ],
                "children": children[lp.loop_id],
            }
        )
    spawn = plain(session.parent_spawn_ref)
    if isinstance(spawn, dict):
        spawn = {**spawn, "in_store": in_store(str(spawn.get("parent_session_id")))}
    return {
        "session_id": session.session_id,
        "agent_id": session.agent_id,
        "parent_spawn_ref": spawn,
        "roots": roots,
        "loops": nodes,
    }


_FORK = ("├── ", "│   ")
_LAST = ("└── ", "    ")
_CHAIN = ("", "")


def _loop_line(sid: str, n: dict[str, Any]) -> Text:
    line = styled(f"#{n['index']} ", "bold")
    line.append(_short_loop_id(sid, n["loop_id"]), style="cyan")
    line.append(f"  {continuation_label(n['continuation_kind'])}  ")
    line.append_text(_status_text(n["status"]))
    line.append(f"  {n['turns']} turn{'s' if n['turns'] != 1 else ''}", style="dim")
    group = n["parallel_group"]
    if isinstance(group, dict):
        ids = group.get("all_loop_ids") or []
        pos = ids.index(n["loop_id"]) + 1 if n["loop_id"] in ids else "?"
        line.append(f"  [parallel {pos}/{len(ids)}]", style="yellow")
        if group.get("is_selected"):
            line.append(" ★ winner", style="bold yellow")
    return line


def _sub_agent_line(ref: dict[str, Any]) -> Text:
    child_sid = str(ref.get("child_session_id"))
    line = styled("⇢ sub-agent session ", "magenta")
    line.append(child_sid, style="bold magenta")
    child_loop = _short_loop_id(child_sid, str(ref.get("child_loop_id")))
    line.append(f"  loop {child_loop} via {ref.get('tool_name')} [{ref.get('tool_call_id')}]")
    if not ref.get("in_store"):
        line.append("  (not in this store)", style="dim")
    return line


def _render_tree(ctx: Ctx, tree: dict[str, Any]) -> None:
    """Draw the tree; a loop that is the only thing under its parent is drawn straight
    below it without a connector, so indentation grows at forks only."""
    sid = tree["session_id"]
    head = styled(sid, "bold cyan")
    head.append(f"  agent {tree['agent_id']}")
    ctx.print(head)
    spawn = tree["parent_spawn_ref"]
    if isinstance(spawn, dict):
        line = styled("↖ spawned by session ", "magenta")
        line.append(str(spawn.get("parent_session_id")), style="bold magenta")
        parent_loop = _short_loop_id(
            str(spawn.get("parent_session_id")), str(spawn.get("parent_loop_id"))
        )
        line.append(
            f"  loop {parent_loop} via {spawn.get('tool_name')} [{spawn.get('tool_call_id')}]"
        )
        if not spawn.get("in_store"):
            line.append("  (not in this store)", style="dim")
        ctx.print(line)

    nodes = {n["loop_id"]: n for n in tree["loops"]}
    printed: set[str] = set()
    # (kind, payload, prefix, connector pair); a stack, so arbitrarily deep trees are fine
    Item = tuple[str, Any, str, tuple[str, str]]

    def fan_out(items: list[tuple[str, Any]], prefix: str) -> list[Item]:
        return [
            (kind, payload, prefix, _LAST if i == len(items) - 1 else _FORK)
            for i, (kind, payload) in enumerate(items)
        ]

    stack: list[Item] = list(reversed(fan_out([("loop", r) for r in tree["roots"]], "")))
    while stack:
        kind, payload, prefix, (connector, indent) = stack.pop()
        lead = styled(prefix + connector, "dim")
        if kind == "sub":
            ctx.print(lead + _sub_agent_line(payload))
            continue
        if payload in printed:
            continue
        printed.add(payload)
        n = nodes[payload]
        ctx.print(lead + _loop_line(sid, n))
        below = prefix + indent
        kids = [c for c in n["children"] if c not in printed]
        if not n["sub_agents"] and len(kids) == 1:
            stack.append(("loop", kids[0], below, _CHAIN))
            continue
        items = [("sub", ref) for ref in n["sub_agents"]] + [("loop", c) for c in kids]
        stack.extend(reversed(fan_out(items, below)))


def cmd_tree(ctx: Ctx, args: argparse.Namespace) -> int:
    session = ctx.store().load(args.session)
    tree = tree_json(ctx, session)
    if ctx.json:
        ctx.emit_json(tree)
    else:
        _render_tree(ctx, tree)
    return EXIT_OK


MAX_LISTED_MATCHES = 20
"""An ambiguous loop suffix lists this many matching loop ids (the error is one line)."""


def _resolve_loop(ctx: Ctx, session_id: str, wanted: str) -> str:
    """A loop given as its id, its 1-based `#` from `show` (negative: from the end), or a
    unique dotted suffix of its id (`claude-sonnet-4-5.2`). Reads the session's index only."""
    store = ctx.store()
    ids = [e.loop_id for e in store.session_info(session_id).loops]
    if wanted in ids:
        return wanted
    if wanted.lstrip("-").isdigit():
        n = int(wanted)
        if 1 <= n <= len(ids):
            return ids[n - 1]
        if -len(ids) <= n <= -1:
            return ids[n]
        raise SessionNotFound(session_id, f"no loop {wanted!r} in this session ({len(ids)} loops)")
    matches = list(dict.fromkeys(i for i in ids if i.endswith("." + wanted)))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        shown = ", ".join(matches[:MAX_LISTED_MATCHES])
        more = len(matches) - MAX_LISTED_MATCHES
        raise CliError(
            f"session {session_id!r}: loop {wanted!r} is ambiguous, it matches "
            f"{len(matches)} loops: {shown}" + (f" and {more} more" if more > 0 else ""),
            EXIT_USAGE,
        )
    raise SessionNotFound(session_id, f"no loop {wanted!r} in this session")


def cmd_cat(ctx: Ctx, args: argparse.Namespace) -> int:
    """The stored JSON as it is: no model is built (`load_json` / `load_loop_json`)."""
    store = ctx.store()
    if args.loop is None:
        data = store.load_json(args.session)
    else:
        loop_id = _resolve_loop(ctx, args.session, args.loop)
        data = store.load_loop_json(args.session, loop_id)
    # phi-core's files end without a newline; add one only for a person at a terminal.
    if sys.stdout.isatty():
        data += b"\n"
    _write_bytes(data)
    return EXIT_OK


_EMPTY_STATS: dict[str, Any] = {
    "sessions": 0,
    "loops": 0,
    "blobs": 0,
    "raw_bytes": 0,
    "stored_bytes": 0,
    "ratio": None,
    "orphans": 0,
    "disk_bytes": 0,
    "journal_records": 0,
    "journal_bytes": 0,
    "damaged": 0,
    "problems": [],
}


def cmd_stats(ctx: Ctx, args: argparse.Namespace) -> int:
    """Totals from the sessions' indexes (no blob is read). They agree with `verify`:
    sessions + damaged = what verify checks, blobs = the blobs verify checks (on a healthy
    store), orphans = the orphans verify lists."""
    problems: list[Problem] = []
    if _nothing_recorded_yet(ctx):
        stats: dict[str, Any] = {"root": ctx.where, "exists": False, "ok": True, **_EMPTY_STATS}
        if not ctx.json:
            ctx.note(f"no store at {ctx.where} (nothing recorded yet)")
    else:
        s = ctx.store().stats()
        problems = list(s.problems)
        stats = {
            "root": ctx.where,
            "exists": True,
            "ok": not s.damaged,
            "sessions": s.sessions,
            "loops": s.loops,
            "blobs": s.blobs,
            "raw_bytes": s.raw_bytes,
            "stored_bytes": s.stored_bytes,
            "ratio": round(s.raw_bytes / s.stored_bytes, 3) if s.stored_bytes else None,
            "orphans": s.orphans,
            "disk_bytes": s.disk_bytes,
            "journal_records": s.journal_records,
            "journal_bytes": s.journal_bytes,
            "damaged": s.damaged,
            "problems": [problem_json(p) for p in problems],
        }
    status = EXIT_OK if stats["ok"] else EXIT_PROBLEMS
    if ctx.json:
        ctx.emit_json(stats)
        return status
    sessions, damaged = stats["sessions"], stats["damaged"]
    counted = format_count(sessions)
    if damaged:
        counted = (
            f"{format_count(sessions + damaged)}  ({format_count(sessions)} readable, "
            f"{format_count(damaged)} damaged: listed below)"
        )
    journal = stats["journal_records"]
    pairs = [
        ("root", stats["root"]),
        ("sessions", counted),
        ("loops", format_count(stats["loops"])),
        ("blobs", format_count(stats["blobs"])),
        ("raw", f"{format_size(stats['raw_bytes'])}  ({format_count(stats['raw_bytes'])} B)"),
        (
            "stored",
            f"{format_size(stats['stored_bytes'])}  ({format_count(stats['stored_bytes'])} B)",
        ),
        ("ratio", format_ratio(stats["raw_bytes"], stats["stored_bytes"])),
        ("on disk", format_size(stats["disk_bytes"])),
        (
            "journals",
            (
                f"{_plural(journal, 'record')} not yet folded "
                f"({format_size(stats['journal_bytes'])}; `{PROG} checkpoint --all` folds them)"
            )
            if journal
            else "0 records (every session at rest)",
        ),
        (
            "orphans",
            format_count(stats["orphans"])
            + (
                f"  (`{PROG} verify -v` lists them, `{PROG} gc` removes them)"
                if stats["orphans"]
                else ""
            ),
        ),
    ]
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        line = styled(f"{k + ':':<{width + 1}} ", style="bold")
        line.append(v)
        ctx.print(line)
    _print_problems(ctx, problems)
    return status


def cmd_verify(ctx: Ctx, args: argparse.Namespace) -> int:
    store = ctx.store()
    with _progress(ctx, "verifying") as progress:
        report = store.verify(
            args.session, progress=progress, deep=args.deep, processes=VERIFY_PROCESSES
        )
    problems = [problem_json(p) for p in report.problems]
    orphans = [orphan_json(o) for o in report.orphans]
    result = {
        "ok": report.ok,
        "session_id": args.session,
        "sessions_checked": report.sessions_checked,
        "damaged_sessions": report.damaged_sessions,
        "blobs_checked": report.blobs_checked,
        "journal_records": report.journal_records,
        "problems": problems,
        "orphans": orphans,
    }
    if ctx.json:
        ctx.emit_json(result)
        return EXIT_OK if report.ok else EXIT_PROBLEMS
    _print_problems(ctx, report.problems)
    if args.verbose:
        for o in orphans:
            ctx.print(
                styled(
                    f"orphan  {o['kind']}  {o['path']}  {format_size(o['size'])}, "
                    f"{format_duration(o['age_s'])} old",
                    style="dim",
                )
            )
    else:
        kinds: dict[str, list[int]] = {}
        for o in orphans:
            kinds.setdefault(o["kind"], []).append(o["size"])
        for kind, sizes in sorted(kinds.items()):
            ctx.print(
                styled(
                    f"orphans {kind}: {len(sizes)} ({format_size(sum(sizes))}); -v lists them",
                    style="dim",
                )
            )
    summary = styled("ok" if report.ok else "DAMAGED", "bold green" if report.ok else "bold red")
    damaged = report.damaged_sessions
    summary.append(
        f": {_plural(report.sessions_checked, 'session')}"
        + (f" ({format_count(damaged)} damaged)" if damaged else "")
        + f", {_plural(report.blobs_checked, 'blob')} checked, "
        f"{_plural(len(problems), 'problem')}, {_plural(len(orphans), 'orphan')}"
        + (_orphan_hint({o["kind"] for o in orphans}) if orphans and report.ok else "")
    )
    ctx.print(summary)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def cmd_gc(ctx: Ctx, args: argparse.Namespace) -> int:
    from loopstore.store import GC_GRACE_S

    store = ctx.store()
    grace = GC_GRACE_S if args.grace is None else args.grace
    with _progress(ctx, "collecting garbage") as progress:
        report = store.gc(grace, progress=progress, dry_run=args.dry_run)
    code = EXIT_OK if report.ok else EXIT_PROBLEMS
    if ctx.json:
        ctx.emit_json(
            {
                "ok": report.ok,
                "dry_run": bool(args.dry_run),
                "grace_s": grace,
                "sessions_scanned": report.sessions_scanned,
                "sessions_skipped": report.sessions_skipped,
                "blobs_removed": report.blobs_removed,
                "journals_removed": report.journals_removed,
                "handoffs_removed": report.handoffs_removed,
                "tmp_removed": report.tmp_removed,
                "dirs_removed": report.dirs_removed,
                "bytes_freed": report.bytes_freed,
                "kept_young": report.kept_young,
                "problems": [problem_json(p) for p in report.problems],
            }
        )
        return code
    _print_problems(ctx, report.problems)
    verb = "would remove" if args.dry_run else "removed"
    counts = [
        (report.blobs_removed, "blob", None),
        (report.journals_removed, "old journal", None),
        (report.handoffs_removed, "hand-off file", None),
        (report.tmp_removed, "tmp file", None),
        (report.dirs_removed, "directory", "directories"),
    ]
    parts = [_plural(n, word, many) for n, word, many in counts if n]
    removed = f"{', '.join(parts)}, {format_size(report.bytes_freed)} freed" if parts else "nothing"
    scanned = _plural(report.sessions_scanned, "session") + " scanned"
    if report.problems:
        scanned += f", {report.sessions_skipped} skipped (listed above)"
    ctx.print(
        styled(f"gc {verb}: ", style="bold") + styled(f"{removed} ({scanned}; grace {grace:g} s)")
    )
    if report.kept_young:
        ctx.print(
            styled(
                f"kept {_plural(report.kept_young, 'unreferenced file')} younger than the "
                f"grace period ({grace:g} s): a writer or reader may still be using "
                f"{'it' if report.kept_young == 1 else 'them'}; a later gc removes "
                f"{'it' if report.kept_young == 1 else 'them'}",
                style="dim",
            )
        )
    return code


def cmd_import_legacy(ctx: Ctx, args: argparse.Namespace) -> int:
    source = Path(args.dir)
    if not source.is_dir():
        raise CliError(f"import-legacy: no such directory: {source}", EXIT_NOT_FOUND)
    store = ctx.store(create=True)
    with _progress(ctx, "importing") as progress:
        report = store.import_legacy(source, progress=progress, overwrite=args.overwrite)
    result = {
        "source": str(source),
        "ok": report.ok,
        "overwrite": bool(args.overwrite),
        "imported": report.imported,
        "updated": report.updated,
        "unchanged": report.unchanged,
        "conflicts": report.conflicts,
        "failed": [{"path": _path_text(f.path), "reason": f.reason} for f in report.failed],
    }
    if ctx.json:
        ctx.emit_json(result)
    else:
        for sid in report.conflicts:
            line = styled("CONFLICT ", style="bold yellow")
            line.append(
                f"session {sid!r}: the store holds loops or a newer state that the file "
                "lacks; left unchanged (--overwrite: the file wins)"
            )
            ctx.print(line)
        for f in report.failed:
            line = styled("FAILED ", style="bold red")
            line.append(f"{f.path}: {_one_line(f.reason)}")
            ctx.print(line)
        ctx.print(
            styled(f"import from {source}: ", style="bold")
            + styled(
                f"{len(report.imported)} new, {len(report.updated)} updated, "
                f"{len(report.unchanged)} unchanged, "
                f"{_plural(len(report.conflicts), 'conflict')}, {len(report.failed)} failed"
            )
        )
    return EXIT_OK if report.ok else EXIT_PROBLEMS


@dataclass
class _Batch:
    """The outcome of a command run session by session (rm, export-legacy, checkpoint):
    each failure is reported in one line on stderr and the others are still done."""

    failed: list[dict[str, Any]] = field(default_factory=list)
    first_error: SessionError | None = None

    def run(self, session_id: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except SessionError as err:
            _report_error(err)
            self.failed.append(_error_json(session_id, err))
            self.first_error = self.first_error or err
            return None

    def exit_code(self, *, all_sessions: bool) -> int:
        """Named sessions: the first failure's code (3 not found, 4 locked, ...); a
        store-wide run: 1, something was wrong."""
        if self.first_error is None:
            return EXIT_OK
        return EXIT_PROBLEMS if all_sessions else exit_code_for(self.first_error)


def _session_targets(ctx: Ctx, args: argparse.Namespace, command: str) -> list[str]:
    """SESSION... or --all (every session, damaged ones too, so that each is reported)."""
    if args.all and args.sessions:
        raise CliError(f"{command}: give SESSION... or --all, not both", EXIT_USAGE)
    if not args.all and not args.sessions:
        raise CliError(f"{command}: give SESSION... or --all", EXIT_USAGE)
    store = ctx.store()
    if args.all:
        with _progress(ctx, "indexing sessions") as progress:
            ids = [s.session_id for s in store.sessions(order="id", progress=progress)]
        return ids + [sid for sid, _cause in store.damaged_sessions()]
    return list(args.sessions)


def cmd_export_legacy(ctx: Ctx, args: argparse.Namespace) -> int:
    targets: list[str] = list(args.targets)
    if args.all:
        if len(targets) != 1:
            raise CliError("export-legacy --all takes exactly one argument: DIR", EXIT_USAGE)
        dest = Path(targets[0])
        args.sessions = []
    else:
        if len(targets) < 2:
            raise CliError("export-legacy needs SESSION... DIR (or --all DIR)", EXIT_USAGE)
        dest = Path(targets[-1])
        args.sessions = targets[:-1]
    check_directory_argument(dest, "export-legacy: DIR")
    ids = _session_targets(ctx, args, "export-legacy")
    store = ctx.store()
    batch = _Batch()
    written: list[dict[str, str]] = []
    with _progress(ctx, "exporting") as progress:
        for done, session_id in enumerate(ids, 1):

            def export(sid: str = session_id) -> Path:
                return store.export_legacy(sid, dest)

            path = batch.run(session_id, export)
            if path is not None:
                written.append({"session_id": session_id, "path": str(path)})
            if progress is not None:
                progress(done, len(ids))
    ok = not batch.failed
    if ctx.json:
        ctx.emit_json({"dest": str(dest), "ok": ok, "exported": written, "failed": batch.failed})
    else:
        for w in written:
            ctx.print(styled(w["path"]))
        ctx.note(
            f"exported {_plural(len(written), 'session')} to {dest}"
            + (f"; {len(batch.failed)} failed (above)" if batch.failed else "")
        )
    return batch.exit_code(all_sessions=args.all)


def cmd_checkpoint(ctx: Ctx, args: argparse.Namespace) -> int:
    """Fold journals now, so that every blob is a plain file in loops/ (what rsync,
    snapshots and tar should see at rest)."""
    ids = _session_targets(ctx, args, "checkpoint")
    store = ctx.store()
    batch = _Batch()
    folded: list[str] = []
    at_rest: list[str] = []
    with _progress(ctx, "checkpointing") as progress:
        for done, session_id in enumerate(ids, 1):

            def fold(sid: str = session_id) -> bool:
                return store.checkpoint(sid)

            outcome = batch.run(session_id, fold)
            if outcome is True:
                folded.append(session_id)
            elif outcome is False:
                at_rest.append(session_id)
            if progress is not None and args.all:
                progress(done, len(ids))
    if ctx.json:
        ctx.emit_json(
            {
                "ok": not batch.failed,
                "checkpointed": folded,
                "at_rest": at_rest,
                "failed": batch.failed,
            }
        )
    else:
        if not args.all:
            for sid in folded:
                ctx.print(styled(f"checkpointed {sid}"))
            for sid in at_rest:
                ctx.print(styled(f"at rest {sid} (nothing to fold)", style="dim"))
        ctx.print(
            styled("checkpoint: ", "bold")
            + styled(
                f"{_plural(len(folded), 'session')} folded, {len(at_rest)} already at rest, "
                f"{len(batch.failed)} failed"
            )
        )
    return batch.exit_code(all_sessions=args.all)


def cmd_migrate(ctx: Ctx, args: argparse.Namespace) -> int:
    from loopstore.ondisk import FORMAT_VERSION

    store = ctx.store()
    with _progress(ctx, "migrating") as progress:
        report = store.migrate(progress=progress)
    code = EXIT_OK if report.ok else EXIT_PROBLEMS
    if ctx.json:
        ctx.emit_json(
            {
                "ok": report.ok,
                "format_version": FORMAT_VERSION,
                "sessions": report.sessions,
                "upgraded": report.upgraded,
                "current": report.current,
                "problems": [problem_json(p) for p in report.problems],
            }
        )
        return code
    _print_problems(ctx, report.problems)
    ctx.print(
        styled("migrate: ", "bold")
        + styled(
            f"{_plural(report.sessions, 'session')}: {report.upgraded} upgraded to format "
            f"v{FORMAT_VERSION}, {report.current} already v{FORMAT_VERSION}, "
            f"{_plural(len(report.problems), 'problem')}"
        )
    )
    return code


def cmd_reindex(ctx: Ctx, args: argparse.Namespace) -> int:
    """Rebuild the listing catalog from the sessions (listings do it on their own when it
    is missing or stale; this is for a catalog you distrust, or to pay the cost now)."""
    store = ctx.store()
    with _progress(ctx, "reindexing") as progress:
        listed = store.reindex(progress=progress)
    damaged = store.damaged_sessions()
    code = EXIT_PROBLEMS if damaged else EXIT_OK
    if ctx.json:
        ctx.emit_json(
            {
                "root": ctx.where,
                "ok": not damaged,
                "sessions": listed,
                "damaged": _damaged_json(damaged),
            }
        )
        _warn_damaged(ctx, damaged)
        return code
    _warn_damaged(ctx, damaged)
    ctx.print(
        styled("reindex: ", "bold")
        + styled(f"{_plural(listed, 'session')} listed, {len(damaged)} damaged")
    )
    return code


def cmd_rm(ctx: Ctx, args: argparse.Namespace) -> int:
    store = ctx.store()
    batch = _Batch()
    removed: list[str] = []
    for session_id in args.sessions:

        def delete(sid: str = session_id) -> bool:
            store.delete(sid)
            return True

        if batch.run(session_id, delete):
            removed.append(session_id)
    if ctx.json:
        ctx.emit_json({"ok": not batch.failed, "removed": removed, "failed": batch.failed})
    else:
        for session_id in removed:
            ctx.print(styled(f"removed {session_id}"))
    return batch.exit_code(all_sessions=False)


def cmd_demo(ctx: Ctx, args: argparse.Namespace) -> int:
    from loopstore import demo

    kwargs: dict[str, Any] = {}
    for name in ("workers", "sessions", "loops", "seed"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    for flag in ("fresh", "add_to_existing"):
        if getattr(args, flag):
            kwargs[flag] = True
    try:
        result = demo.run_demo(ctx.local_root or ctx.location, console=ctx.out, **kwargs)
    except demo.DemoUsageError as exc:  # options out of bounds, a root it may not use
        raise CliError(f"demo: {exc}", EXIT_USAGE) from exc
    except KeyboardInterrupt:
        # run_demo has stopped its workers; say so in one line.
        _write_stderr(f"{PROG}: demo interrupted: workers stopped (loops already stored stay)\n")
        return EXIT_INTERRUPTED
    ok = getattr(result, "ok", True)
    return EXIT_OK if ok is None or ok else EXIT_PROBLEMS


def _is_url(text: str) -> bool:
    from loopstore.locations import is_url

    return is_url(text)


def check_backup_dest(dest: Path) -> None:
    """A local DEST that is a file, lies under one, or is a non-empty directory that is
    not a store is a usage error (exit 2), refused before anything is written."""
    check_directory_argument(dest, "backup: DEST")
    from loopstore import ondisk

    try:
        names = os.listdir(dest)
    except OSError:  # missing (created by backup) or unreadable (backup reports it)
        return
    if ondisk.MARKER_NAME in names:
        return
    foreign = sorted(n for n in names if not ondisk.is_store_entry(n))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CliError(
            f"backup: DEST {dest} is a non-empty directory that is not a loopstore store "
            f"({shown}); refusing to write into it",
            EXIT_USAGE,
        )


def cmd_backup(ctx: Ctx, args: argparse.Namespace) -> int:
    from loopstore.backup import backup, verify_backup

    store = ctx.store()
    dest: str = args.dest
    if not _is_url(dest):
        check_backup_dest(Path(dest.removeprefix("file://")))
    with _progress(ctx, "backing up") as progress:
        report = backup(
            store,
            dest,
            prune=not args.keep_deleted,
            progress=progress,
            link=not args.copy,
            check=args.check,
        )
    result: dict[str, Any] = {"backup": report.as_dict()}
    check = None
    if args.verify:
        with _progress(ctx, "verifying backup") as progress:
            check = verify_backup(store, dest, progress=progress)
        result["verify"] = check.as_dict()
    ok = report.ok and (check is None or check.ok)
    result["ok"] = ok
    if ctx.json:
        ctx.emit_json(result)
        return EXIT_OK if ok else EXIT_PROBLEMS
    for failure in report.failed:
        line = styled("FAILED ", "bold red")
        line.append(
            f"session {failure.session_id!r}: {_one_line(failure.reason)}; not backed up "
            "(DEST keeps the copy it had, if any)"
        )
        ctx.print(line)
    vanished = (
        f", {report.sessions_vanished} deleted while copying" if report.sessions_vanished else ""
    )
    ctx.print(
        styled(f"backup to {report.dest}: ", "bold")
        + styled(
            f"{_plural(report.sessions, 'session')} ({report.sessions_updated} updated, "
            f"{report.sessions_unchanged} unchanged, {report.sessions_removed} removed"
            f"{vanished}, {len(report.failed)} failed) in {report.duration_s:.1f} s"
        )
    )
    ctx.print(
        styled(
            f"blobs: {report.files_linked} linked ({format_size(report.bytes_linked)}), "
            f"{report.files_copied} copied ({format_size(report.bytes_copied)}), "
            f"{report.files_skipped} already there ({format_size(report.bytes_skipped)}); "
            f"{report.blobs_verified} hash-checked",
            style="dim",
        )
    )
    if check is not None:
        _print_problems(ctx, check.dest_report.problems)
        for label, ids in (
            ("diverged", check.diverged),
            ("behind", check.behind),
            ("missing", check.missing),
            ("extra", check.extra),
        ):
            for sid in ids:
                ctx.print(styled(f"{label:<8} ", "yellow") + styled(sid))
        for failure in check.source_unreadable:
            ctx.print(
                styled("source damaged ", "bold red")
                + styled(
                    f"session {failure.session_id!r}: {_one_line(failure.reason)} "
                    "(DEST holds its last good state)"
                )
            )
        verdict = "in sync" if check.in_sync else ("ok" if check.ok else "DAMAGED")
        ctx.print(
            styled(f"verify: {verdict}", "bold green" if check.ok else "bold red")
            + styled(
                f" ({_plural(check.sessions_checked, 'session')}: "
                f"{len(check.current)} current, {len(check.behind)} behind, "
                f"{len(check.missing)} missing, {len(check.extra)} extra, "
                f"{len(check.diverged)} diverged, "
                f"{len(check.source_unreadable)} unreadable in the store; "
                f"{_plural(len(check.dest_report.problems), 'problem')})"
            )
        )
    return EXIT_OK if ok else EXIT_PROBLEMS


# ---------------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (bounds keep a typo from filling a disk)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high:,}: {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options: their bounds come from `loopstore.demo`."""
    from loopstore import demo

    p.add_argument(
        "--workers",
        type=_int_between(1, demo.MAX_WORKERS),
        metavar="N",
        help=f"worker processes, at most --sessions (default: {demo.DEFAULT_WORKERS})",
    )
    p.add_argument(
        "--sessions",
        type=_int_between(1, demo.MAX_SESSIONS),
        metavar="N",
        help=f"sessions to record (default: {demo.DEFAULT_SESSIONS})",
    )
    p.add_argument(
        "--loops",
        type=_int_between(1, demo.MAX_LOOPS),
        metavar="N",
        help=f"loops per session (default: {demo.DEFAULT_LOOPS}); "
        f"sessions x loops <= {demo.MAX_TOTAL_LOOPS:,}",
    )
    p.add_argument("--seed", type=_int_between(0, demo.MAX_SEED), metavar="N", help="default: 0")
    p.add_argument(
        "--fresh", action="store_true", help="empty the store first (only a store the demo made)"
    )
    p.add_argument(
        "--add-to-existing",
        action="store_true",
        help="add to a non-empty store the demo did not create (refused otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inspect, verify, repair and migrate a loopstore session store.",
        epilog=(
            "exit codes: 0 ok, 1 problems found (damaged data, I/O or permission error),\n"
            "            2 usage error (also a --root that is not a store loopstore may use),\n"
            "            3 not found, 4 locked, 130 interrupted"
        ),
    )
    parser.add_argument(
        "--root",
        metavar="STORE",
        help=f"store directory, file:// or s3://bucket/prefix URL "
        f"(default: ${ROOT_ENV}, else {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--lock-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long writers wait for a session lock before exit code 4 (default: 5)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")

    json_opt = _Parser(add_help=False)
    json_opt.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("ls", parents=[json_opt], help="list sessions")
    p.add_argument("--agent", metavar="AGENT", help="only sessions of this agent")
    p.add_argument("--limit", type=_non_negative_int, metavar="N", help="show at most N")
    p.add_argument(
        "--sort",
        choices=SORT_ORDERS,
        default="active",
        help="order (default: active, most recent first; size and loops: largest first)",
    )
    p.add_argument("--reverse", action="store_true", help="reverse the order")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", parents=[json_opt], help="one session: header, loops, usage")
    p.add_argument("session", metavar="SESSION")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("tree", parents=[json_opt], help="the loop tree of a session")
    p.add_argument("session", metavar="SESSION")
    p.set_defaults(func=cmd_tree)

    p = sub.add_parser("cat", help="phi-core JSON of a session or one loop to stdout")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("loop", metavar="LOOP", nargs="?", help="loop id, 1-based index or id suffix")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("stats", parents=[json_opt], help="store totals")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "verify", parents=[json_opt], help="check every checkpoint, journal record and blob hash"
    )
    p.add_argument("session", metavar="SESSION", nargs="?")
    p.add_argument("--deep", action="store_true", help="also decode every loop")
    p.add_argument("-v", "--verbose", action="store_true", help="list every orphan file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "gc", parents=[json_opt], help="remove unreferenced blobs, old journals and tmp files"
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="keep files younger than this (default: the store's, 900 s)",
    )
    p.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "checkpoint",
        parents=[json_opt],
        help="fold journals so every blob is a plain file (what rsync and snapshots see)",
        usage=f"{PROG} checkpoint [-h] [--json] (SESSION... | --all)",
    )
    p.add_argument("--all", action="store_true", help="every session in the store")
    p.add_argument("sessions", nargs="*", metavar="SESSION")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser(
        "migrate", parents=[json_opt], help="upgrade every format v1 session to the current format"
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "reindex", parents=[json_opt], help="rebuild the listing catalog from the sessions"
    )
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser(
        "import-legacy", parents=[json_opt], help="import phi-core session files from DIR"
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the file wins over a stored session that holds loops or a newer state it lacks "
        "(default: leave such a session unchanged and report a conflict)",
    )
    p.set_defaults(func=cmd_import_legacy)

    p = sub.add_parser(
        "export-legacy",
        parents=[json_opt],
        help="write sessions as phi-core files into DIR",
        usage=f"{PROG} export-legacy [-h] [--json] (SESSION... DIR | --all DIR)",
    )
    p.add_argument("--all", action="store_true", help="every session in the store")
    p.add_argument("targets", nargs="+", metavar="SESSION... DIR")
    p.set_defaults(func=cmd_export_legacy)

    p = sub.add_parser("rm", parents=[json_opt], help="delete sessions")
    p.add_argument("sessions", nargs="+", metavar="SESSION")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "demo",
        help="record synthetic sessions from several worker processes",
        define=_demo_arguments,
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("backup", parents=[json_opt], help="consistent incremental snapshot")
    p.add_argument("dest", metavar="DEST", help="a directory (made a store) or an s3:// URL")
    p.add_argument("--verify", action="store_true", help="then check the copy against the store")
    p.add_argument(
        "--keep-deleted",
        action="store_true",
        help="keep sessions in DEST that were deleted from the store (default: mirror)",
    )
    p.add_argument("--copy", action="store_true", help="always copy blobs, never hard-link")
    p.add_argument(
        "--check",
        action="store_true",
        help="also hash-check unchanged sessions (a full read of the store; finds bit rot)",
    )
    p.set_defaults(func=cmd_backup)
    return parser


def resolve_root(cli_root: str | None) -> str:
    """--root, else $LOOPSTORE_ROOT (when set and not empty), else ./.loopstore."""
    if cli_root is not None:
        if not cli_root:
            raise CliError("--root must not be empty", EXIT_USAGE)
        return cli_root
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


def local_root(location: str) -> Path | None:
    """The directory of a local store (a path or file:// URL); None for any other URL."""
    from loopstore import locations

    return None if locations.is_url(location) else locations.local_path(location)


def check_root(root: Path) -> None:
    """A store root that is a file (or lies under one) is an error, not an empty store."""
    check_directory_argument(root, "store root")


def check_directory_argument(path: Path, label: str) -> None:
    """A directory argument (which may not exist yet) that is a regular file, or lies
    under one, is a usage error (exit 2) naming it."""
    probe = path
    while True:
        try:
            is_dir = probe.is_dir()
            exists = is_dir or probe.exists()
        except OSError:  # unreadable: leave it to the command, which reports the error
            return
        if exists:
            if is_dir:
                return
            where = "is" if probe == path else f"lies under {probe}, which is"
            raise CliError(f"{label} {path} {where} not a directory", EXIT_USAGE)
        if probe.parent == probe:
            return
        probe = probe.parent


def _storage_message(err: StorageError) -> str:
    """`session 'x': cannot use lock file: Permission denied (/root/locks/x.lock)`: the
    store's message with the OS error shown as its plain text, and the path once."""
    cause = err.__cause__
    text = err.cause
    path: Any = err.path
    if isinstance(cause, OSError):
        if cause.strerror and str(cause) and str(cause) in text:
            text = text.replace(str(cause), cause.strerror)
        if path is None and cause.filename is not None:
            path = os.fsdecode(cause.filename)
    where = f"session {err.session_id!r}" if err.session_id is not None else "store"
    return f"{where}: {text}" + (f" ({path})" if path is not None else "")


def _report_error(err: BaseException, *, prefix: str = "error") -> None:
    if isinstance(err, StorageError):
        message = _storage_message(err)
    elif isinstance(err, SessionError | CliError):
        message = str(err)
    elif isinstance(err, OSError):
        where = os.fsdecode(err.filename) if err.filename is not None else ""
        message = f"{where}: {err.strerror or err}" if where else str(err)
    else:
        message = f"{type(err).__name__}: {err}"
    _write_stderr(f"{PROG}: {prefix}: {_one_line(message)}\n")


def _write_stderr(text: str) -> None:
    """One line to stderr; a closed stderr is not worth a traceback."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


def _silence_closed_pipe() -> None:
    """After EPIPE: point stdout (and stderr) at /dev/null, so that nothing else fails,
    not even the interpreter's final flush ("Exception ignored ... BrokenPipeError")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (usable in-process)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, so that a closed pipe is handled below, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`loopstore ls | head -1`): not a problem found, and no
        # traceback. Even `--help | head -1` ends up here.
        _silence_closed_pipe()
        return EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _ParserExit as stop:
        return stop.code
    if args.command is None:
        sys.stderr.write(f"{PROG}: error: no command given (see '{PROG} --help')\n")
        return EXIT_USAGE
    try:
        location = resolve_root(args.root)
        root = local_root(location)
        if root is not None:
            check_root(root)
    except CliError as err:
        _report_error(err)
        return err.code
    ctx = Ctx(
        location=location,
        local_root=root,
        json=bool(args.json),
        stderr_tty=bool(sys.stderr.isatty()),
        lock_timeout=args.lock_timeout,
    )
    try:
        code: int = args.func(ctx, args)
        return code
    except BrokenPipeError:
        raise
    except (SessionError, CliError, OSError) as err:
        _report_error(err)
        return exit_code_for(err)
    except KeyboardInterrupt:
        _write_stderr(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
