"""`loopstore demo`: worker processes record synthetic agent sessions into one store at once.

Each worker process runs a `SessionRecorder` with `store=` over synthetic phi-core
event streams (`loopstore.synth`), so every loop is persisted the moment it ends; some
sessions are shared by two workers, which append to them concurrently. The parent
process shows live progress, then prints what is in the store: sessions, loops, raw
vs stored bytes, a loop tree of one session, and a `verify` result.

The demo writes only into a store it created: an empty or missing directory becomes a
store marked with `DEMO_MARKER`. A non-empty directory without that marker is refused,
unless `add_to_existing` is given and it is a loopstore store; `fresh` empties only a
marked store. An `s3://` root gets demo data when no store is there yet (or with
`add_to_existing`); `fresh` is for directories only. Options are bounded (`MAX_*`) so a
typo cannot fill the disk. Ctrl-C stops the workers between two events (they ignore
SIGINT; the parent asks them to stop, then terminates any that do not) and re-raises
`KeyboardInterrupt` in the caller.

`loopstore demo` imports this module to parse its options, so multiprocessing, uuid and
shutil are imported where they are used.
"""

from __future__ import annotations

import contextlib
import queue as queue_mod
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from loopstore.cli import format_size

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

    from rich.console import Console
    from rich.tree import Tree

    from loopstore.models import LoopRecord, Session

__all__ = [
    "DEFAULT_ROOT",
    "DEMO_MARKER",
    "MAX_LOOPS",
    "MAX_SESSIONS",
    "MAX_TOTAL_LOOPS",
    "MAX_WORKERS",
    "DemoResult",
    "DemoUsageError",
    "check_options",
    "run_demo",
]

DEFAULT_ROOT = Path(".loopstore-demo")
DEFAULT_WORKERS = 4
DEFAULT_SESSIONS = 16
DEFAULT_LOOPS = 8
DEFAULT_LOOP_BYTES = 150_000
SHARED_EVERY = 3
"""Every third session gets loops from two workers at once."""
POLL_INTERVAL_S = 0.1
WORKER_STOP_GRACE_S = 10.0
"""How long stopped (or finished) workers get to exit before they are terminated."""
WORKER_KILL_GRACE_S = 5.0
DEMO_MARKER = "loopstore-demo.txt"
"""Written at the root of a store the demo created. Only such a store gets demo data
without `add_to_existing`, and only such a store is emptied by `fresh`."""

MAX_WORKERS = 32
MAX_SESSIONS = 1_000
MAX_LOOPS = 100
"""Loops per session."""
MAX_TOTAL_LOOPS = 10_000
"""sessions x loops: about 1.5 GB of loop JSON at the default loop size."""
MAX_SEED = 2**63 - 1
MAX_LOOP_BYTES = 2_000_000
MAX_RAW_BYTES = 2 * 1024**3
"""sessions x loops x loop_bytes: the raw JSON the demo may generate in one run."""


class DemoUsageError(ValueError):
    """An option or a root the demo refuses (the command line exits 2)."""


