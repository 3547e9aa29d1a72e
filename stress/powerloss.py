"""Power-loss replay in the spirit of ALICE (Pillai et al., OSDI 2014).

A writer program (``stress.powerloss_writers``) drives the store through its public API
under ``strace -f``. This module rebuilds, from the trace, every file-system operation the
writer made inside the store directory, replays them on a model of the directory, and checks
every crash state a POSIX-ish persistence model allows:

* a file's data is durable from the last fsync/fdatasync of its inode (sync/syncfs: all);
* a create, mkdir, link, unlink, rmdir or rename is durable once its parent directory is
  fsynced. A rename is atomic (done or not, never half); with the default rule it is durable
  once either of its directories is fsynced (the fsync of the destination persists the new
  name, and an atomic rename takes the old one with it). ``rename_rule="both"`` is the
  stricter reading (both directories), ``"destination"`` the classic "fsync the directory
  that holds the new name".

At a crash point *p* (the first *p* events of the trace happened) the pending directory
operations form a set: any subset of them may have reached the disk (all subsets when few,
else every prefix, every single omission and a seeded random sample). Pending file data
(writes and truncations since the inode's last sync) may have reached the disk as none, all,
any prefix, or with the last write torn (half of its bytes; or zeros in its place, as ext4's
delayed allocation can leave). Each distinct crash state is materialized into a fresh
directory, opened with a new ``FileSystemSessionStore`` and checked against what the writer
had acknowledged at that point (see `check_state_dir`).

The model tracks inodes, not names: a rename moves a name to an inode, data belongs to the
inode, descriptors map to inodes through openat/dup/fcntl/close (file offsets too, read via
raw ``read`` results), and paths resolve relative to AT_FDCWD or directory descriptors.
Syscalls outside the store root are ignored, except the writer's stdout (fd 1), where
``BEGIN``/``ACK`` lines order each call against the file-system operations. After every
traced run the model is compared with the real directory, so a syscall the model missed
shows up as a harness error, never as a silent pass.

Entry points: `run_scenario` (trace, model, enumerate, check, report), `TraceModel` and
`CrashEnumerator` (usable on hand-written traces), `count_syncs` (fsync accounting).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from loopstore.models import LoopRecord, Session

REPO: Final = Path(__file__).resolve().parent.parent
"""The repository root (``stress`` and ``tests`` live beside ``src``)."""

STRING_LIMIT: Final = 1 << 24
"""strace -s: longest string printed in full (16 MiB); a longer write is a harness error."""

SYNC_SYSCALLS: Final = ("fsync", "fdatasync", "syncfs", "sync_file_range", "sync")
"""Every syscall that asks for durability (sync_file_range promises none; it is counted)."""

TRACE_SYSCALLS: Final = (
    "?open",
    "openat",
    "?creat",
    "close",
    "close_range",
    "dup",
    "?dup2",
    "dup3",
    "fcntl",
    "read",
    "readv",
    "write",
    "writev",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "lseek",
    "ftruncate",
    "truncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "syncfs",
    "sync",
    "sync_file_range",
    "?rename",
    "renameat",
    "renameat2",
    "?link",
    "linkat",
    "?unlink",
    "unlinkat",
    "?mkdir",
    "mkdirat",
    "?rmdir",
    "?symlink",
    "symlinkat",
    "chdir",
    "fchdir",
    "clone",
    "clone3",
    "?fork",
    "?vfork",
    "execve",
    "sendfile",
    "copy_file_range",
)
"""What the writer runs are traced with (``?``: ignored where the architecture lacks it)."""

MARKER_KINDS: Final = frozenset({"INIT", "BEGIN", "ACK", "FAIL", "MISMATCH", "DONE"})
"""Lines a writer prints on fd 1 (``KIND <json>``); other stdout lines are ignored."""

RenameRule = Literal["either", "both", "destination"]
Mode = Literal["short", "long"]
Torn = Literal["half", "zero"]


class StraceMissing(RuntimeError):
    """strace is not installed: the power-loss harness cannot run (never a skip)."""


class TraceError(RuntimeError):
    """The trace cannot be modelled: an unsupported syscall on the store, or a divergence."""


def strace_binary() -> str:
    """Path of strace, or StraceMissing with what to do about it."""
    found = shutil.which("strace")
    if found is None and os.access("/usr/bin/strace", os.X_OK):
        found = "/usr/bin/strace"
    if found is None:
        raise StraceMissing(
            "strace is not installed, and the power-loss tests need it to record the "
            "store's system calls: install it (e.g. `apt-get install strace`); CI does"
        )
    return found


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Injection:
    """Kill the traced process on entry to the `nth` call of `syscall` (strace inject)."""

    syscall: str
    nth: int

    def strace_arg(self) -> str:
        return f"inject={self.syscall}:signal=KILL:when={self.nth}"


@dataclass(frozen=True)
class TracedRun:
    """One writer process (and its children) run under strace."""

    label: str
    argv: tuple[str, ...]
    returncode: int
    trace_path: Path
    stdout: str
    stderr: str
    seconds: float
    injection: Injection | None = None


def writer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a writer: ours, the repository on PYTHONPATH, plus `extra`."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if env.get("PYTHONPATH"):
        # An explicit PYTHONPATH (e.g. a loopstore checkout under test) comes first.
        paths.insert(0, env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("LOOPSTORE_SKIP_FSYNC", None)
    if extra:
        env.update(extra)
    return env


def run_traced(
    argv: Sequence[str],
    *,
    trace_path: Path,
    label: str = "",
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    injection: Injection | None = None,
    syscalls: Sequence[str] = TRACE_SYSCALLS,
    string_limit: int = STRING_LIMIT,
    timeout: float = 600.0,
) -> TracedRun:
    """Run `argv` under ``strace -f -xx`` writing the trace to `trace_path`."""
    cmd = [
        strace_binary(),
        "-f",
        "-xx",
        "-s",
        str(string_limit),
        "-e",
        "trace=" + ",".join(syscalls),
        "-e",
        "raw=read,readv",
        "-e",
        "signal=none",
        "-o",
        str(trace_path),
    ]
    if injection is not None:
        cmd += ["-e", injection.strace_arg()]
    cmd += ["--", *argv]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=dict(env) if env is not None else writer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return TracedRun(
        label=label,
        argv=tuple(argv),
        returncode=proc.returncode,
        trace_path=trace_path,
        stdout=proc.stdout,
        stderr=proc.stderr,
        seconds=time.monotonic() - t0,
        injection=injection,
    )


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Syscall:
    """One completed (or killed) syscall of the trace."""

    tid: int
    name: str
    args: tuple[str, ...]
    ret: int | None
    """The return value; None when it never returned (``= ?``, e.g. killed on entry)."""
    errno: str | None
    line: int
    entry_only: bool = False
    """True for the entry half of an unfinished clone (its flags matter before it returns)."""

    @property
    def ok(self) -> bool:
        return self.ret is not None and self.ret >= 0


@dataclass(frozen=True)
class ProcExit:
    tid: int
    killed: bool
    line: int


TraceLine = Syscall | ProcExit

_LINE_RE = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED_RE = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_TOKEN_RE = re.compile(r'"[^"]*"(?:\.\.\.)?|[(){}\[\]]|,|[^",(){}\[\]]+')
_IOV_RE = re.compile(r'iov_base="([^"]*)"(\.\.\.)?')


def split_args(text: str) -> tuple[str, ...]:
    """Top-level comma-separated arguments of an strace argument list."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for m in _TOKEN_RE.finditer(text):
        tok = m.group(0)
        if tok in "({[" and len(tok) == 1:
            depth += 1
        elif tok in ")}]" and len(tok) == 1:
            depth -= 1
        elif tok == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(tok)
    last = "".join(cur).strip()
    if last or out:
        out.append(last)
    return tuple(out)


def decode_string(token: str) -> tuple[bytes, bool]:
    """Bytes of an ``-xx`` string argument, and whether strace cut it short (``"..."...``)."""
    truncated = token.endswith("...")
    if truncated:
        token = token[:-3]
    if len(token) < 2 or token[0] != '"' or token[-1] != '"':
        raise TraceError(f"not a string argument: {token[:80]!r}")
    inner = token[1:-1]
    if not inner:
        return b"", truncated
    if len(inner) % 4 or not inner.startswith("\\x"):
        raise TraceError(f"string not in strace -xx form: {inner[:80]!r}")
    return bytes.fromhex(inner.replace("\\x", "")), truncated


def _parse_ret(text: str) -> tuple[int | None, str | None]:
    text = text.strip()
    if not text or text.startswith("?"):
        return None, None
    parts = text.split()
    try:
        value = int(parts[0], 0)
    except ValueError:
        return None, None
    err = parts[1] if value < 0 and len(parts) > 1 else None
    return value, err


def _split_call(name: str, body: str, tid: int, lineno: int) -> Syscall:
    """`body` is everything after ``name(``: ``args) = ret ...``."""
    eq = body.rfind(" = ")
    close = body.rstrip()[:eq].rstrip() if eq >= 0 else ""
    if eq < 0 or not close.endswith(")"):
        raise TraceError(f"trace line {lineno}: no return value in {name}({body[:120]}")
    ret, err = _parse_ret(body[eq + 3 :])
    return Syscall(tid, name, split_args(close[:-1]), ret, err, lineno)


def parse_strace(lines: Iterable[str]) -> Iterator[TraceLine]:
    """Syscalls of an ``strace -f -xx -o FILE`` trace, unfinished/resumed halves joined."""
    pending: dict[int, tuple[str, str]] = {}
    for lineno, raw in enumerate(lines, 1):
        m = _LINE_RE.match(raw.rstrip("\n"))
        if m is None:
            continue
        tid = int(m.group(1))
        rest = m.group(2)
        if rest.startswith("+++"):
            pending.pop(tid, None)
            yield ProcExit(tid, "killed by" in rest, lineno)
            continue
        if rest.startswith("---"):
            continue
        if rest.endswith("<unfinished ...>"):
            name, _, args = rest[: -len("<unfinished ...>")].partition("(")
            pending[tid] = (name, args)
            if name in ("clone", "clone3", "fork", "vfork"):
                yield Syscall(tid, name, split_args(args), None, None, lineno, entry_only=True)
            elif name == "close":
                # The descriptor leaves the table when close starts: another thread's
                # open can get the same number before this close returns.
                yield Syscall(tid, name, split_args(args.rstrip()), 0, None, lineno)
            continue
        r = _RESUMED_RE.match(rest)
        if r is not None:
            name = r.group(1)
            first = pending.pop(tid, (name, ""))
            if name != "close":  # taken effect at its start (above)
                yield _split_call(name, first[1] + r.group(2), tid, lineno)
            continue
        name, sep, body = rest.partition("(")
        if not sep or not name.replace("_", "").isalnum():
            continue
        yield _split_call(name, body, tid, lineno)
    # A call still unfinished at the end never returned (the process was killed in it).
    for tid, (name, args) in pending.items():
        yield Syscall(tid, name, split_args(args.rstrip()), None, None, -1)


def read_trace(path: Path) -> Iterator[TraceLine]:
    with path.open("r", encoding="ascii", errors="replace") as f:
        yield from parse_strace(f)


