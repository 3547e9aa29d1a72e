"""Shared pieces of the stress suite: configuration, ack logs, loop building, result records.

Every scenario checks the store against what its workers *acknowledged*: a write counts only
once its call returned. Workers append one JSON line per event to a per-thread log file and
flush it before doing anything else, so the log of a SIGKILLed worker is still complete up to
its last flushed line (SIGKILL loses no data already handed to the kernel; no fsync needed
because the machine itself does not crash).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AGENT_ID = "agent-stress"
LOOP_TEXT_BYTES = 1_500
"""Payload per synthetic loop: small, so the suite measures locking and commits, not zstd."""
POLL_FILE_S = 0.005
"""How often workers poll a coordination file (go / release markers)."""
STARTUP_TIMEOUT_S = 120.0
"""Spawned workers on a loaded 2-core machine can take many seconds to import; be generous."""
GO_TIMEOUT_S = 300.0
"""How long a ready worker waits for the start signal before it gives up quietly."""


@dataclass
class Config:
    """Options of one run (the CLI fills it)."""

    processes: int = 3
    threads: int = 2
    seconds: float = 8.0
    seed: int = 0
    root: Path = Path(".")
    quick: bool = False
    lock_timeout: float = 5.0
    lock_poll_interval: float = 0.05
    durable: bool = True
    kill_rounds: int = 8
    retry_budget_s: float = 1.0
    retry_slack_s: float = 0.5
    fault_rate: float = 0.03

    def rng(self, salt: str) -> random.Random:
        return random.Random(f"{self.seed}:{salt}")

    def store_kwargs(self) -> dict[str, Any]:
        return {
            "lock_timeout": self.lock_timeout,
            "lock_poll_interval": self.lock_poll_interval,
            "durable": self.durable,
        }


# ---------------------------------------------------------------- store access


def open_store(root: Path, **kwargs: Any) -> Any:
    """Open the store under test (imported lazily so `--help` works without it)."""
    from loopstore.store import FileSystemSessionStore

    install_lock_timer()
    return FileSystemSessionStore(root, **kwargs)


def error_kind(exc: BaseException) -> str:
    """Short name of an exception for the failure tables."""
    name = type(exc).__name__
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        import errno

        name += f"({errno.errorcode.get(cause.errno, cause.errno)})"
    return name


# ---------------------------------------------------------------- loops and sessions


_TEMPLATE: dict[str, Any] | None = None


def _template() -> dict[str, Any]:
    """One small synthetic loop (phi-core JSON), built once per process from loopstore.synth."""
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _build_template()
    return _TEMPLATE


def _build_template() -> dict[str, Any]:
    try:
        from loopstore import synth

        loops = synth.generate_loops(
            7, "template", 1, agent_id=AGENT_ID, loop_bytes=LOOP_TEXT_BYTES
        )
    except ImportError:  # loopstore.synth (or a module it needs) not there yet
        return _fallback_loop_dict()
    data: dict[str, Any] = loops[0].model_dump(mode="json")
    return data


def _fallback_loop_dict() -> dict[str, Any]:
    """A minimal phi-core loop, used only until loopstore.synth exists."""
    ts = "2026-01-01T00:00:00.000000001Z"
    return {
        "loop_id": "template",
        "session_id": "template",
        "agent_id": AGENT_ID,
        "parent_loop_id": None,
        "continuation_kind": "Initial",
        "started_at": ts,
        "ended_at": ts,
        "status": "Completed",
        "rejection": None,
        "config": None,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x" * LOOP_TEXT_BYTES}],
                "timestamp": 1767225600000,
            }
        ],
        "turns": [],
        "usage": {
            "input": 1,
            "output": 1,
            "reasoning": 0,
            "cache_read": 0,
            "cache_write": 0,
            "total_tokens": 2,
        },
        "metadata": {},
        "events": [],
        "children_loop_ids": [],
        "child_loop_refs": [],
        "parallel_group": None,
    }


def make_loop(session_id: str, loop_id: str, tag: str, counter: int | None = None) -> Any:
    """A LoopRecord with a unique id; `tag` (in metadata) identifies this exact version."""
    from loopstore.models import LoopRecord

    data = dict(_template())
    data["loop_id"] = loop_id
    data["session_id"] = session_id
    data["parent_loop_id"] = None
    data["agent_id"] = AGENT_ID
    data["continuation_kind"] = "Initial"
    meta: dict[str, Any] = {"stress_tag": tag}
    if counter is not None:
        meta["stress_counter"] = counter
    data["metadata"] = meta
    return LoopRecord.model_validate(data)


def make_session(session_id: str, loops: list[tuple[str, str]]) -> Any:
    """A Session with the given (loop_id, tag) loops."""
    from loopstore.models import Session

    ts = _template()["started_at"]
    header = {
        "session_id": session_id,
        "agent_id": AGENT_ID,
        "created_at": ts,
        "last_active_at": ts,
        "formation": {"FirstLoop": {"timestamp": ts}},
        "parent_spawn_ref": None,
        "scope": "ephemeral",
        "loops": [],
    }
    header["loops"] = [make_loop(session_id, lid, tag) for lid, tag in loops]
    return Session.model_validate(header)


def _meta(loop: Any) -> dict[str, Any]:
    meta = getattr(loop, "metadata", None)
    if isinstance(meta, dict):
        return meta
    if meta is None:
        return {}
    dumped = loop.model_dump(mode="json").get("metadata") or {}
    assert isinstance(dumped, dict)
    return dumped


def loop_tag(loop: Any) -> str | None:
    tag = _meta(loop).get("stress_tag")
    return tag if isinstance(tag, str) else None


def loop_counter(loop: Any) -> int:
    value = _meta(loop).get("stress_counter", 0)
    return int(value)


def append_in(loop: Any, session: Any) -> Any:
    """An `update()` function: append `loop` to the session."""
    session.loops.append(loop)
    return session


def session_state(session: Any) -> list[tuple[str, str | None]]:
    """What the checks compare: the ordered (loop_id, tag) pairs of a session."""
    return [(lp.loop_id, loop_tag(lp)) for lp in session.loops]


# ---------------------------------------------------------------- ack logs


class AckLog:
    """Append-only JSON-lines log of one worker thread; every line is flushed before use."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Parse a log; a torn last line (a writer killed mid-write) is dropped, nothing else is."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    # The part after the last newline is either b"" or a torn line whose write never finished:
    # the event it would have recorded did not complete from the log's point of view.
    complete = lines[:-1]
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(complete):
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"{path}: line {i + 1} is damaged but not last: {raw!r}") from exc
    return out