def check_options(
    workers: int | None,
    sessions: int,
    loops: int,
    seed: int = 0,
    loop_bytes: int = DEFAULT_LOOP_BYTES,
) -> int:
    """Validate the demo options; returns the number of workers to use.

    Without `workers`, the default (4) is lowered to `sessions`; an explicit `workers`
    larger than `sessions` is refused (a worker without a session has nothing to do).
    """
    bounds: list[tuple[str, int, int]] = [
        ("sessions", sessions, MAX_SESSIONS),
        ("loops", loops, MAX_LOOPS),
        ("loop_bytes", loop_bytes, MAX_LOOP_BYTES),
    ]
    if workers is not None:
        bounds.insert(0, ("workers", workers, MAX_WORKERS))
    for name, value, most in bounds:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise DemoUsageError(f"{name} must be between 1 and {most:,}, not {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DemoUsageError(f"seed must be between 0 and {MAX_SEED}, not {seed!r}")
    if sessions * loops > MAX_TOTAL_LOOPS:
        raise DemoUsageError(
            f"sessions x loops = {sessions * loops:,} loops; the demo records at most "
            f"{MAX_TOTAL_LOOPS:,} in one run"
        )
    if sessions * loops * loop_bytes > MAX_RAW_BYTES:
        raise DemoUsageError(
            f"sessions x loops x loop_bytes = {sessions * loops * loop_bytes:,} bytes; the "
            f"demo generates at most {MAX_RAW_BYTES:,} in one run"
        )
    if workers is None:
        return min(DEFAULT_WORKERS, sessions)
    if workers > sessions:
        raise DemoUsageError(
            f"workers ({workers}) must not exceed sessions ({sessions}): "
            "each worker records sessions of its own"
        )
    return workers


@dataclass(frozen=True)
class _Job:
    session_id: str
    agent_id: str
    loops: int
    seed: int
    loop_tag: str


@dataclass(frozen=True)
class _WorkerArgs:
    index: int
    root: str
    jobs: tuple[_Job, ...]
    loop_bytes: int


@dataclass
class DemoResult:
    """What the demo did and what the store holds afterwards."""

    root: Path | str
    workers: int
    sessions: int
    loops: int
    raw_bytes: int
    stored_bytes: int
    loops_recorded: int
    persist_errors: int
    verify_ok: bool
    problems: list[str] = field(default_factory=list)
    tree_session_id: str | None = None
    elapsed_s: float = 0.0
    owned: bool = True
    """True when the demo created the store (it carries `DEMO_MARKER`)."""

    @property
    def ok(self) -> bool:
        """True when every worker finished and `verify` found nothing wrong."""
        return self.verify_ok

    @property
    def ratio(self) -> float:
        """Raw JSON bytes per stored byte (the compression ratio)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0


def _plan(
    workers: int, sessions: int, loops: int, seed: int
) -> tuple[list[list[_Job]], list[str], int]:
    """Assign loops to workers; returns per-worker jobs, the session ids, total main loops."""
    import uuid

    rng_ns = uuid.UUID(int=seed % (1 << 128))
    per_worker: list[list[_Job]] = [[] for _ in range(workers)]
    ids: list[str] = []
    total = 0
    for i in range(sessions):
        sid = str(uuid.uuid5(rng_ns, f"session-{i}"))
        aid = f"agent-{uuid.uuid5(rng_ns, f'agent-{i % max(1, workers)}')}"
        ids.append(sid)
        owner = i % workers
        shared = workers > 1 and loops > 1 and i % SHARED_EVERY == 0
        if shared:
            first = (loops + 1) // 2
            split = [(owner, first), ((owner + 1) % workers, loops - first)]
        else:
            split = [(owner, loops)]
        for w, n in split:
            per_worker[w].append(_Job(sid, aid, n, seed * 100_003 + i * 17 + w, f"w{w}."))
            total += n
    return per_worker, ids, total


def _worker_main(args: _WorkerArgs, events_q: Queue[tuple[Any, ...]], stop: Event) -> None:
    """Run in a spawned process: record this worker's jobs into the shared store.

    Ctrl-C is the parent's to handle: the worker ignores SIGINT (it is started with it
    ignored, too) and returns quietly, between two events, once `stop` is set or the
    parent is gone (so no worker outlives a parent that could not stop it).
    """
    import multiprocessing

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    from loopstore.locations import open_store
    from loopstore.recorder import SessionRecorder
    from loopstore.synth import generate_events

    try:
        store = open_store(args.root)
        recorder = SessionRecorder(store=store)
        done = 0
        for job in args.jobs:
            events = generate_events(
                job.seed,
                session_id=job.session_id,
                agent_id=job.agent_id,
                loops=job.loops,
                loop_bytes=args.loop_bytes,
                loop_tag=job.loop_tag,
            )
            for ev in events:
                if stop.is_set() or (parent is not None and not parent.is_alive()):
                    events_q.cancel_join_thread()  # exit even if nobody reads any more
                    events_q.put(("stopped", args.index, done))
                    return
                recorder.on_event(ev)
                if ev["type"] == "AgentEnd" and ev["loop_id"].startswith(job.session_id + "."):
                    done += 1
                    events_q.put(("loop", args.index, done))
            recorder.flush()
            recorder.drain_completed()
        remaining = recorder.persist()
        events_q.put(("done", args.index, done, len(recorder.persist_errors), remaining))
    except BaseException as exc:
        events_q.put(("error", args.index, repr(exc)))
        raise


def _is_demo_root(root: Path) -> bool:
    return (root / DEMO_MARKER).is_file()


def _is_store(root: Path) -> bool:
    from loopstore.ondisk import Layout

    return Layout(root).marker.is_file()


def _prepare_root(root: Path, *, fresh: bool, add_to_existing: bool) -> bool:
    """Check (and for `fresh`, empty) the root; True when the demo owns it.

    The demo owns a root it found missing or empty (it marks it with `DEMO_MARKER`
    before anything else) and a root that carries the marker. Anything else is refused,
    except a loopstore store with `add_to_existing`; `fresh` empties only what it owns.
    """
    if root.exists() and not root.is_dir():
        raise DemoUsageError(f"{root} exists and is not a directory")
    entries = sorted(root.iterdir()) if root.is_dir() else []
    if not entries:
        _mark_demo_root(root)
        return True
    if _is_demo_root(root):
        if fresh:
            _empty_demo_root(root, entries)
            _mark_demo_root(root)
        return True
    if fresh:
        raise DemoUsageError(
            f"refusing to empty {root}: it was not created by `loopstore demo` "
            f"(no {DEMO_MARKER}); choose another directory"
        )
    if not _is_store(root):
        raise DemoUsageError(
            f"refusing to write into {root}: it is not empty and not a loopstore store; "
            "choose a new or empty directory"
        )
    if not add_to_existing:
        raise DemoUsageError(
            f"refusing to add demo data to {root}: it is a store `loopstore demo` did not "
            f"create (no {DEMO_MARKER}); choose a new or empty directory, or pass "
            "--add-to-existing to add to it anyway"
        )
    return False


def _prepare_url(location: str, *, fresh: bool, add_to_existing: bool) -> bool:
    """The object-store twin of `_prepare_root`: True when no store is there yet."""
    from loopstore.locations import store_exists

    if fresh:
        raise DemoUsageError(
            f"--fresh empties a directory store; for {location} choose a new prefix"
        )
    if not store_exists(location):
        return True
    if not add_to_existing:
        raise DemoUsageError(
            f"refusing to add demo data to {location}: it holds a store; choose a new "
            "prefix, or pass --add-to-existing to add to it anyway"
        )
    return False


def _mark_demo_root(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text(
        "This store was created by `loopstore demo`; `loopstore demo --fresh` may empty it.\n",
        encoding="utf-8",
    )


def _empty_demo_root(root: Path, entries: list[Path]) -> None:
    """Remove what is inside a demo root (the root itself stays: it may be the cwd);
    the marker goes last, so an interrupted --fresh leaves a root still marked."""
    import shutil

    for entry in entries:
        if entry.name == DEMO_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (root / DEMO_MARKER).unlink()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C in this block. Processes started here inherit that, so a Ctrl-C at
    the terminal reaches the parent only. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _drain(events_q: Queue[tuple[Any, ...]]) -> None:
    """Best effort: a Ctrl-C in the middle of a read may have left the pipe unreadable."""
    with contextlib.suppress(Exception):
        while True:
            events_q.get_nowait()


def _stop_workers(
    procs: list[SpawnProcess], stop: Event, events_q: Queue[tuple[Any, ...]]
) -> list[str]:
    """Ask every worker to stop, wait a little, then terminate the rest.

    The queue is drained meanwhile (a process that put items exits only once they are
    read). Returns the names of the workers that had to be terminated.
    """
    stop.set()
    deadline = time.monotonic() + WORKER_STOP_GRACE_S
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            break
        _drain(events_q)
        alive[0].join(POLL_INTERVAL_S)
    terminated = [p for p in procs if p.is_alive()]
    for p in terminated:
        p.terminate()
    for p in terminated:
        p.join(WORKER_KILL_GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()
    _drain(events_q)
    return [p.name for p in terminated]


def _loop_label(lp: LoopRecord, raw: int | None) -> str:
    kind = lp.model_dump(mode="json")["continuation_kind"]
    kind_text = kind if isinstance(kind, str) else (next(iter(kind), "?") if kind else "-")
    status = str(getattr(lp.status, "value", lp.status))
    parts = [
        f"[bold]{escape(lp.loop_id.split('.', 1)[-1])}[/bold]",
        "[green]✓[/green]" if status == "Completed" else f"[yellow]{escape(status)}[/yellow]",
        kind_text,
        f"{lp.turn_count()} turns",
    ]
    if raw is not None:
        parts.append(format_size(raw))
    if lp.parallel_group is not None:
        parts.append("[green]★ selected[/green]" if lp.parallel_group.is_selected else "parallel")
    for ref in lp.child_loop_refs:
        parts.append(f"[cyan]→ sub-agent {escape(ref.child_session_id[:8])}[/cyan]")
    return " ".join(parts)


def loop_tree(session: Session, *, sizes: dict[str, int] | None = None) -> Tree:
    """A rich tree of a session's loops (roots, then same-session children)."""
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree(
        Text.from_markup(
            f"session [bold]{escape(session.session_id)}[/bold]  ({len(session.loops)} loops)"
        )
    )
    by_id = {lp.loop_id: lp for lp in session.loops}
    shown: set[str] = set()

    def add(node: Tree, lp: LoopRecord) -> None:
        if lp.loop_id in shown:
            return
        shown.add(lp.loop_id)
        child = node.add(Text.from_markup(_loop_label(lp, (sizes or {}).get(lp.loop_id))))
        for cid in lp.children_loop_ids:
            if cid in by_id:
                add(child, by_id[cid])

    for root in session.root_loops():
        add(tree, root)
    for lp in session.loops:  # loops whose parent link was written by another worker
        add(tree, lp)
    return tree