# --------------------------------------------------------------------------- events


Change = tuple[int, str, int | None]
"""(directory inode, name, inode the name now points to, or None: removed)."""


@dataclass(frozen=True)
class DirOp:
    """A namespace change: create, mkdir, link, unlink, rmdir, rename (atomic)."""

    index: int
    syscall: str
    changes: tuple[Change, ...]
    src_dir: int
    dst_dir: int
    desc: str
    run: str


@dataclass(frozen=True)
class DataOp:
    """A write at `offset`, or a truncation to `truncate_to` (O_TRUNC, ftruncate)."""

    index: int
    ino: int
    offset: int
    data: bytes
    truncate_to: int | None
    desc: str
    run: str


@dataclass(frozen=True)
class SyncOp:
    """fsync/fdatasync of one inode (a file or a directory), or sync/syncfs (ino None)."""

    index: int
    syscall: str
    ino: int | None
    is_dir: bool
    tid: int
    nth: int
    """Which call of `syscall` this was for its thread (strace ``inject ... when=``)."""
    desc: str
    run: str


@dataclass(frozen=True)
class Marker:
    """A line the writer printed on fd 1 (BEGIN, ACK, ...)."""

    index: int
    kind: str
    payload: Mapping[str, Any]
    run: str
    tid: int


Event = DirOp | DataOp | SyncOp | Marker


def describe_event(ev: Event) -> str:
    if isinstance(ev, Marker):
        p = ev.payload
        what = " ".join(
            str(p[k]) for k in ("n", "call", "sid", "desc") if k in p and p[k] not in ("", None)
        )
        return f"[{ev.run}] {ev.kind} {what}".rstrip()
    if isinstance(ev, DataOp):
        what = (
            f"truncate to {ev.truncate_to}"
            if ev.truncate_to is not None
            else f"write {len(ev.data)} B at {ev.offset}"
        )
        return f"[{ev.run}] {what} {ev.desc}"
    if isinstance(ev, SyncOp):
        return f"[{ev.run}] {ev.syscall} {ev.desc}"
    return f"[{ev.run}] {ev.syscall} {ev.desc}"


# --------------------------------------------------------------------------- the model