def read_logs(directory: Path, pattern: str = "*.log") -> dict[str, list[dict[str, Any]]]:
    return {p.stem: read_log(p) for p in sorted(directory.glob(pattern))}


@dataclass
class OpRecord:
    """One operation reconstructed from begin / end lines."""

    writer: str
    n: int
    op: str
    args: dict[str, Any]
    outcome: str
    """'ack' (returned), 'fail' (raised), or 'unknown' (begun, never finished: worker killed)."""
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def ops_from_log(writer: str, lines: list[dict[str, Any]]) -> list[OpRecord]:
    """Pair each 'begin' with its 'ack' / 'fail'; a begin without an end is 'unknown'."""
    ops: list[OpRecord] = []
    open_op: OpRecord | None = None
    for line in lines:
        kind = line.get("k")
        if kind == "begin":
            if open_op is not None:
                raise RuntimeError(f"{writer}: op {open_op.n} never ended but {line['n']} began")
            open_op = OpRecord(writer, line["n"], line["op"], line.get("a", {}), "unknown")
        elif kind in ("ack", "fail"):
            if open_op is None or open_op.n != line["n"]:
                raise RuntimeError(f"{writer}: end of op {line.get('n')} without its begin")
            open_op.outcome = kind
            open_op.error = line.get("err")
            open_op.detail = line.get("d", {})
            ops.append(open_op)
            open_op = None
    if open_op is not None:
        ops.append(open_op)
    return ops


_lock_waits = threading.local()


def install_lock_timer() -> None:
    """Time every wait for a session in this process (loopstore.faults.observe_lock_waits).

    The time an op spent waiting for its session (the lock, or a group-commit holder) is
    then logged next to its outcome, which is what the "lock waits" column reports.
    """
    from loopstore import faults

    def note(session_id: str, seconds: float) -> None:
        waits = getattr(_lock_waits, "waits", None)
        if waits is not None:
            waits.append(seconds)

    faults.observe_lock_waits(note)


def _take_lock_wait() -> float | None:
    waits: list[float] | None = getattr(_lock_waits, "waits", None)
    _lock_waits.waits = []
    return round(sum(waits), 6) if waits else None