def _follow_workers(
    procs: list[SpawnProcess],
    events_q: Queue[tuple[Any, ...]],
    out: Console,
    per_worker: list[list[_Job]],
    total_loops: int,
) -> tuple[int, int, list[str]]:
    """Show progress until every worker is done; returns (loops recorded, persist
    errors, problems)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    recorded = 0
    persist_errors = 0
    problems: list[str] = []
    finished: set[int] = set()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    ) as progress:
        overall = progress.add_task("all loops", total=total_loops)
        tasks = [
            progress.add_task(f"worker {i}", total=sum(j.loops for j in jobs))
            for i, jobs in enumerate(per_worker)
        ]
        while len(finished) < len(procs):
            try:
                msg = events_q.get(timeout=POLL_INTERVAL_S)
            except queue_mod.Empty:
                for i, p in enumerate(procs):
                    if i not in finished and not p.is_alive() and events_q.empty():
                        finished.add(i)
                        if p.exitcode != 0:
                            problems.append(f"worker {i} exited with code {p.exitcode}")
                continue
            kind, index = msg[0], msg[1]
            if kind == "loop":
                progress.update(tasks[index], completed=msg[2])
                recorded += 1
                progress.update(overall, completed=recorded)
            elif kind == "done":
                finished.add(index)
                persist_errors += msg[3]
                if msg[4]:
                    problems.append(f"worker {index} left {msg[4]} writes unpersisted")
            elif kind == "error":
                finished.add(index)
                problems.append(f"worker {index} failed: {msg[2]}")
    return recorded, persist_errors, problems


def run_demo(
    root: str | Path | None = None,
    *,
    workers: int | None = None,
    sessions: int = DEFAULT_SESSIONS,
    loops: int = DEFAULT_LOOPS,
    seed: int = 0,
    fresh: bool = False,
    add_to_existing: bool = False,
    console: Console | None = None,
    loop_bytes: int = DEFAULT_LOOP_BYTES,
) -> DemoResult:
    """Record `sessions` x `loops` synthetic loops with `workers` processes, then report.

    `workers` defaults to 4 (at most `sessions`). Raises `DemoUsageError` for options out
    of bounds (see `check_options`) and for a root the demo may not write to (see the
    module docstring). A `KeyboardInterrupt` stops the workers and is re-raised.
    """
    import multiprocessing

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from loopstore.locations import is_url, open_store

    workers = check_options(workers, sessions, loops, seed, loop_bytes)
    out = console if console is not None else Console()
    url = root is not None and is_url(root)
    root_path: Path | str = str(root) if url else Path(root or DEFAULT_ROOT)
    if isinstance(root_path, Path):
        owned = _prepare_root(root_path, fresh=fresh, add_to_existing=add_to_existing)
    else:
        owned = _prepare_url(root_path, fresh=fresh, add_to_existing=add_to_existing)
    store = open_store(root_path)

    per_worker, session_ids, total_loops = _plan(workers, sessions, loops, seed)
    out.print(
        Text.from_markup(
            f"[bold]loopstore demo[/bold]: {workers} worker processes record {sessions} "
            f"sessions x {loops} loops (~{format_size(loop_bytes)} each) into "
            f"[cyan]{escape(str(root_path))}[/cyan]"
        )
    )
    ctx = multiprocessing.get_context("spawn")
    events_q: Queue[tuple[Any, ...]] = ctx.Queue()
    stop = ctx.Event()
    started = time.perf_counter()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(_WorkerArgs(i, str(root_path), tuple(jobs), loop_bytes), events_q, stop),
            name=f"loopstore-demo-{i}",
        )
        for i, jobs in enumerate(per_worker)
    ]
    try:
        with _sigint_ignored():
            for p in procs:
                p.start()
        recorded, persist_errors, problems = _follow_workers(
            procs, events_q, out, per_worker, total_loops
        )
    except BaseException:
        # Ctrl-C, a closed stdout, anything: stop the workers quietly, then let it through.
        with _sigint_ignored():
            _stop_workers(procs, stop, events_q)
        raise
    with _sigint_ignored():
        terminated = _stop_workers(procs, stop, events_q)
    problems.extend(f"{name} did not exit and was terminated" for name in terminated)
    for i, p in enumerate(procs):
        reported = p.name in terminated or any(x.startswith(f"worker {i} ") for x in problems)
        if p.exitcode not in (0, None) and not reported:
            problems.append(f"{p.name} exited with code {p.exitcode}")
    elapsed = time.perf_counter() - started

    stats = store.stats()
    report = store.verify()
    problems.extend(f"{pr.kind} {pr.session_id} {pr.detail}" for pr in report.problems)

    table = Table(title="store contents", show_header=False, box=None, padding=(0, 2))
    table.add_row("store", str(root_path))
    table.add_row(
        "sessions", f"{stats.sessions} ({len(session_ids)} recorded + sub-agent sessions)"
    )
    table.add_row("loops", f"{stats.loops} ({recorded} main-session loops recorded this run)")
    table.add_row("raw JSON", format_size(stats.raw_bytes))
    table.add_row("stored", format_size(stats.stored_bytes))
    ratio = stats.raw_bytes / stats.stored_bytes if stats.stored_bytes else 0.0
    table.add_row("compression", f"{ratio:.1f}x")
    table.add_row("time", f"{elapsed:.1f} s ({recorded / elapsed if elapsed else 0:.0f} loops/s)")
    out.print(table)

    tree_sid = next((sid for i, sid in enumerate(session_ids) if i % SHARED_EVERY == 0), None)
    if tree_sid is not None and store.exists(tree_sid):
        session = store.load(tree_sid)
        sizes = {lp.loop_id: len(lp.model_dump_json()) for lp in session.loops}
        out.print(loop_tree(session, sizes=sizes))
    if report.ok and not problems:
        out.print(
            Text.from_markup(
                f"[green]verify: OK[/green] ({report.sessions_checked} sessions, "
                f"{report.blobs_checked} blobs checked, 0 problems)"
            )
        )
        if report.orphans:
            out.print(
                Text(
                    f"{len(report.orphans)} superseded blobs (loops rewritten when a later event "
                    "linked them) are reclaimed by `loopstore gc` after its grace period."
                )
            )
    else:
        out.print(Text(f"verify: {len(problems)} problem(s)", style="red"))
        for line in problems:
            out.print(Text(f"  {line}", style="red"))
    if owned and url:
        out.print(Text(f"This store was created by the demo at {root_path}."))
    elif owned:
        out.print(
            Text(
                f"This store was created by the demo ({DEMO_MARKER}): `loopstore --root "
                f"{shlex.quote(str(root_path))} demo --fresh` empties it and starts over."
            )
        )
    else:
        out.print(Text(f"The demo sessions were added to {root_path} (--add-to-existing)."))
    return DemoResult(
        root=root_path,
        workers=workers,
        sessions=stats.sessions,
        loops=stats.loops,
        raw_bytes=stats.raw_bytes,
        stored_bytes=stats.stored_bytes,
        loops_recorded=recorded,
        persist_errors=persist_errors,
        verify_ok=report.ok and not problems,
        problems=problems,
        tree_session_id=tree_sid,
        elapsed_s=elapsed,
        owned=owned,
    )