@dataclass
class _Inode:
    ino: int
    is_dir: bool
    entries: dict[str, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    parent: int | None = None
    name: str = ""


@dataclass
class _OpenFile:
    ino: int | None
    """Inode inside the store, or None for anything outside it."""
    path: str | None = None
    """Absolute path of an outside directory (to resolve paths relative to it)."""
    offset: int = 0
    append: bool = False


@dataclass
class _FdTable:
    fds: dict[int, tuple[_OpenFile, bool]] = field(default_factory=dict)


@dataclass
class _Cwd:
    ino: int | None
    path: str | None


@dataclass
class _Proc:
    fdt: _FdTable
    cwd: _Cwd


@dataclass(frozen=True)
class _Loc:
    """A resolved path inside the store: the entry `name` in directory `parent`."""

    parent: int
    name: str
    ino: int | None
    path: str


@dataclass
class RunInfo:
    """What one traced process tree did (for reports and kill-point rules)."""

    label: str
    first_event: int
    last_event: int = -1
    killed: bool = False
    syscalls: int = 0
    sync_calls: dict[str, int] = field(default_factory=dict)
    """Every durability syscall of the run, inside the store or not, by name."""
    store_syncs: int = 0


@dataclass
class Trace:
    """The modelled history: initial namespace, events in order, durability of each."""

    root: str
    events: list[Event]
    is_dir: dict[int, bool]
    initial_entries: dict[int, dict[str, int]]
    initial_data: dict[int, bytes]
    runs: list[RunInfo]
    rename_rule: RenameRule
    durable_at: dict[int, int]
    """Event index of an op -> index of the sync event that made it durable (absent: never)."""

    def ops(self) -> Iterator[DirOp | DataOp]:
        for ev in self.events:
            if isinstance(ev, (DirOp, DataOp)):
                yield ev

    def markers(self) -> list[Marker]:
        return [ev for ev in self.events if isinstance(ev, Marker)]


def _flags(text: str) -> set[str]:
    return {f.strip() for f in text.split("|")}


def _int(text: str) -> int:
    text = text.strip().strip("[]")
    if text in ("~0", "~0U"):
        return 2**32 - 1
    return int(text, 0)


class TraceModel:
    """Replays traced syscalls on an in-memory model of the store directory.

    `root` is the store directory; its current content is the initial, fully durable
    state (call this before the traced runs). Feed each run's trace in order with `feed`.
    """

    def __init__(self, root: Path, *, rename_rule: RenameRule = "either") -> None:
        self.root = os.path.realpath(root)
        self.rename_rule: RenameRule = rename_rule
        self._inodes: dict[int, _Inode] = {}
        self._next_ino = 0
        self.events: list[Event] = []
        self.runs: list[RunInfo] = []
        self._procs: dict[int, _Proc] = {}
        self._cloning: dict[int, str] = {}
        self._nth: dict[tuple[str, int, str], int] = {}
        self._stdout: dict[int, bytearray] = {}
        self._run: RunInfo | None = None
        self._name_of: dict[int, tuple[int, str]] = {}
        self._cwd = str(REPO)
        self._scan_initial()
        self.initial_entries = {i.ino: dict(i.entries) for i in self._inodes.values() if i.is_dir}
        self.initial_data = {i.ino: bytes(i.data) for i in self._inodes.values() if not i.is_dir}

    # -- namespace -------------------------------------------------------------------

    def _new(self, is_dir: bool, parent: int | None = None, name: str = "") -> _Inode:
        node = _Inode(self._next_ino, is_dir, parent=parent, name=name)
        self._next_ino += 1
        self._inodes[node.ino] = node
        return node

    def _scan_initial(self) -> None:
        root = self._new(True)
        by_dev_ino: dict[tuple[int, int], int] = {}

        def scan(node: _Inode, path: str) -> None:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    child = self._new(True, node.ino, e.name)
                    node.entries[e.name] = child.ino
                    scan(child, e.path)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in by_dev_ino:
                        node.entries[e.name] = by_dev_ino[key]
                        continue
                    f = self._new(False)
                    with open(e.path, "rb") as fh:
                        f.data = bytearray(fh.read())
                    by_dev_ino[key] = f.ino
                    node.entries[e.name] = f.ino
                    self._name_of[f.ino] = (node.ino, e.name)
                else:
                    raise TraceError(f"{e.path}: only files and directories are modelled")

        os.makedirs(self.root, exist_ok=True)
        scan(root, self.root)

    def dir_path(self, ino: int) -> str:
        """The current (volatile) path of a directory, relative to the root."""
        parts: list[str] = []
        seen: set[int] = set()
        node = self._inodes[ino]
        while node.ino != 0 and node.parent is not None and node.ino not in seen:
            seen.add(node.ino)
            parts.append(node.name)
            node = self._inodes[node.parent]
        return "/".join(reversed(parts)) or "."

    def _rel(self, parent: int, name: str) -> str:
        base = self.dir_path(parent)
        return name if base == "." else f"{base}/{name}"

    def _lookup(self, start: int, parts: list[str], lineno: int) -> int | None:
        """Walk `parts` from directory `start`; None if it leaves the store (``..``)."""
        cur = start
        for part in parts:
            if part in ("", "."):
                continue
            node = self._inodes[cur]
            if part == "..":
                if cur == 0:
                    return None
                cur = node.parent if node.parent is not None else 0
                continue
            child = node.entries.get(part)
            if child is None or not self._inodes[child].is_dir:
                raise TraceError(
                    f"trace line {lineno}: {self._rel(cur, part)} is not a directory in the "
                    "model, yet the syscall succeeded (the model diverged from the disk)"
                )
            cur = child
        return cur

    def _resolve(self, proc: _Proc, dirfd: str, raw: bytes, lineno: int) -> _Loc | str:
        """Where a path argument points: a _Loc inside the store, else its outside path."""
        path = os.fsdecode(raw)
        base_ino: int | None
        base_path: str | None
        if path.startswith("/"):
            base_ino, base_path = None, "/"
        elif dirfd.strip() == "AT_FDCWD":
            base_ino, base_path = proc.cwd.ino, proc.cwd.path
        else:
            of = self._fd(proc, _int(dirfd))
            base_ino, base_path = of.ino, of.path
        if base_ino is None:
            full = os.path.normpath(os.path.join(base_path or "/", path))
            if full == self.root:
                return _Loc(-1, "", 0, ".")
            if not full.startswith(self.root + "/"):
                return full
            rel = full[len(self.root) + 1 :]
            base_ino = 0
        else:
            rel = path
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not parts:
            return _Loc(-1, "", base_ino, self.dir_path(base_ino))
        parent = self._lookup(base_ino, parts[:-1], lineno)
        last = parts[-1]
        if parent is None or last == "..":
            # Leaves the store: rebuild the absolute path and resolve again from "/".
            where = self.root if base_ino == 0 else os.path.join(self.root, self.dir_path(base_ino))
            full = os.path.normpath(os.path.join(where, rel))
            if full == self.root or full.startswith(self.root + "/"):
                return self._resolve(proc, "AT_FDCWD", os.fsencode(full), lineno)
            return full
        return _Loc(parent, last, self._inodes[parent].entries.get(last), self._rel(parent, last))

    # -- processes and descriptors ------------------------------------------------------

    def _proc(self, tid: int) -> _Proc:
        proc = self._procs.get(tid)
        if proc is not None:
            return proc
        if self._cloning:
            parent_tid, flags = next(reversed(self._cloning.items()))
            proc = self._child_of(self._procs[parent_tid], flags)
        else:
            # The first process of a run: stdin/stdout/stderr are outside the store.
            fdt = _FdTable({fd: (_OpenFile(None), False) for fd in (0, 1, 2)})
            proc = _Proc(fdt, _Cwd(None, self._cwd))
        self._procs[tid] = proc
        return proc

    @staticmethod
    def _child_of(parent: _Proc, flags: str) -> _Proc:
        fdt = parent.fdt if "CLONE_FILES" in flags else _FdTable(dict(parent.fdt.fds))
        cwd = parent.cwd if "CLONE_FS" in flags else _Cwd(parent.cwd.ino, parent.cwd.path)
        return _Proc(fdt, cwd)

    def _fd(self, proc: _Proc, fd: int) -> _OpenFile:
        entry = proc.fdt.fds.get(fd)
        if entry is None:
            # Inherited from outside the traced tree (or opened before we looked).
            return _OpenFile(None)
        return entry[0]

    # -- events ----------------------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        self.events.append(ev)

    def _dir_op(self, syscall: str, changes: tuple[Change, ...], desc: str) -> None:
        assert self._run is not None
        src = changes[0][0]
        dst = changes[-1][0]
        self._emit(DirOp(len(self.events), syscall, changes, src, dst, desc, self._run.label))
        for d, name, ino in changes:
            node = self._inodes[d]
            old = node.entries.get(name)
            if old is not None and self._name_of.get(old) == (d, name):
                del self._name_of[old]
            if ino is None:
                node.entries.pop(name, None)
            else:
                node.entries[name] = ino
                child = self._inodes[ino]
                if child.is_dir:
                    child.parent, child.name = d, name
                else:
                    self._name_of[ino] = (d, name)

    def _data_op(
        self, ino: int, offset: int, data: bytes, truncate_to: int | None, desc: str
    ) -> None:
        assert self._run is not None
        self._emit(DataOp(len(self.events), ino, offset, data, truncate_to, desc, self._run.label))
        buf = self._inodes[ino].data
        if truncate_to is not None:
            if truncate_to < len(buf):
                del buf[truncate_to:]
            else:
                buf.extend(b"\0" * (truncate_to - len(buf)))
            return
        if offset > len(buf):
            buf.extend(b"\0" * (offset - len(buf)))
        buf[offset : offset + len(data)] = data

    def _file_desc(self, ino: int) -> str:
        where = self._name_of.get(ino)
        if where is None:
            return f"<inode {ino}, unlinked>"
        return self._rel(*where)

    # -- feeding -----------------------------------------------------------------------

    def feed(self, lines: Iterable[TraceLine], label: str, *, cwd: str | None = None) -> RunInfo:
        """Replay one traced run (its own processes; the directory carries over).

        `cwd` is the working directory the run started in (default: the repository).
        """
        run = RunInfo(label, len(self.events))
        self._cwd = cwd or str(REPO)
        self._run = run
        self._procs = {}
        self._cloning = {}
        self._stdout = {}
        for item in lines:
            if isinstance(item, ProcExit):
                if item.killed:
                    run.killed = True
                self._cloning.pop(item.tid, None)
                continue
            run.syscalls += 1
            if item.ret is None and not item.entry_only and item.name != "execve":
                run.killed = True  # it never returned: the process died inside it
            self._syscall(item)
        run.last_event = len(self.events) - 1
        self.runs.append(run)
        self._run = None
        return run

    def _count(self, sc: Syscall) -> int:
        assert self._run is not None
        key = (self._run.label, sc.tid, sc.name)
        n = self._nth.get(key, 0) + 1
        self._nth[key] = n
        self._run.sync_calls[sc.name] = self._run.sync_calls.get(sc.name, 0) + 1
        return n

    def _syscall(self, sc: Syscall) -> None:
        proc = self._proc(sc.tid)
        name = sc.name
        if sc.entry_only:
            self._cloning[sc.tid] = ",".join(sc.args)
            return
        if name in SYNC_SYSCALLS:
            nth = self._count(sc)
            if sc.ok:
                self._sync(proc, sc, nth)
            return
        if name in ("clone", "clone3", "fork", "vfork"):
            flags = ",".join(sc.args)
            self._cloning.pop(sc.tid, None)
            if sc.ok and sc.ret and sc.ret not in self._procs:
                self._procs[sc.ret] = self._child_of(proc, flags)
            return
        if name == "close":
            with contextlib.suppress(ValueError, IndexError):
                proc.fdt.fds.pop(_int(sc.args[0]), None)
            return
        if not sc.ok:
            return
        handler = _HANDLERS.get(name)
        if handler is not None:
            handler(self, proc, sc)

    # -- handlers ---------------------------------------------------------------------

    def _open(self, proc: _Proc, sc: Syscall, dirfd: str, path_tok: str, flags: set[str]) -> None:
        assert sc.ret is not None
        raw, _ = decode_string(path_tok)
        loc = self._resolve(proc, dirfd, raw, sc.line)
        cloexec = "O_CLOEXEC" in flags
        if isinstance(loc, str):
            proc.fdt.fds[sc.ret] = (_OpenFile(None, path=loc), cloexec)
            return
        if "O_TMPFILE" in flags or "__O_TMPFILE" in flags:
            raise TraceError(f"trace line {sc.line}: O_TMPFILE inside the store is not modelled")
        ino = loc.ino
        if ino is None:
            if "O_CREAT" not in flags:
                raise TraceError(f"trace line {sc.line}: {loc.path} opened but not in the model")
            node = self._new(False)
            ino = node.ino
            self._dir_op(sc.name, ((loc.parent, loc.name, ino),), f"create {loc.path}")
        elif (
            "O_TRUNC" in flags and not self._inodes[ino].is_dir and ({"O_WRONLY", "O_RDWR"} & flags)
        ):
            self._data_op(ino, 0, b"", 0, f"O_TRUNC {loc.path}")
        proc.fdt.fds[sc.ret] = (_OpenFile(ino, append="O_APPEND" in flags), cloexec)

    def _h_openat(self, proc: _Proc, sc: Syscall) -> None:
        self._open(proc, sc, sc.args[0], sc.args[1], _flags(sc.args[2]))

    def _h_open(self, proc: _Proc, sc: Syscall) -> None:
        self._open(proc, sc, "AT_FDCWD", sc.args[0], _flags(sc.args[1]))

    def _h_creat(self, proc: _Proc, sc: Syscall) -> None:
        self._open(proc, sc, "AT_FDCWD", sc.args[0], {"O_CREAT", "O_WRONLY", "O_TRUNC"})

    def _h_dup(self, proc: _Proc, sc: Syscall) -> None:
        assert sc.ret is not None
        of = self._fd(proc, _int(sc.args[0]))
        cloexec = sc.name == "dup3" and "O_CLOEXEC" in sc.args[2]
        proc.fdt.fds[sc.ret] = (of, cloexec)

    def _h_fcntl(self, proc: _Proc, sc: Syscall) -> None:
        assert sc.ret is not None
        cmd = sc.args[1].strip()
        fd = _int(sc.args[0])
        if cmd in ("F_DUPFD", "F_DUPFD_CLOEXEC"):
            proc.fdt.fds[sc.ret] = (self._fd(proc, fd), cmd == "F_DUPFD_CLOEXEC")
        elif cmd == "F_SETFD" and fd in proc.fdt.fds:
            proc.fdt.fds[fd] = (proc.fdt.fds[fd][0], "FD_CLOEXEC" in sc.args[2])

    def _h_close_range(self, proc: _Proc, sc: Syscall) -> None:
        first, last = _int(sc.args[0]), _int(sc.args[1])
        only_cloexec = "CLOSE_RANGE_CLOEXEC" in sc.args[2]
        for fd in [fd for fd in proc.fdt.fds if first <= fd <= last]:
            if only_cloexec:
                proc.fdt.fds[fd] = (proc.fdt.fds[fd][0], True)
            else:
                del proc.fdt.fds[fd]

    def _h_execve(self, proc: _Proc, sc: Syscall) -> None:
        for fd in [fd for fd, (_, cloexec) in proc.fdt.fds.items() if cloexec]:
            del proc.fdt.fds[fd]

    def _h_read(self, proc: _Proc, sc: Syscall) -> None:
        assert sc.ret is not None
        self._fd(proc, _int(sc.args[0])).offset += sc.ret

    def _h_lseek(self, proc: _Proc, sc: Syscall) -> None:
        assert sc.ret is not None
        self._fd(proc, _int(sc.args[0])).offset = sc.ret

    def _write_at(self, proc: _Proc, sc: Syscall, fd: int, data: bytes, offset: int | None) -> None:
        """A write of `data` (already cut to the return value); offset None: the fd's."""
        of = self._fd(proc, fd)
        if of.ino is None:
            if fd == 1:
                self._stdout_write(sc.tid, data)
            return
        node = self._inodes[of.ino]
        if node.is_dir:
            raise TraceError(f"trace line {sc.line}: write to a directory")
        if offset is None:
            at = len(node.data) if of.append else of.offset
            of.offset = at + len(data)
        else:
            at = offset
        self._data_op(of.ino, at, data, None, self._file_desc(of.ino))

    def _checked(self, sc: Syscall, tok: str) -> bytes:
        assert sc.ret is not None
        data, truncated = decode_string(tok)
        if len(data) < sc.ret:
            raise TraceError(
                f"trace line {sc.line}: strace printed {len(data)} of {sc.ret} written bytes "
                f"(truncated={truncated}); raise the string limit"
            )
        return data[: sc.ret]

    def _iov(self, sc: Syscall, tok: str) -> bytes:
        assert sc.ret is not None
        chunks: list[bytes] = []
        for m in _IOV_RE.finditer(tok):
            data, truncated = decode_string(f'"{m.group(1)}"' + (m.group(2) or ""))
            chunks.append(data)
            if truncated:
                break
        data = b"".join(chunks)
        if len(data) < sc.ret:
            raise TraceError(
                f"trace line {sc.line}: strace printed {len(data)} of {sc.ret} bytes of an "
                "iovec; raise the string limit"
            )
        return data[: sc.ret]

    def _h_write(self, proc: _Proc, sc: Syscall) -> None:
        self._write_at(proc, sc, _int(sc.args[0]), self._checked(sc, sc.args[1]), None)

    def _h_pwrite64(self, proc: _Proc, sc: Syscall) -> None:
        self._write_at(proc, sc, _int(sc.args[0]), self._checked(sc, sc.args[1]), _int(sc.args[3]))

    def _h_writev(self, proc: _Proc, sc: Syscall) -> None:
        offset: int | None = None
        if sc.name in ("pwritev", "pwritev2"):
            off = _int(sc.args[3])
            offset = None if off == -1 else off
        self._write_at(proc, sc, _int(sc.args[0]), self._iov(sc, sc.args[1]), offset)

    def _h_ftruncate(self, proc: _Proc, sc: Syscall) -> None:
        of = self._fd(proc, _int(sc.args[0]))
        if of.ino is not None:
            self._data_op(of.ino, 0, b"", _int(sc.args[1]), self._file_desc(of.ino))

    def _h_truncate(self, proc: _Proc, sc: Syscall) -> None:
        loc = self._resolve(proc, "AT_FDCWD", decode_string(sc.args[0])[0], sc.line)
        if isinstance(loc, _Loc) and loc.ino is not None:
            self._data_op(loc.ino, 0, b"", _int(sc.args[1]), loc.path)

    def _h_fallocate(self, proc: _Proc, sc: Syscall) -> None:
        of = self._fd(proc, _int(sc.args[0]))
        if of.ino is None:
            return
        mode = sc.args[1].strip()
        if "KEEP_SIZE" in mode:
            return
        if mode not in ("0", "FALLOC_FL_ZERO_RANGE"):
            raise TraceError(f"trace line {sc.line}: fallocate mode {mode} is not modelled")
        end = _int(sc.args[2]) + _int(sc.args[3])
        if mode == "0" and end <= len(self._inodes[of.ino].data):
            return
        if mode == "FALLOC_FL_ZERO_RANGE":
            off = _int(sc.args[2])
            self._data_op(of.ino, off, b"\0" * (end - off), None, self._file_desc(of.ino))
            return
        self._data_op(of.ino, 0, b"", end, self._file_desc(of.ino))

    def _h_copy(self, proc: _Proc, sc: Syscall) -> None:
        """sendfile(out, in, off, n) / copy_file_range(in, off_in, out, off_out, n, flags)."""
        assert sc.ret is not None
        if sc.name == "sendfile":
            out_fd, in_fd, in_off, out_off = _int(sc.args[0]), _int(sc.args[1]), sc.args[2], "NULL"
        else:
            in_fd, in_off, out_fd, out_off = (
                _int(sc.args[0]),
                sc.args[1],
                _int(sc.args[2]),
                sc.args[3],
            )
        dst = self._fd(proc, out_fd)
        if dst.ino is None:
            src = self._fd(proc, in_fd)
            if in_off.strip() == "NULL":
                src.offset += sc.ret
            return
        src = self._fd(proc, in_fd)
        if src.ino is None:
            raise TraceError(f"trace line {sc.line}: {sc.name} into the store from outside it")
        start = src.offset if in_off.strip() == "NULL" else _int(in_off.split("=>")[0])
        data = bytes(self._inodes[src.ino].data[start : start + sc.ret])
        if in_off.strip() == "NULL":
            src.offset += sc.ret
        offset = None if out_off.strip() == "NULL" else _int(out_off.split("=>")[0])
        self._write_at(proc, sc, out_fd, data, offset)

    def _loc(self, proc: _Proc, sc: Syscall, dirfd: str, tok: str) -> _Loc | str:
        return self._resolve(proc, dirfd, decode_string(tok)[0], sc.line)

    def _h_mkdir(self, proc: _Proc, sc: Syscall) -> None:
        dirfd, tok = (sc.args[0], sc.args[1]) if sc.name == "mkdirat" else ("AT_FDCWD", sc.args[0])
        loc = self._loc(proc, sc, dirfd, tok)
        if isinstance(loc, str):
            return
        if loc.parent < 0:
            return  # the root itself (it exists before every run)
        node = self._new(True, loc.parent, loc.name)
        self._dir_op(sc.name, ((loc.parent, loc.name, node.ino),), f"mkdir {loc.path}")

    def _h_unlink(self, proc: _Proc, sc: Syscall) -> None:
        if sc.name == "unlinkat":
            dirfd, tok = sc.args[0], sc.args[1]
        else:
            dirfd, tok = "AT_FDCWD", sc.args[0]
        loc = self._loc(proc, sc, dirfd, tok)
        if isinstance(loc, str):
            return
        if loc.parent < 0:
            raise TraceError(f"trace line {sc.line}: the store root itself was removed")
        verb = "rmdir" if sc.name == "rmdir" or "AT_REMOVEDIR" in sc.args[-1] else "unlink"
        self._dir_op(sc.name, ((loc.parent, loc.name, None),), f"{verb} {loc.path}")

    def _h_rename(self, proc: _Proc, sc: Syscall) -> None:
        if sc.name == "rename":
            src = self._loc(proc, sc, "AT_FDCWD", sc.args[0])
            dst = self._loc(proc, sc, "AT_FDCWD", sc.args[1])
            flags = ""
        else:
            src = self._loc(proc, sc, sc.args[0], sc.args[1])
            dst = self._loc(proc, sc, sc.args[2], sc.args[3])
            flags = sc.args[4] if sc.name == "renameat2" else ""
        if isinstance(src, str) and isinstance(dst, str):
            return
        if isinstance(src, str) or isinstance(dst, str):
            raise TraceError(f"trace line {sc.line}: a rename across the store boundary")
        if src.ino is None or src.parent < 0 or dst.parent < 0:
            raise TraceError(f"trace line {sc.line}: rename of {src.path} not in the model")
        if (src.parent, src.name) == (dst.parent, dst.name):
            return
        desc = f"rename {src.path} -> {dst.path}"
        changes: tuple[Change, ...]
        if "RENAME_EXCHANGE" in flags:
            if dst.ino is None:
                raise TraceError(f"trace line {sc.line}: exchange with a missing name")
            changes = ((src.parent, src.name, dst.ino), (dst.parent, dst.name, src.ino))
            desc = f"exchange {src.path} <-> {dst.path}"
        else:
            changes = ((src.parent, src.name, None), (dst.parent, dst.name, src.ino))
        self._dir_op(sc.name, changes, desc)

    def _h_link(self, proc: _Proc, sc: Syscall) -> None:
        if sc.name == "link":
            src = self._loc(proc, sc, "AT_FDCWD", sc.args[0])
            dst = self._loc(proc, sc, "AT_FDCWD", sc.args[1])
        else:
            if "AT_EMPTY_PATH" in sc.args[4] and decode_string(sc.args[1])[0] == b"":
                of = self._fd(proc, _int(sc.args[0]))
                src = _Loc(-1, "", of.ino, "<fd>") if of.ino is not None else "outside"
            else:
                src = self._loc(proc, sc, sc.args[0], sc.args[1])
            dst = self._loc(proc, sc, sc.args[2], sc.args[3])
        if isinstance(dst, str):
            return
        if isinstance(src, str) or src.ino is None:
            raise TraceError(f"trace line {sc.line}: link into the store from outside it")
        self._dir_op(sc.name, ((dst.parent, dst.name, src.ino),), f"link {src.path} -> {dst.path}")

    def _h_symlink(self, proc: _Proc, sc: Syscall) -> None:
        if sc.name == "symlinkat":
            loc = self._loc(proc, sc, sc.args[1], sc.args[2])
        else:
            loc = self._loc(proc, sc, "AT_FDCWD", sc.args[1])
        if isinstance(loc, _Loc):
            raise TraceError(f"trace line {sc.line}: symlink inside the store is not modelled")

    def _h_chdir(self, proc: _Proc, sc: Syscall) -> None:
        if sc.name == "fchdir":
            of = self._fd(proc, _int(sc.args[0]))
            proc.cwd.ino, proc.cwd.path = of.ino, of.path
            return
        loc = self._loc(proc, sc, "AT_FDCWD", sc.args[0])
        if isinstance(loc, str):
            proc.cwd.ino, proc.cwd.path = None, loc
        else:
            proc.cwd.ino, proc.cwd.path = loc.ino, None

    def _sync(self, proc: _Proc, sc: Syscall, nth: int) -> None:
        assert self._run is not None
        if sc.name == "sync_file_range":
            return  # promises nothing about durability
        if sc.name == "sync":
            ino: int | None = None
        else:
            of = self._fd(proc, _int(sc.args[0]))
            if of.ino is None:
                return
            ino = None if sc.name == "syncfs" else of.ino
        is_dir = ino is not None and self._inodes[ino].is_dir
        if ino is None:
            desc = "(everything)"
        elif is_dir:
            desc = self.dir_path(ino) + "/"
        else:
            desc = self._file_desc(ino)
        self._run.store_syncs += 1
        self._emit(
            SyncOp(len(self.events), sc.name, ino, is_dir, sc.tid, nth, desc, self._run.label)
        )

    def _stdout_write(self, tid: int, data: bytes) -> None:
        assert self._run is not None
        buf = self._stdout.setdefault(tid, bytearray())
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            kind, _, payload = line.decode("utf-8", "replace").partition(" ")
            if kind not in MARKER_KINDS:
                continue
            try:
                value = json.loads(payload) if payload.strip() else {}
            except json.JSONDecodeError as exc:
                raise TraceError(f"bad {kind} line from the writer: {line[:200]!r}") from exc
            self._emit(Marker(len(self.events), kind, value, self._run.label, tid))

    # -- results ----------------------------------------------------------------------

    def compare_with_disk(self, path: Path | None = None) -> list[str]:
        """Differences between the model's current namespace and the real directory."""
        real_root = Path(path or self.root)
        problems: list[str] = []

        def walk(ino: int, where: Path, rel: str) -> None:
            node = self._inodes[ino]
            try:
                real = {e.name: e for e in os.scandir(where)}
            except OSError as exc:
                problems.append(f"{rel or '.'}: cannot list ({exc})")
                return
            for name in sorted(set(real) | set(node.entries)):
                sub = f"{rel}/{name}" if rel else name
                if name not in node.entries:
                    problems.append(f"{sub}: on disk, not in the model")
                    continue
                if name not in real:
                    problems.append(f"{sub}: in the model, not on disk")
                    continue
                child = self._inodes[node.entries[name]]
                entry = real[name]
                if child.is_dir != entry.is_dir(follow_symlinks=False):
                    problems.append(f"{sub}: file/directory mismatch")
                elif child.is_dir:
                    walk(child.ino, Path(entry.path), sub)
                else:
                    with open(entry.path, "rb") as fh:
                        data = fh.read()
                    if data != bytes(child.data):
                        problems.append(
                            f"{sub}: content differs (model {len(child.data)} B, "
                            f"disk {len(data)} B)"
                        )

        walk(0, real_root, "")
        return problems

    def finish(self) -> Trace:
        """The trace with the durability of every op under the model's rename rule."""
        return Trace(
            root=self.root,
            events=list(self.events),
            is_dir={i.ino: i.is_dir for i in self._inodes.values()},
            initial_entries={k: dict(v) for k, v in self.initial_entries.items()},
            initial_data=dict(self.initial_data),
            runs=list(self.runs),
            rename_rule=self.rename_rule,
            durable_at=compute_durability(self.events, self.rename_rule),
        )


_Handler = Callable[[TraceModel, _Proc, Syscall], None]
_HANDLERS: dict[str, _Handler] = {
    "openat": TraceModel._h_openat,
    "open": TraceModel._h_open,
    "creat": TraceModel._h_creat,
    "dup": TraceModel._h_dup,
    "dup2": TraceModel._h_dup,
    "dup3": TraceModel._h_dup,
    "fcntl": TraceModel._h_fcntl,
    "close_range": TraceModel._h_close_range,
    "execve": TraceModel._h_execve,
    "read": TraceModel._h_read,
    "readv": TraceModel._h_read,
    "lseek": TraceModel._h_lseek,
    "write": TraceModel._h_write,
    "pwrite64": TraceModel._h_pwrite64,
    "writev": TraceModel._h_writev,
    "pwritev": TraceModel._h_writev,
    "pwritev2": TraceModel._h_writev,
    "ftruncate": TraceModel._h_ftruncate,
    "truncate": TraceModel._h_truncate,
    "fallocate": TraceModel._h_fallocate,
    "sendfile": TraceModel._h_copy,
    "copy_file_range": TraceModel._h_copy,
    "mkdir": TraceModel._h_mkdir,
    "mkdirat": TraceModel._h_mkdir,
    "unlink": TraceModel._h_unlink,
    "unlinkat": TraceModel._h_unlink,
    "rmdir": TraceModel._h_unlink,
    "rename": TraceModel._h_rename,
    "renameat": TraceModel._h_rename,
    "renameat2": TraceModel._h_rename,
    "link": TraceModel._h_link,
    "linkat": TraceModel._h_link,
    "symlink": TraceModel._h_symlink,
    "symlinkat": TraceModel._h_symlink,
    "chdir": TraceModel._h_chdir,
    "fchdir": TraceModel._h_chdir,
}


def compute_durability(events: Sequence[Event], rule: RenameRule) -> dict[int, int]:
    """For each dir/data op, the index of the first sync event that makes it durable."""
    syncs_of: dict[int, list[int]] = {}
    global_syncs: list[int] = []
    for ev in events:
        if isinstance(ev, SyncOp):
            if ev.ino is None:
                global_syncs.append(ev.index)
            else:
                syncs_of.setdefault(ev.ino, []).append(ev.index)

    def first_after(ino: int, index: int) -> float:
        best: float = float("inf")
        for syncs in (syncs_of.get(ino, []), global_syncs):
            i = bisect.bisect_right(syncs, index)
            if i < len(syncs):
                best = min(best, syncs[i])
        return best

    out: dict[int, int] = {}
    for ev in events:
        at: float
        if isinstance(ev, DataOp):
            at = first_after(ev.ino, ev.index)
        elif isinstance(ev, DirOp):
            src, dst = first_after(ev.src_dir, ev.index), first_after(ev.dst_dir, ev.index)
            if ev.src_dir == ev.dst_dir:
                at = dst
            elif rule == "either":
                at = min(src, dst)
            elif rule == "both":
                at = max(src, dst)
            else:
                at = dst
        else:
            continue
        if at != float("inf"):
            out[ev.index] = int(at)
    return out


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class SessionState:
    """What a session holds, compactly: a digest plus enough to explain a difference."""

    digest: str
    loops: int
    tail: tuple[str, ...]
    header: str

    def to_json(self) -> dict[str, Any]:
        return {"d": self.digest, "n": self.loops, "t": list(self.tail), "h": self.header}

    @classmethod
    def from_json(cls, data: Any) -> SessionState | None:
        if data is None:
            return None
        return cls(str(data["d"]), int(data["n"]), tuple(data["t"]), str(data["h"]))

    def describe(self) -> str:
        return f"{self.loops} loops (last {', '.join(self.tail) or '-'}; header {self.header})"


def describe_state(state: SessionState | None) -> str:
    return "absent" if state is None else state.describe()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def loop_digest(loop: LoopRecord) -> str:
    """Digest of a loop's phi-core JSON (what a reload must give back exactly)."""
    return _sha(loop.model_dump_json().encode())[:20]


def header_digest(header: Mapping[str, Any]) -> str:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _sha(text.encode())[:20]


@dataclass
class ModelSession:
    """A session as a header plus (loop_id, digest, started_at) triples: cheap to update."""

    header: dict[str, Any]
    loops: list[tuple[str, str, str | None]]

    @classmethod
    def of(cls, session: Session) -> ModelSession:
        return cls(
            dict(session.header()),
            [(lp.loop_id, loop_digest(lp), lp.started_at) for lp in session.loops],
        )

    def copy(self) -> ModelSession:
        return ModelSession(dict(self.header), list(self.loops))

    def state(self) -> SessionState:
        hd = header_digest(self.header)
        text = hd + ";" + ";".join(f"{lid}={d}" for lid, d, _ in self.loops)
        return SessionState(
            _sha(text.encode())[:24],
            len(self.loops),
            tuple(f"{lid}#{d[:6]}" for lid, d, _ in self.loops[-3:]),
            hd[:8],
        )


def state_of(session: Session | None) -> SessionState | None:
    return None if session is None else ModelSession.of(session).state()


def _later(a: Any, b: str | None) -> bool:
    """True if timestamp `b` is strictly later than `a` (nanosecond exact)."""
    from loopstore.models import timestamp_nanos

    if not isinstance(a, str) or not b:
        return False
    try:
        return timestamp_nanos(b) > timestamp_nanos(a)
    except ValueError:
        return False


def first_loop_header(session_id: str, loop: LoopRecord) -> dict[str, Any]:
    """The header a new session gets from its first loop (documented by append_loop)."""
    from loopstore.models import Session, SessionFormation

    return Session(
        session_id=session_id,
        agent_id=loop.agent_id,
        created_at=loop.started_at,
        last_active_at=loop.started_at,
        formation=SessionFormation.first_loop(loop.started_at),
        parent_spawn_ref=None,
        loops=[],
    ).header()


def predict_append(
    before: ModelSession | None,
    session_id: str,
    loop: LoopRecord,
    session: Session | None = None,
) -> ModelSession:
    """The session after ``append_loop(session_id, loop, session=session)`` returns.

    Appends, or replaces in place the loop with the same id; a new loop that started
    later than the header's ``last_active_at`` moves it on; a new session takes the header
    of `session`, else the first-loop header (README "The store", append_loop docstring).
    """
    entry = (loop.loop_id, loop_digest(loop), loop.started_at)
    if before is None:
        header = (
            dict(session.header()) if session is not None else first_loop_header(session_id, loop)
        )
        after = ModelSession(header, [entry])
        if _later(header.get("last_active_at"), loop.started_at):
            after.header["last_active_at"] = loop.started_at
        return after
    after = before.copy()
    for i, (lid, _, _) in enumerate(after.loops):
        if lid == loop.loop_id:
            after.loops[i] = entry
            return after
    after.loops.append(entry)
    if _later(after.header.get("last_active_at"), loop.started_at):
        after.header["last_active_at"] = loop.started_at
    return after


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expectation:
    """What a crash state must hold, from the writers' markers seen so far."""

    allowed: tuple[tuple[str, tuple[SessionState | None, ...]], ...]
    acked: int
    in_flight: tuple[str, ...]

    def allowed_for(self, sid: str) -> tuple[SessionState | None, ...]:
        for s, states in self.allowed:
            if s == sid:
                return states
        return (None,)


@dataclass
class _Call:
    key: tuple[str, int]
    sid: str
    after: SessionState | None
    begin: int
    desc: str


class ExpectationTracker:
    """Follows BEGIN/ACK markers: per session, the last acknowledged state plus in-flight.

    An ACK of a call on session S makes its predicted state the acknowledged one and
    retires the in-flight calls on S that began before it (a killed writer's call is
    superseded by a later writer that observed its outcome and acknowledged on top).
    """

    def __init__(self, initial: Mapping[str, SessionState | None]) -> None:
        self.acked_state: dict[str, SessionState | None] = dict(initial)
        self.in_flight: dict[tuple[str, int], _Call] = {}
        self.acked = 0
        self.failures: list[str] = []
        self.mismatches: list[str] = []

    def feed(self, m: Marker) -> None:
        p = m.payload
        if m.kind == "BEGIN" and "sid" in p and "after" in p:
            key = (str(p.get("w", m.run)), int(p["n"]))
            desc = f"{key[0]}#{key[1]} {p.get('call', '?')}({p['sid']}) {p.get('desc', '')}"
            self.in_flight[key] = _Call(
                key, str(p["sid"]), SessionState.from_json(p["after"]), m.index, desc.strip()
            )
            self.acked_state.setdefault(str(p["sid"]), None)
        elif m.kind == "ACK":
            key = (str(p.get("w", m.run)), int(p["n"]))
            call = self.in_flight.pop(key, None)
            if call is None:
                return
            self.acked += 1
            self.acked_state[call.sid] = call.after
            for k, c in list(self.in_flight.items()):
                if c.sid == call.sid and c.begin < call.begin:
                    del self.in_flight[k]
        elif m.kind == "FAIL":
            self.failures.append(f"[{m.run}] call failed: {json.dumps(dict(p))[:300]}")
        elif m.kind == "MISMATCH":
            self.mismatches.append(f"[{m.run}] read-back differs: {json.dumps(dict(p))[:400]}")

    def expectation(self) -> Expectation:
        allowed: list[tuple[str, tuple[SessionState | None, ...]]] = []
        for sid in sorted(self.acked_state):
            states: list[SessionState | None] = [self.acked_state[sid]]
            for c in self.in_flight.values():
                if c.sid == sid and c.after not in states:
                    states.append(c.after)
            allowed.append((sid, tuple(states)))
        return Expectation(
            tuple(allowed), self.acked, tuple(c.desc for c in self.in_flight.values())
        )


# --------------------------------------------------------------------------- crash states


DataChoice = tuple[tuple[int, int, Torn | None], ...]
"""Per inode with pending data: (inode, number of its ops applied, torn last op or None)."""


@dataclass(frozen=True)
class CrashState:
    point: int
    """The first `point` events happened; the power went out before event `point`."""
    dir_ops: frozenset[int]
    """Indexes of the pending directory ops that reached the disk."""
    data: DataChoice
    """Per inode with pending data: how much of it reached the disk (others: none)."""
    label: str


@dataclass(frozen=True)
class BuiltState:
    """A crash state's directory tree: relative path -> file bytes (None: a directory)."""

    tree: Mapping[str, bytes | None]
    key: str

    def materialize(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for rel in sorted(self.tree, key=lambda r: (r.count("/"), r)):
            data = self.tree[rel]
            target = dest / rel
            if data is None:
                target.mkdir(exist_ok=True)
            else:
                target.write_bytes(data)


@dataclass(frozen=True)
class Budget:
    """How many crash points and states per point to generate."""

    mode: Mode = "short"
    max_points: int | None = 30
    """Crash points (None: every one); the end always, then a sample that favours the
    points right after an ACK, right before a sync and right after a rename."""
    exhaustive_dir_ops: int = 8
    """All subsets of the pending directory ops when there are at most this many (long)."""
    short_exhaustive_dir_ops: int = 3
    random_dir_subsets: int = 24
    """Seeded random subsets beyond prefixes and single omissions (long mode)."""
    max_states_per_point: int | None = 8
    """Short mode: at most this many states per crash point (seeded sample, extremes kept)."""
    max_family: int | None = 64
    """Beyond the exhaustive threshold: at most this many prefixes, single omissions and
    single inclusions each (evenly spaced, first and last kept); None: all of them."""
    max_checks: int | None = None
    """At most this many distinct states checked per scenario: the extremes of every
    crash point first ("nothing pending", "everything"), then a seeded sample of the rest."""

    @classmethod
    def short(cls) -> Budget:
        return cls()

    def tighter(self, other: Budget) -> Budget:
        """The smaller of two budgets, field by field (the mode stays this one's)."""

        def least(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return dataclasses.replace(
            self,
            max_points=least(self.max_points, other.max_points),
            max_states_per_point=least(self.max_states_per_point, other.max_states_per_point),
            max_family=least(self.max_family, other.max_family),
            max_checks=least(self.max_checks, other.max_checks),
            short_exhaustive_dir_ops=min(
                self.short_exhaustive_dir_ops, other.short_exhaustive_dir_ops
            ),
        )

    @classmethod
    def long(cls) -> Budget:
        return cls(mode="long", max_points=None, max_states_per_point=None)


def _spread(items: Sequence[int], limit: int | None) -> list[int]:
    """`items`, or `limit` of them evenly spaced (first and last kept)."""
    if limit is None or len(items) <= limit:
        return list(items)
    if limit <= 1:
        return [items[-1]]
    step = (len(items) - 1) / (limit - 1)
    return sorted({items[round(i * step)] for i in range(limit)})


class CrashEnumerator:
    """Crash points and crash states of a `Trace` under its persistence model."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.dir_ops: list[DirOp] = [e for e in trace.events if isinstance(e, DirOp)]
        self.data_ops: dict[int, list[DataOp]] = {}
        for e in trace.events:
            if isinstance(e, DataOp):
                self.data_ops.setdefault(e.ino, []).append(e)
        self._by_entry: dict[tuple[int, str], list[DirOp]] = {}
        for op in self.dir_ops:
            for d, name, _ in op.changes:
                self._by_entry.setdefault((d, name), []).append(op)
        self._content_cache: dict[tuple[int, int, Torn | None], tuple[bytes, str]] = {}

    # -- durability at a point -----------------------------------------------------------

    def _durable(self, index: int, point: int) -> bool:
        at = self.trace.durable_at.get(index)
        return at is not None and at < point

    def pending_dir_ops(self, point: int, *, prune: bool = True) -> list[DirOp]:
        """Directory ops that happened before `point` and are not yet durable there.

        With `prune`, ops whose every change is overwritten by a later durable op on the
        same entry are dropped: applying them or not gives the same tree.
        """
        out: list[DirOp] = []
        for op in self.dir_ops:
            if op.index >= point:
                break
            if self._durable(op.index, point):
                continue
            if prune and all(
                any(
                    later.index > op.index
                    and later.index < point
                    and self._durable(later.index, point)
                    for later in self._by_entry[(d, name)]
                )
                for d, name, _ in op.changes
            ):
                continue
            out.append(op)
        return out

    def pending_data(self, point: int) -> dict[int, tuple[int, int]]:
        """Per inode: (ops durable at `point`, ops that happened before `point`), if they differ."""
        out: dict[int, tuple[int, int]] = {}
        for ino, ops in self.data_ops.items():
            happened = 0
            durable = 0
            for op in ops:
                if op.index >= point:
                    break
                happened += 1
                if self._durable(op.index, point):
                    durable = happened
            if happened > durable:
                out[ino] = (durable, happened)
        return out

    # -- choosing points and states -------------------------------------------------------

    def points(self, budget: Budget, rng: random.Random) -> list[int]:
        """Crash points: every point (long), or the telling ones plus a sample (short).

        The end of the trace comes first: every acknowledgement has happened there, so it
        is where a lost acknowledged write shows first.
        """
        n = len(self.trace.events)
        if budget.max_points is None:
            return [n, *range(n)]
        after_ack = [
            e.index + 1 for e in self.trace.events if isinstance(e, Marker) and e.kind == "ACK"
        ]
        before_sync = [e.index for e in self.trace.events if isinstance(e, SyncOp)]
        before_rename = [
            e.index + 1 for e in self.trace.events if isinstance(e, DirOp) and len(e.changes) > 1
        ]
        chosen: list[int] = [n]
        pools = [after_ack, before_sync, before_rename, list(range(1, n))]
        for pool in pools:
            candidates = [p for p in pool if p not in chosen]
            room = budget.max_points - len(chosen)
            if room <= 0:
                break
            share = room if pool is pools[-1] else max(1, room * 2 // 3)
            if len(candidates) > share:
                candidates = sorted(rng.sample(candidates, share))
            chosen.extend(candidates)
        return [n, *sorted(set(chosen) - {n})]

    def _dir_subsets(
        self, pending: list[DirOp], budget: Budget, rng: random.Random
    ) -> list[tuple[frozenset[int], str]]:
        idx = [op.index for op in pending]
        m = len(idx)
        limit = (
            budget.exhaustive_dir_ops if budget.mode == "long" else budget.short_exhaustive_dir_ops
        )
        out: list[tuple[frozenset[int], str]] = [
            (frozenset(), "no pending dir op"),
            (frozenset(idx), "every pending dir op"),
        ]
        if m <= limit:
            for r in range(1, m):
                for combo in itertools.combinations(idx, r):
                    out.append((frozenset(combo), f"dir ops {list(combo)}"))
            return out
        for k in _spread(range(1, m), budget.max_family):
            out.append((frozenset(idx[:k]), f"first {k} pending dir ops"))
        for i in _spread(idx, budget.max_family):
            out.append((frozenset(idx) - {i}, f"all pending dir ops but #{i}"))
        for i in _spread(idx, budget.max_family):
            out.append((frozenset({i}), f"only pending dir op #{i}"))
        for _ in range(budget.random_dir_subsets):
            pick = frozenset(i for i in idx if rng.random() < 0.5)
            out.append((pick, f"random subset of {len(pick)}/{m} pending dir ops"))
        return out

    def _data_variants(
        self, pending: dict[int, tuple[int, int]], budget: Budget
    ) -> list[tuple[DataChoice, str]]:
        """Per-inode variants (others keep all their pending data)."""
        full = tuple((ino, hi, None) for ino, (_, hi) in sorted(pending.items()))
        out: list[tuple[DataChoice, str]] = []
        for ino, (lo, hi) in sorted(pending.items()):
            others = tuple(c for c in full if c[0] != ino)
            ops = self.data_ops[ino]
            for k in range(lo, hi + 1):
                if k == hi:
                    continue  # that is the 'all' state
                out.append(((*others, (ino, k, None)), f"inode {ino}: {k - lo}/{hi - lo} pending"))
            torn_at = range(lo + 1, hi + 1) if budget.mode == "long" else range(hi, hi + 1)
            kinds: tuple[Torn, ...] = ("half", "zero")
            for k in torn_at:
                if ops[k - 1].truncate_to is None and ops[k - 1].data:
                    for torn in kinds:
                        out.append(
                            (
                                (*others, (ino, k, torn)),
                                f"inode {ino}: {k - lo}/{hi - lo} pending, last torn ({torn})",
                            )
                        )
        return out

    def states(self, point: int, budget: Budget, rng: random.Random) -> list[CrashState]:
        """The crash states at `point`: the two extremes first ("nothing pending reached
        the disk", "everything did"), then each subset of the pending directory ops with
        all / none of the pending data, then each per-inode data variant (prefixes, torn
        last write) with all / none of the pending directory ops."""
        pending = self.pending_dir_ops(point)
        pdata = self.pending_data(point)
        subsets = self._dir_subsets(pending, budget, rng)
        all_data: DataChoice = tuple((ino, hi, None) for ino, (_, hi) in sorted(pdata.items()))
        no_data: DataChoice = tuple((ino, lo, None) for ino, (lo, _) in sorted(pdata.items()))
        out: list[CrashState] = []
        seen: set[tuple[frozenset[int], DataChoice]] = set()

        def add(ops: frozenset[int], data: DataChoice, label: str) -> None:
            if (ops, data) not in seen:
                seen.add((ops, data))
                out.append(CrashState(point, ops, data, label))

        everything = subsets[1][0]
        add(frozenset(), no_data, "nothing pending reached the disk")
        add(everything, all_data, "everything reached the disk")
        for ops, label in subsets:
            add(ops, all_data, label + (", all pending data" if pdata else ""))
            if pdata:
                add(ops, no_data, label + ", no pending data")
        for data, label in self._data_variants(pdata, budget):
            add(everything, data, "every pending dir op, " + label)
            add(frozenset(), data, "no pending dir op, " + label)
        cap = budget.max_states_per_point
        if budget.mode == "short" and cap is not None and len(out) > cap:
            head, rest = out[:2], out[2:]
            out = head + rng.sample(rest, max(0, cap - 2))
        return out

    # -- building ---------------------------------------------------------------------------

    def _content(self, ino: int, applied: int, torn: Torn | None) -> tuple[bytes, str]:
        key = (ino, applied, torn)
        hit = self._content_cache.get(key)
        if hit is not None:
            return hit
        buf = bytearray(self.trace.initial_data.get(ino, b""))
        ops = self.data_ops.get(ino, [])
        for i, op in enumerate(ops[:applied]):
            if op.truncate_to is not None:
                if op.truncate_to < len(buf):
                    del buf[op.truncate_to :]
                else:
                    buf.extend(b"\0" * (op.truncate_to - len(buf)))
                continue
            data = op.data
            if torn is not None and i == applied - 1:
                data = data[: len(data) // 2] if torn == "half" else b"\0" * len(data)
            if op.offset > len(buf):
                buf.extend(b"\0" * (op.offset - len(buf)))
            buf[op.offset : op.offset + len(data)] = data
        out = (bytes(buf), hashlib.sha1(buf).hexdigest())
        if len(self._content_cache) > 4096:
            self._content_cache.clear()
        self._content_cache[key] = out
        return out

    def build(self, state: CrashState) -> BuiltState:
        point = state.point
        entries = {d: dict(e) for d, e in self.trace.initial_entries.items()}
        for op in self.dir_ops:
            if op.index >= point:
                break
            if op.index in state.dir_ops or self._durable(op.index, point):
                for d, name, ino in op.changes:
                    slot = entries.setdefault(d, {})
                    if ino is None:
                        slot.pop(name, None)
                    else:
                        slot[name] = ino
        chosen = {ino: (k, torn) for ino, k, torn in state.data}
        tree: dict[str, bytes | None] = {}
        parts: list[str] = []
        visited: set[int] = {0}

        def walk(d: int, rel: str) -> None:
            for name in sorted(entries.get(d, {})):
                ino = entries[d][name]
                sub = f"{rel}/{name}" if rel else name
                if self.trace.is_dir.get(ino, False):
                    if ino in visited:
                        continue
                    visited.add(ino)
                    tree[sub] = None
                    parts.append(f"{sub}\0D")
                    walk(ino, sub)
                else:
                    if ino in chosen:
                        k, torn = chosen[ino]
                    else:
                        k, torn = self._durable_count(ino, point), None
                    data, digest = self._content(ino, k, torn)
                    tree[sub] = data
                    parts.append(f"{sub}\0F{digest}")

        walk(0, "")
        key = hashlib.sha1("\n".join(parts).encode()).hexdigest()
        return BuiltState(tree, key)

    def _durable_count(self, ino: int, point: int) -> int:
        n = 0
        for i, op in enumerate(self.data_ops.get(ino, [])):
            if op.index >= point:
                break
            if self._durable(op.index, point):
                n = i + 1
        return n

    def describe(self, state: CrashState, limit: int = 6) -> str:
        """Which pending ops a crash state kept or dropped (for violation reports)."""
        pending = self.pending_dir_ops(state.point)
        kept = [op for op in pending if op.index in state.dir_ops]
        lost = [op for op in pending if op.index not in state.dir_ops]

        def fmt(ops: list[DirOp]) -> str:
            text = "; ".join(f"#{op.index} {op.desc}" for op in ops[:limit])
            return text + (f"; ... {len(ops) - limit} more" if len(ops) > limit else "")

        out = [f"state: {state.label}"]
        if lost:
            out.append(f"lost dir ops: {fmt(lost)}")
        if kept:
            out.append(f"kept dir ops: {fmt(kept)}")
        pdata = self.pending_data(state.point)
        partial: list[str] = []
        for ino, k, torn in state.data:
            lo, hi = pdata.get(ino, (k, k))
            if k != hi or torn is not None:
                op = self.data_ops[ino][max(k - 1, 0)]
                partial.append(
                    f"{op.desc}: {k - lo}/{hi - lo} pending ops"
                    + (f", last torn ({torn})" if torn else "")
                )
        if partial:
            more = f"; ... {len(partial) - limit} more" if len(partial) > limit else ""
            out.append("data that did not all reach the disk: " + "; ".join(partial[:limit]) + more)
        return "\n    ".join(out)


# --------------------------------------------------------------------------- checking


FreshLoop = Callable[[str, int], "LoopRecord"]
"""Builds a new loop for session `sid` (the int makes it unique) for the writability check."""


def check_state_dir(
    root: Path,
    expectation: Expectation,
    sessions: Sequence[str],
    fresh_loop: FreshLoop,
    *,
    salt: int = 0,
) -> list[str]:
    """Open a crash state with the public API and check it; the problems found.

    * every session holds exactly its last acknowledged state or the state of a call in
      flight (absent sessions included), and no session appears that nobody wrote;
    * ``verify()`` finds no damage (orphans are fine);
    * the store is writable: an ``append_loop`` to each session succeeds, and a new store
      instance then sees exactly the previous state plus that loop (nothing lost, nothing
      resurrected) and no other session.
    """
    from loopstore.errors import SessionError, SessionNotFound
    from loopstore.store import FileSystemSessionStore

    problems: list[str] = []
    try:
        store = FileSystemSessionStore(root, durable=True)
    except Exception as exc:
        return [f"opening the store raised {type(exc).__name__}: {exc}"]
    loaded: dict[str, ModelSession | None] = {}
    try:
        try:
            listed = set(store.list_ids())
        except Exception as exc:
            problems.append(f"list_ids() raised {type(exc).__name__}: {exc}")
            listed = set()
        for sid in sorted(set(sessions) | listed):
            allowed = expectation.allowed_for(sid)
            try:
                session: Session | None = store.load(sid)
            except SessionNotFound:
                session = None
            except SessionError as exc:
                problems.append(f"load({sid!r}) raised {type(exc).__name__}: {exc}")
                continue
            except Exception as exc:
                problems.append(f"load({sid!r}) raised {type(exc).__name__}: {exc}")
                continue
            model = ModelSession.of(session) if session is not None else None
            loaded[sid] = model
            got = model.state() if model is not None else None
            if sid not in sessions:
                problems.append(f"session {sid!r} appeared, but no writer touched it")
            elif got not in allowed:
                wanted = " or ".join(describe_state(s) for s in allowed)
                problems.append(f"session {sid!r} is {describe_state(got)}; expected {wanted}")
            if (session is None) == (sid in listed):
                problems.append(
                    f"list_ids() {'lists' if sid in listed else 'omits'} {sid!r}, "
                    f"but load() {'finds' if session is not None else 'does not find'} it"
                )
        try:
            report = store.verify()
            if not report.ok:
                problems.extend(
                    f"verify(): {p.kind} in {p.session_id!r}: {p.detail}" for p in report.problems
                )
        except Exception as exc:
            problems.append(f"verify() raised {type(exc).__name__}: {exc}")
        if problems:
            return problems
        # Writable afterwards, and a write must neither lose nor resurrect anything.
        expected: dict[str, SessionState | None] = {}
        for i, sid in enumerate(sorted(sessions)):
            loop = fresh_loop(sid, salt * 100 + i)
            try:
                store.append_loop(sid, loop)
            except Exception as exc:
                problems.append(f"append_loop({sid!r}) after recovery raised {exc!r}")
                continue
            expected[sid] = predict_append(loaded.get(sid), sid, loop).state()
    finally:
        store.close()
    if problems:
        return problems
    again = FileSystemSessionStore(root, durable=True)
    try:
        for sid, want in expected.items():
            try:
                got = state_of(again.load(sid))
            except Exception as exc:
                problems.append(f"after a recovery append, load({sid!r}) raised {exc!r}")
                continue
            if got != want:
                problems.append(
                    f"after a recovery append, {sid!r} is {describe_state(got)}; "
                    f"expected {describe_state(want)} (a write resurrected or lost loops)"
                )
        extra = set(again.list_ids()) - set(sessions)
        if extra:
            problems.append(f"after a recovery append, sessions appeared: {sorted(extra)}")
    finally:
        again.close()
    return problems


# --------------------------------------------------------------------------- scenarios


KillRule = Callable[[Trace, str], Injection | None]
"""Picks, from a probe run's trace, where to SIGKILL the real run (None: not found)."""


@dataclass(frozen=True)
class WriterRun:
    """One writer process: ``python -m stress.powerloss_writers *argv``."""

    label: str
    argv: tuple[str, ...]
    kill: KillRule | None = None


@dataclass(frozen=True)
class PowerLossScenario:
    """A store to start from, writers to trace in order, and the sessions they touch."""

    name: str
    description: str
    sessions: tuple[str, ...]
    setup: Callable[[Path], None]
    runs: tuple[WriterRun, ...]
    fresh_loop: FreshLoop
    expect_violation: bool = False
    """Documentation only: True for the scenarios of a known bug report."""
    short_budget: Budget | None = None
    """A smaller budget for short mode (a scenario whose checks are expensive)."""
    long_budget: Budget | None = None
    """The same for long mode (e.g. a cap on crash points)."""


@dataclass(frozen=True)
class Options:
    """How to run a scenario."""

    budget: Budget = field(default_factory=Budget.short)
    seed: int = 0
    rename_rule: RenameRule = "either"
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of the writers (e.g. LOOPSTORE_SKIP_FSYNC)."""
    stop_at_first_violation: bool = False
    keep: bool = False
    """Keep the work directory (traces, crash states that failed)."""
    scratch: Path | None = None
    """Where crash states are materialized (default: /dev/shm if usable, else the work dir)."""
    max_reported: int = 12


@dataclass(frozen=True)
class Violation:
    point: int
    problems: tuple[str, ...]
    state: str
    context: str

    def render(self, max_problems: int = 8) -> str:
        shown = list(self.problems[:max_problems])
        if len(self.problems) > max_problems:
            shown.append(f"... {len(self.problems) - max_problems} more problems")
        probs = "\n  - ".join(shown)
        return f"crash at event {self.point}:\n  - {probs}\n  {self.state}\n  {self.context}"


@dataclass
class ScenarioReport:
    """The outcome of one scenario: counts, timings, violations, harness errors."""

    name: str
    mode: str
    events: int = 0
    dir_ops: int = 0
    data_ops: int = 0
    store_syncs: int = 0
    calls: int = 0
    """Store calls the writers began (BEGIN markers)."""
    acks: int = 0
    crash_points: int = 0
    states_generated: int = 0
    states_distinct: int = 0
    checks: int = 0
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0
    errors: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    trace_seconds: float = 0.0
    check_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations and not self.errors

    def summary(self) -> str:
        verdict = (
            "ok"
            if self.ok
            else f"{self.violation_count} violating states, {len(self.errors)} errors"
        )
        return (
            f"{self.name} [{self.mode}]: {verdict}; {self.events} events "
            f"({self.dir_ops} dir ops, {self.data_ops} data ops, {self.store_syncs} syncs, "
            f"{self.acks} acks), {self.crash_points} crash points, {self.states_generated} "
            f"states -> {self.states_distinct} distinct trees, {self.checks} checks"
            + (
                f" (sampled: {self.details['sampled_checks']})"
                if "sampled_checks" in self.details
                else ""
            )
            + "; "
            f"{self.seconds:.1f} s (trace {self.trace_seconds:.1f} s, "
            f"check {self.check_seconds:.1f} s)"
        )

    def render(self, limit: int = 5) -> str:
        lines = [self.summary()]
        lines += [f"ERROR: {e}" for e in self.errors]
        lines += [v.render() for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"... {len(self.violations) - limit} more violations recorded")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "ok": self.ok,
            "events": self.events,
            "dir_ops": self.dir_ops,
            "data_ops": self.data_ops,
            "store_syncs": self.store_syncs,
            "calls": self.calls,
            "acks": self.acks,
            "crash_points": self.crash_points,
            "states_generated": self.states_generated,
            "states_distinct": self.states_distinct,
            "checks": self.checks,
            "violation_count": self.violation_count,
            "violations": [v.render() for v in self.violations],
            "errors": self.errors,
            "details": self.details,
            "seconds": round(self.seconds, 2),
            "trace_seconds": round(self.trace_seconds, 2),
            "check_seconds": round(self.check_seconds, 2),
        }


def _scratch_dir(options: Options, workdir: Path) -> Path:
    if options.scratch is not None:
        return options.scratch
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="loopstore-powerloss-", dir=shm))
    return workdir / "states"


def initial_states(root: Path, sessions: Sequence[str]) -> dict[str, SessionState | None]:
    """Each session's state in the store at `root` (read with the public API)."""
    from loopstore.errors import SessionNotFound
    from loopstore.store import FileSystemSessionStore

    if not any(root.iterdir()):
        return {sid: None for sid in sessions}  # no store yet (opening one would create it)
    store = FileSystemSessionStore(root, durable=True)
    try:
        out: dict[str, SessionState | None] = {}
        for sid in sessions:
            try:
                out[sid] = state_of(store.load(sid))
            except SessionNotFound:
                out[sid] = None
        return out
    finally:
        store.close()


def _writer_argv(run: WriterRun, root: Path) -> list[str]:
    """``python -m stress.powerloss_writers PROGRAM ROOT ARGS...``."""
    program, *rest = run.argv
    return [sys.executable, "-m", "stress.powerloss_writers", program, str(root), *rest]


def _run_writer(
    run: WriterRun,
    root: Path,
    workdir: Path,
    options: Options,
    report: ScenarioReport,
    model: TraceModel,
    tag: str,
) -> RunInfo | None:
    """Trace one writer on `root` (after a probe run if it is to be killed); feed `model`."""
    env = writer_env(options.env)
    injection: Injection | None = None
    if run.kill is not None:
        probe_root = workdir / f"probe-{tag}"
        shutil.copytree(root, probe_root, symlinks=True)
        probe_model = TraceModel(probe_root, rename_rule=options.rename_rule)
        probe = run_traced(
            _writer_argv(run, probe_root),
            trace_path=workdir / f"probe-{tag}.strace",
            label=f"probe-{run.label}",
            env=env,
        )
        report.trace_seconds += probe.seconds
        if probe.returncode != 0:
            report.errors.append(
                f"probe run of {run.label} exited {probe.returncode}: {probe.stderr[-2000:]}"
            )
            return None
        probe_model.feed(read_trace(probe.trace_path), f"probe-{run.label}")
        injection = run.kill(probe_model.finish(), str(probe_root))
        if injection is None:
            report.errors.append(f"no kill point found for {run.label} in its probe run")
            return None
        report.details.setdefault("kills", []).append(
            {"run": run.label, "syscall": injection.syscall, "nth": injection.nth}
        )
    traced = run_traced(
        _writer_argv(run, root),
        trace_path=workdir / f"run-{tag}.strace",
        label=run.label,
        env=env,
        injection=injection,
    )
    report.trace_seconds += traced.seconds
    (workdir / f"run-{tag}.stdout").write_text(traced.stdout)
    (workdir / f"run-{tag}.stderr").write_text(traced.stderr)
    info = model.feed(read_trace(traced.trace_path), run.label)
    if injection is not None and not info.killed:
        report.errors.append(
            f"{run.label} was to be killed at {injection.syscall} #{injection.nth}, "
            f"but it exited {traced.returncode}"
        )
    if injection is None and traced.returncode != 0:
        report.errors.append(
            f"writer {run.label} exited {traced.returncode}: {traced.stderr[-3000:]}"
        )
    diffs = model.compare_with_disk(root)
    if diffs:
        report.errors.append(
            f"the model diverged from the disk after {run.label} (a syscall the harness "
            f"does not model?): {diffs[:8]}"
        )
    return info


def run_scenario(
    scenario: PowerLossScenario,
    workdir: Path,
    options: Options | None = None,
) -> ScenarioReport:
    """Trace the scenario's writers, enumerate crash states, check each; the report."""
    options = options or Options()
    own = scenario.short_budget if options.budget.mode == "short" else scenario.long_budget
    if own is not None:
        options = dataclasses.replace(options, budget=options.budget.tighter(own))
    t0 = time.monotonic()
    report = ScenarioReport(scenario.name, options.budget.mode)
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(workdir / "store"))
    root.mkdir(parents=True, exist_ok=True)
    scenario.setup(root)
    initial = initial_states(root, scenario.sessions)
    shutil.copytree(root, workdir / "snapshot", symlinks=True)
    model = TraceModel(root, rename_rule=options.rename_rule)
    for i, run in enumerate(scenario.runs):
        info = _run_writer(run, root, workdir, options, report, model, f"{i}-{run.label}")
        if info is None:
            break
    trace = model.finish()
    report.events = len(trace.events)
    report.dir_ops = sum(1 for e in trace.events if isinstance(e, DirOp))
    report.data_ops = sum(1 for e in trace.events if isinstance(e, DataOp))
    report.store_syncs = sum(1 for e in trace.events if isinstance(e, SyncOp))
    report.acks = sum(1 for e in trace.events if isinstance(e, Marker) and e.kind == "ACK")
    report.calls = sum(1 for e in trace.events if isinstance(e, Marker) and e.kind == "BEGIN")
    report.details["runs"] = [
        {
            "label": r.label,
            "killed": r.killed,
            "syscalls": r.syscalls,
            "sync_calls": r.sync_calls,
            "store_syncs": r.store_syncs,
        }
        for r in trace.runs
    ]
    # Diagnostics only (names of format v1/v2): renames of a manifest into place.
    report.details["renames_into_session_dirs"] = sum(
        1
        for e in trace.events
        if isinstance(e, DirOp)
        and len(e.changes) > 1
        and os.path.basename(os.path.dirname(e.desc.split(" -> ")[-1])) in scenario.sessions
        and e.index > _after_first_begin(trace)
    )
    if report.errors:
        report.seconds = time.monotonic() - t0
        return report
    check_trace(trace, scenario, workdir, options, report, initial)
    report.seconds = time.monotonic() - t0
    if not options.keep and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def check_trace(
    trace: Trace,
    scenario: PowerLossScenario,
    workdir: Path,
    options: Options,
    report: ScenarioReport,
    initial: Mapping[str, SessionState | None],
) -> None:
    """Enumerate the crash states of `trace` and check each against the markers.

    First every crash state of every chosen point is built and deduplicated by (tree,
    what the markers allow there); then each distinct one is checked once (all of them,
    or the extremes plus a seeded sample when ``budget.max_checks`` is set).
    """
    t0 = time.monotonic()
    budget = options.budget
    rng = random.Random(f"{options.seed}:{scenario.name}")
    enum = CrashEnumerator(trace)
    tracker = ExpectationTracker(initial)
    markers = trace.markers()
    points = enum.points(budget, rng)
    report.crash_points = len(points)
    expectations: dict[int, Expectation] = {}
    mi = 0
    for point in sorted(points):
        while mi < len(markers) and markers[mi].index < point:
            tracker.feed(markers[mi])
            mi += 1
        expectations[point] = tracker.expectation()
    while mi < len(markers):
        tracker.feed(markers[mi])
        mi += 1
    report.errors.extend(tracker.failures)
    report.errors.extend(tracker.mismatches)

    # Phase 1: every state, deduplicated; the first occurrence of each is what is checked.
    first: dict[tuple[str, object], tuple[CrashState, bool]] = {}
    occurrences: dict[tuple[str, object], int] = {}
    keys: set[str] = set()
    for point in points:
        exp = expectations[point]
        for i, state in enumerate(enum.states(point, budget, rng)):
            report.states_generated += 1
            key = enum.build(state).key
            keys.add(key)
            unique = (key, exp.allowed)
            occurrences[unique] = occurrences.get(unique, 0) + 1
            if unique not in first:
                first[unique] = (state, i < 2)
    report.states_distinct = len(keys)
    todo = list(first.items())
    if budget.max_checks is not None and len(todo) > budget.max_checks:
        extremes = [item for item in todo if item[1][1]]
        rest = [item for item in todo if not item[1][1]]
        room = max(0, budget.max_checks - len(extremes))
        picked = set(rng.sample(range(len(rest)), min(room, len(rest))))
        todo = extremes[: budget.max_checks] + [r for j, r in enumerate(rest) if j in picked]
        report.details["sampled_checks"] = f"{len(todo)} of {len(first)} distinct states"

    # Phase 2: check.
    scratch = _scratch_dir(options, workdir)
    own_scratch = options.scratch is None and scratch.parent == Path("/dev/shm")
    try:
        for n, (ukey, (state, _)) in enumerate(todo, 1):
            exp = expectations[state.point]
            dest = scratch / f"state-{n}"
            enum.build(state).materialize(dest)
            problems = tuple(check_state_dir(dest, exp, scenario.sessions, scenario.fresh_loop))
            report.checks += 1
            if problems and options.keep:
                shutil.copytree(dest, workdir / f"violation-{n}", symlinks=True)
            shutil.rmtree(dest, ignore_errors=True)
            if not problems:
                continue
            report.violation_count += occurrences[ukey]
            if len(report.violations) < options.max_reported:
                report.violations.append(
                    Violation(
                        state.point,
                        problems,
                        enum.describe(state),
                        _context(trace, state.point, exp),
                    )
                )
            if options.stop_at_first_violation:
                return
    finally:
        report.check_seconds = time.monotonic() - t0
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _context(trace: Trace, point: int, exp: Expectation, before: int = 3) -> str:
    lo = max(0, point - before)
    last = [describe_event(e) for e in trace.events[lo:point]]
    nxt = describe_event(trace.events[point]) if point < len(trace.events) else "(end of trace)"
    flight = "; ".join(exp.in_flight) or "none"
    return (
        f"{exp.acked} calls acknowledged, in flight: {flight}\n  last events: "
        + " | ".join(last)
        + f"\n  next event: {nxt}"
    )


# --------------------------------------------------------------------------- kill rules


def _after_first_begin(trace: Trace) -> int:
    for e in trace.events:
        if isinstance(e, Marker) and e.kind == "BEGIN":
            return e.index
    return 0


def _injection_at(trace: Trace, start: int, prefer_ino: int | None) -> Injection | None:
    """The first sync of `prefer_ino` after `start` (else the first sync of anything)."""
    first_any: SyncOp | None = None
    for e in trace.events[start + 1 :]:
        if not isinstance(e, SyncOp):
            continue
        if first_any is None:
            first_any = e
        if prefer_ino is None or e.ino == prefer_ino:
            return Injection(e.syscall, e.nth)
    return Injection(first_any.syscall, first_any.nth) if first_any is not None else None


def kill_before_parent_sync_of_new_entry(name: str) -> KillRule:
    """Kill at the first fsync of the directory that got entry `name` (e.g. a new session
    directory, made by mkdir or by a rename from staging), before that fsync runs."""

    def rule(trace: Trace, _root: str) -> Injection | None:
        begin = _after_first_begin(trace)
        for e in trace.events[begin:]:
            if isinstance(e, DirOp) and any(n == name and i is not None for _, n, i in e.changes):
                return _injection_at(trace, e.index, e.dst_dir)
        return None

    return rule


def kill_before_dir_sync_after_replace_in(session_id: str) -> KillRule:
    """Kill after the first rename into the session's own directory (its manifest
    replaced), before the next fsync of that directory; with no such rename, before the
    first sync after the first write to a file in that directory (a journal append)."""

    def directly_in(path: str) -> bool:
        return os.path.basename(os.path.dirname(path)) == session_id

    def rule(trace: Trace, _root: str) -> Injection | None:
        begin = _after_first_begin(trace)
        for e in trace.events[begin:]:
            if (
                isinstance(e, DirOp)
                and len(e.changes) > 1
                and directly_in(e.desc.split(" -> ")[-1])
            ):
                return _injection_at(trace, e.index, e.dst_dir)
        for e in trace.events[begin:]:
            if isinstance(e, DataOp) and directly_in(e.desc):
                return _injection_at(trace, e.index, None)
        return None

    return rule


# --------------------------------------------------------------------------- accounting


@dataclass
class SyncCount:
    """Durability syscalls of a traced run, against the calls it acknowledged."""

    by_name: dict[str, int] = field(default_factory=dict)
    acks: int = 0
    begins: int = 0
    writers: int = 0
    """Threads that printed a BEGIN (one per writer process here)."""

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    @property
    def per_ack(self) -> float:
        return self.total / self.acks if self.acks else float("inf")

    def summary(self) -> str:
        names = ", ".join(f"{k} {v}" for k, v in sorted(self.by_name.items())) or "none"
        return (
            f"{self.total} durability syscalls ({names}) for {self.acks} acknowledged calls "
            f"of {self.writers} writers: {self.per_ack:.2f} per call"
        )


COUNT_SYSCALLS: Final = ("fsync", "fdatasync", "syncfs", "sync_file_range", "sync", "write")


def count_syncs(lines: Iterable[TraceLine]) -> SyncCount:
    """Count durability syscalls from the first BEGIN marker on (to the end of the trace).

    The trace needs only `COUNT_SYSCALLS` (writes to fd 1 carry the markers). Failed
    calls count too: they were still issued.
    """
    out = SyncCount()
    started = False
    tids: set[int] = set()
    bufs: dict[int, bytearray] = {}
    for item in lines:
        if isinstance(item, ProcExit):
            continue
        if item.name == "write" and item.args and item.args[0].strip() == "1":
            data, _ = decode_string(item.args[1])
            buf = bufs.setdefault(item.tid, bytearray())
            buf += data
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                if line.startswith(b"BEGIN "):
                    started = True
                    out.begins += 1
                    tids.add(item.tid)
                elif line.startswith(b"ACK "):
                    out.acks += 1
            continue
        if started and item.name in SYNC_SYSCALLS and not item.entry_only:
            out.by_name[item.name] = out.by_name.get(item.name, 0) + 1
    out.writers = len(tids)
    return out


def trace_counts(
    argv: Sequence[str], workdir: Path, env: Mapping[str, str] | None = None
) -> tuple[SyncCount, TracedRun]:
    """Run `argv` under strace (durability syscalls and writes only) and count."""
    run = run_traced(
        argv,
        trace_path=workdir / "count.strace",
        label="count",
        env=env,
        syscalls=COUNT_SYSCALLS,
        string_limit=512,
    )
    return count_syncs(read_trace(run.trace_path)), run


__all__ = [
    "REPO",
    "Budget",
    "CrashEnumerator",
    "CrashState",
    "DataOp",
    "DirOp",
    "Expectation",
    "ExpectationTracker",
    "Injection",
    "Marker",
    "ModelSession",
    "Options",
    "PowerLossScenario",
    "ScenarioReport",
    "SessionState",
    "StraceMissing",
    "SyncCount",
    "SyncOp",
    "Trace",
    "TraceError",
    "TraceModel",
    "Violation",
    "WriterRun",
    "check_state_dir",
    "count_syncs",
    "kill_before_dir_sync_after_replace_in",
    "kill_before_parent_sync_of_new_entry",
    "parse_strace",
    "predict_append",
    "run_scenario",
    "run_traced",
    "state_of",
    "strace_binary",
    "trace_counts",
]