class OpLogger:
    """Writes begin / end lines around each store call and keeps latency samples."""

    def __init__(self, log: AckLog) -> None:
        self.log = log
        self.n = 0
        self.latencies: dict[str, list[float]] = {}

    def begin(self, op: str, **args: Any) -> tuple[int, float]:
        self.n += 1
        self.log.write(k="begin", n=self.n, op=op, a=args)
        _lock_waits.waits = []
        return self.n, time.monotonic()

    def ack(self, n: int, op: str, t0: float, **detail: Any) -> None:
        dt = time.monotonic() - t0
        self.latencies.setdefault(op, []).append(dt)
        self.log.write(k="ack", n=n, d=detail, dt=round(dt, 6), lw=_take_lock_wait())

    def fail(self, n: int, op: str, t0: float, exc: BaseException, **detail: Any) -> None:
        dt = time.monotonic() - t0
        detail.setdefault("injected", injected(exc))
        self.log.write(
            k="fail",
            n=n,
            err=error_kind(exc),
            msg=str(exc)[:300],
            d=detail,
            dt=dt,
            lw=_take_lock_wait(),
        )

    def call(self, op: str, fn: Callable[[], Any], **args: Any) -> bool:
        """Log begin, run `fn`, log ack or fail (an Exception is logged, not raised)."""
        n, t0 = self.begin(op, **args)
        try:
            fn()
        except Exception as exc:
            self.fail(n, op, t0, exc)
            return False
        self.ack(n, op, t0)
        return True

    def violation(self, text: str) -> None:
        self.log.write(k="violation", text=text)


def injected(exc: BaseException) -> bool:
    """Whether an exception was caused by an injected fault: through its chain, or, for an
    append a group-commit holder in another process committed, by the cause it reported
    (an injected fault's text starts with "injected")."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ == "InjectedFault":
            return True
        cur = cur.__cause__ or cur.__context__
    return type(exc).__name__ == "StorageError" and ": injected " in str(exc)


def violations_in(logs: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [
        f"{w}: {ln['text']}"
        for w, lines in logs.items()
        for ln in lines
        if ln.get("k") == "violation"
    ]


def lock_waits_in(logs: dict[str, list[dict[str, Any]]]) -> list[float]:
    return [float(ln["lw"]) for lines in logs.values() for ln in lines if ln.get("lw") is not None]


def latencies_in(logs: dict[str, list[dict[str, Any]]]) -> list[float]:
    return [float(ln["dt"]) for lines in logs.values() for ln in lines if ln.get("k") == "ack"]


# ---------------------------------------------------------------- coordination files


def wait_for(path: Path, timeout: float, *, poll: float = POLL_FILE_S) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def touch(path: Path, text: str = "") -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- worker processes


def ready_then_wait_for_go(spec: dict[str, Any]) -> float | None:
    """Say this worker is ready, wait for the go marker; the run's deadline, or None if no go."""
    touch(Path(spec["logdir"]) / f"{spec['name']}.ready")
    if spec.get("go") and not wait_for(Path(spec["go"]), GO_TIMEOUT_S):
        return None
    return time.monotonic() + float(spec["seconds"])


def thread_identity(spec: dict[str, Any], t: int) -> tuple[str, random.Random, Path]:
    """Name, seeded rng and log path of thread `t` of a worker process."""
    who = f"{spec['name']}t{t}"
    return who, random.Random(f"{spec['seed']}:{who}"), Path(spec["logdir"]) / f"{who}.log"


def worker_threads(
    spec: dict[str, Any],
    target: Callable[[Any, Path, str, random.Random, float], None],
    stores: list[Any],
    deadline: float,
) -> list[threading.Thread]:
    """One (unstarted) thread per `spec["threads"]`: target(store, log, who, rng, deadline)."""
    ths = []
    for t in range(spec["threads"]):
        who, rng, log = thread_identity(spec, t)
        ths.append(threading.Thread(target=target, args=(stores[t], log, who, rng, deadline)))
    return ths


def start_and_join(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_threads(
    spec: dict[str, Any],
    target: Callable[[Any, Path, str, random.Random, float], None],
    stores: list[Any],
    *,
    extra: Callable[[float], None] | None = None,
) -> None:
    """Worker process body: say ready, wait for go, run the threads and `extra(deadline)`."""
    deadline = ready_then_wait_for_go(spec)
    if deadline is None:
        return
    ths = worker_threads(spec, target, stores, deadline)
    if extra is not None:
        ths.append(threading.Thread(target=extra, args=(deadline,)))
    start_and_join(ths)


# ---------------------------------------------------------------- results


def summarize(samples: list[float]) -> dict[str, float] | None:
    """min / median / p99 / max of a list of seconds (None when empty)."""
    if not samples:
        return None
    s = sorted(samples)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * len(s)) - 1))]
    return {
        "n": len(s),
        "min": s[0],
        "median": statistics.median(s),
        "p99": p99,
        "max": s[-1],
    }


@dataclass
class ScenarioResult:
    name: str
    ops: int = 0
    acknowledged: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latency: dict[str, float] | None = None
    lock_waits: dict[str, float] | None = None
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.acknowledged / self.seconds if self.seconds > 0 else 0.0

    def count_failure(self, kind: str, n: int = 1) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + n

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput_per_s"] = round(self.throughput, 2)
        data["ok"] = not self.violations
        return data
