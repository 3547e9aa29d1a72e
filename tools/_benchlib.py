"""Shared helpers of tools/bench.py and tools/bench_read.py.

Everything here reaches loopstore through its public API only (the store's methods, the
models, `loopstore.synth`, the `loopstore` command), so the same benchmarks measure
whichever on-disk format the checkout writes.

* workload: realistic `loopstore.synth` loops of 32-800 KB of JSON (median ~246 KB),
  generated before anything is timed and reused under fresh loop ids (so fresh blobs);
* `SqliteStore`: the SQLite baseline, stdlib sqlite3, WAL, `synchronous=FULL`, one
  transaction per append, each loop as zstd level-3 compressed `model_dump_json()` in a
  row keyed (session_id, position) and (session_id, loop_id), plus a header row per
  session (agent, last activity, loop count, stored bytes) that each append maintains,
  as loopstore maintains its session header;
* physical floors: a small file made durable, and a bare fdatasync of a 20 KB append;
* statistics, the environment and the result table shared by both benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydantic
import zstandard

import loopstore
from loopstore.models import LoopRecord, Session, SessionFormation
from loopstore.synth import format_rfc3339_ns, generate_loops, generate_session

ZSTD_LEVEL = 3
LOOP_MIN_BYTES = 32_000
LOOP_MEDIAN_BYTES = 246_000
LOOP_MAX_BYTES = 800_000
POOL_SIZE = 24
BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z


# --------------------------------------------------------------------------- workload


def loop_sizes(count: int) -> list[int]:
    """Target JSON sizes at evenly spaced quantiles (1st..99th) of a skewed log-normal.

    Median LOOP_MEDIAN_BYTES; the 1st and 99th percentiles (the smallest and largest
    loop) at LOOP_MIN_BYTES and LOOP_MAX_BYTES: the spread differs on either side.
    """
    z99 = statistics.NormalDist().inv_cdf(0.99)
    lo = math.log(LOOP_MEDIAN_BYTES / LOOP_MIN_BYTES) / z99
    hi = math.log(LOOP_MAX_BYTES / LOOP_MEDIAN_BYTES) / z99
    out = []
    for i in range(count):
        z = statistics.NormalDist().inv_cdf(0.01 + 0.98 * i / max(1, count - 1))
        size = LOOP_MEDIAN_BYTES * math.exp(z * (lo if z < 0 else hi))
        out.append(int(min(LOOP_MAX_BYTES, max(LOOP_MIN_BYTES, size))))
    return out


def _loop_near(seed: int, target: int) -> LoopRecord:
    """A synth loop whose JSON is within ~10% of `target` (synth alone is within ~20%,
    and now and then a seed yields a much shorter loop: then the next seed is tried)."""
    best: LoopRecord | None = None
    best_err = math.inf
    for variant in range(6):
        ask = target
        for _attempt in range(4):
            lp = generate_loops(seed * 8 + variant, "pool", 1, loop_bytes=ask)[0]
            size = len(lp.model_dump_json())
            err = abs(size - target) / target
            if err < best_err:
                best, best_err = lp, err
            if best is not None and best_err <= 0.1:
                return best
            ask = max(1_000, int(ask * target / size))
    assert best is not None
    return best


def realistic_pool(seed: int, count: int = POOL_SIZE) -> list[LoopRecord]:
    """`count` distinct synth loops spanning the size distribution, in a mixed order."""
    sizes = loop_sizes(count)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [_loop_near(seed * 1000 + k, sizes[i]) for k, i in enumerate(order)]


def small_pool(seed: int, count: int = 8, loop_bytes: int = 1_000) -> list[LoopRecord]:
    """Small synth loops (a few KB to ~20 KB of JSON) for filler loops and listings."""
    return [
        generate_loops(seed * 1000 + k, "pool", 1, loop_bytes=loop_bytes)[0] for k in range(count)
    ]


def fresh_loops(
    pool: Sequence[LoopRecord],
    count: int,
    *,
    session_id: str,
    tag: str,
    start: int = 0,
    agent_id: str | None = None,
) -> list[LoopRecord]:
    """`count` loops cycling through `pool`, each under a fresh loop id (so a fresh blob)."""
    out = []
    for i in range(start, start + count):
        update: dict[str, Any] = {"loop_id": f"{session_id}.{tag}{i}", "session_id": session_id}
        if agent_id is not None:
            update["agent_id"] = agent_id
        out.append(pool[i % len(pool)].model_copy(update=update))
    return out


_TEMPLATE: list[Session] = []


def session_with(
    session_id: str,
    loops: list[LoopRecord],
    *,
    agent_id: str | None = None,
    active_ns: int | None = None,
) -> Session:
    """A session header (from one synth template) holding `loops`."""
    if not _TEMPLATE:
        _TEMPLATE.append(generate_session(1, session_id="template", loops=1, loop_bytes=1_000))
    update: dict[str, Any] = {"session_id": session_id, "loops": list(loops)}
    update["agent_id"] = agent_id or (loops[0].agent_id if loops else _TEMPLATE[0].agent_id)
    if active_ns is not None:
        update["created_at"] = format_rfc3339_ns(active_ns - 3_600 * 10**9)
        update["last_active_at"] = format_rfc3339_ns(active_ns)
    return _TEMPLATE[0].model_copy(update=update)


def json_sizes(loops: Iterable[LoopRecord]) -> list[int]:
    return [len(lp.model_dump_json()) for lp in loops]


def size_summary(sizes: Sequence[int]) -> dict[str, int]:
    return {
        "count": len(sizes),
        "min": min(sizes),
        "median": int(statistics.median(sizes)),
        "max": max(sizes),
        "mean": int(statistics.mean(sizes)),
    }


# --------------------------------------------------------------------------- SQLite


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    last_active_at TEXT NOT NULL,
    n_loops INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    header BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_active ON sessions (last_active_at);
CREATE INDEX IF NOT EXISTS sessions_agent ON sessions (agent_id, last_active_at);
CREATE TABLE IF NOT EXISTS loops (
    session_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    loop_id TEXT NOT NULL,
    raw_size INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (session_id, position),
    UNIQUE (session_id, loop_id)
);
"""


def _header_json(session: Session) -> bytes:
    """The session's header as JSON with an empty loop list (validates as a Session)."""
    return session.model_copy(update={"loops": []}).model_dump_json().encode()


class SqliteStore:
    """The SQLite baseline: what loopstore does, in one WAL database.

    An append is one `BEGIN IMMEDIATE` transaction: serialize the loop
    (`model_dump_json`), compress it (zstd level 3), insert it at the next position
    (or replace the row with the same loop id, as `append_loop` does), and update the
    session row (last activity, loop count, stored bytes), creating it with the header
    phi-core's recorder writes for a first loop if the session is new.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 600.0) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=timeout, check_same_thread=False
        )
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.dctx = zstandard.ZstdDecompressor()

    def create_schema(self) -> None:
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # -- writes

    def append(self, session_id: str, loop: LoopRecord) -> None:
        raw = loop.model_dump_json().encode()
        data = self.cctx.compress(raw)
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute(
                "SELECT LENGTH(data) FROM loops WHERE session_id = ? AND loop_id = ?",
                (session_id, loop.loop_id),
            ).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO loops (session_id, position, loop_id, raw_size, data)"
                    " SELECT ?, COALESCE(MAX(position), -1) + 1, ?, ?, ? FROM loops"
                    " WHERE session_id = ?",
                    (session_id, loop.loop_id, len(raw), data, session_id),
                )
                added, delta = 1, len(data)
            else:
                c.execute(
                    "UPDATE loops SET data = ?, raw_size = ? WHERE session_id = ? AND loop_id = ?",
                    (data, len(raw), session_id, loop.loop_id),
                )
                added, delta = 0, len(data) - row[0]
            cur = c.execute(
                "UPDATE sessions SET last_active_at = max(last_active_at, ?),"
                " n_loops = n_loops + ?, stored_bytes = stored_bytes + ? WHERE session_id = ?",
                (loop.started_at, added, delta, session_id),
            )
            if cur.rowcount == 0:
                header = Session(
                    session_id=session_id,
                    agent_id=loop.agent_id,
                    created_at=loop.started_at,
                    last_active_at=loop.started_at,
                    formation=SessionFormation.first_loop(loop.started_at),
                    loops=[],
                )
                c.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                    (session_id, loop.agent_id, loop.started_at, 1, delta, _header_json(header)),
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def save_many(self, sessions: Iterable[Session]) -> None:
        """Bulk build (not timed): every session in one transaction."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        for s in sessions:
            rows = []
            stored = 0
            for pos, lp in enumerate(s.loops):
                raw = lp.model_dump_json().encode()
                data = self.cctx.compress(raw)
                stored += len(data)
                rows.append((s.session_id, pos, lp.loop_id, len(raw), data))
            c.execute("DELETE FROM loops WHERE session_id = ?", (s.session_id,))
            c.executemany("INSERT INTO loops VALUES (?, ?, ?, ?, ?)", rows)
            c.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (s.session_id, s.agent_id, s.last_active_at, len(rows), stored, _header_json(s)),
            )
        c.execute("COMMIT")

    # -- reads (each in one read transaction: a consistent snapshot, as loopstore gives)

    def load(self, session_id: str) -> Session:
        c = self.conn
        c.execute("BEGIN")
        try:
            (header,) = c.execute(
                "SELECT header FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            rows = c.execute(
                "SELECT data FROM loops WHERE session_id = ? ORDER BY position", (session_id,)
            ).fetchall()
        finally:
            c.execute("COMMIT")
        session = Session.model_validate_json(header)
        dec = self.dctx.decompress
        session.loops.extend(LoopRecord.model_validate_json(dec(d)) for (d,) in rows)
        return session

    def load_header_and_loop(self, session_id: str, position: int) -> tuple[Session, LoopRecord]:
        c = self.conn
        c.execute("BEGIN")
        try:
            (header,) = c.execute(
                "SELECT header FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            (data,) = c.execute(
                "SELECT data FROM loops WHERE session_id = ? AND position = ?",
                (session_id, position),
            ).fetchone()
        finally:
            c.execute("COMMIT")
        return (
            Session.model_validate_json(header),
            LoopRecord.model_validate_json(self.dctx.decompress(data)),
        )

    def load_loop(self, session_id: str, loop_id: str) -> LoopRecord:
        (data,) = self.conn.execute(
            "SELECT data FROM loops WHERE session_id = ? AND loop_id = ?", (session_id, loop_id)
        ).fetchone()
        return LoopRecord.model_validate_json(self.dctx.decompress(data))

    def list_ids(self) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT session_id FROM sessions ORDER BY last_active_at DESC"
            ).fetchall()
        ]

    def list_for_agent(self, agent_id: str) -> list[Session]:
        ids = self.conn.execute(
            "SELECT session_id FROM sessions WHERE agent_id = ? ORDER BY last_active_at DESC",
            (agent_id,),
        ).fetchall()
        return [self.load(sid) for (sid,) in ids]

    def count_loops(self, session_id: str) -> int:
        (n,) = self.conn.execute(
            "SELECT COUNT(*) FROM loops WHERE session_id = ?", (session_id,)
        ).fetchone()
        return int(n)


# A `ls --limit 20` of the SQLite baseline, run as its own process like `loopstore ls`.
SQLITE_LS_SCRIPT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
agent = sys.argv[2] if len(sys.argv) > 2 else None
cols = "session_id, agent_id, n_loops, last_active_at, stored_bytes"
if agent is None:
    rows = conn.execute(f"SELECT {cols} FROM sessions ORDER BY last_active_at DESC LIMIT 20")
else:
    rows = conn.execute(
        f"SELECT {cols} FROM sessions WHERE agent_id = ? ORDER BY last_active_at DESC LIMIT 20",
        (agent,),
    )
for r in rows:
    print("  ".join(str(x) for x in r))
"""


# --------------------------------------------------------------------------- timing


def settle() -> None:
    """Flush earlier writes so they are not billed to the first timed fsyncs."""
    os.sync()
    time.sleep(0.2)


def cpu_seconds() -> float:
    """User + system time of this process so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def interleaved(
    fns: Sequence[Callable[[], Any]], reps: int, *, warmup: int = 1
) -> list[list[float]]:
    """Run each fn `reps` times, round robin (order rotated each round): a shared,
    noisy machine then slows every contender alike. Returns seconds per fn."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        order = list(range(len(fns)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            out[i].append(timed(fns[i]))
    return out


# --------------------------------------------------------------------------- floors


def floor_durable_small_file(directory: Path, reps: int, size: int = 2_048) -> list[float]:
    """tmp write + fsync + rename + directory fsync of a small file: one durable file."""
    directory.mkdir(parents=True, exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    payload = os.urandom(size)
    times = []
    try:
        for i in range(reps):
            t0 = time.perf_counter()
            tmp = directory / f"f.{i}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, directory / "f")
            os.fsync(dfd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(dfd)
    return times


def floor_fdatasync_append(path: Path, reps: int, size: int = 20_000) -> list[float]:
    """write(20 KB) at the end of an existing file + fdatasync: one journal record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    payload = os.urandom(size)
    sync = getattr(os, "fdatasync", os.fsync)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    times = []
    try:
        sync(fd)
        for _ in range(reps):
            t0 = time.perf_counter()
            os.write(fd, payload)
            sync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return times


# --------------------------------------------------------------------------- environment


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (Linux /proc/self/mounts, else stat)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
        return kind
    except OSError:
        pass
    for cmd in (["stat", "-f", "-c", "%T", real], ["stat", "-f", "%T", real]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=5)
            return out.stdout.strip() or kind
        except (OSError, subprocess.SubprocessError):
            continue
    return kind


def environment(bench_dir: Path) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "bench_dir": str(bench_dir),
        "fs_type": fs_type(bench_dir),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "zstandard": zstandard.__version__,
        "pydantic": pydantic.VERSION,
        "loopstore": getattr(loopstore, "__version__", "?"),
        "loopstore_path": str(Path(loopstore.__file__).parent),
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages: other work on a shared machine shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment_line(env: dict[str, Any]) -> str:
    return (
        f"env: {env['cpu_count']} CPUs; bench dir {env['bench_dir']} on {env['fs_type']};"
        f" Python {env['python']}; SQLite {env['sqlite']}; zstandard {env['zstandard']};"
        f" pydantic {env['pydantic']}; {env['platform']}\n"
        f"loopstore {env['loopstore']} from {env['loopstore_path']};"
        f" load average {' '.join(map(str, env['loadavg_start']))}"
    )


_T0 = time.monotonic()


def say(text: str) -> None:
    """Progress on stderr, with seconds since start."""
    print(f"[{time.monotonic() - _T0:5.0f} s] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the result table; `value`/`baseline` in `unit`, ratio = value/baseline."""

    key: str
    measure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    display: str = ""  # shown instead of the formatted value
    base_display: str = ""  # shown instead of the formatted baseline

    def result(self) -> str:
        if self.value is None:
            return "n/a"
        if self.met is None:
            return "info"
        return "met" if self.met else "NOT MET"


def compare(
    key: str,
    measure: str,
    value: float | None,
    baseline: float | None,
    *,
    unit: str = "s",
    label: str = "SQLite",
    op: str = "",
    goal: float = 0.0,
    target: str = "",
    **more: Any,
) -> Row:
    """A row judged by value/baseline `op` `goal` (op "" = information only)."""
    r = ratio_of(value, baseline)
    met = check(r, op, goal) if op else None
    text = target or (f"{op} {goal:g}x" if op else "info")
    return Row(key, measure, value, unit, baseline, label, r, text, met, **more)


def ratio_of(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0 or math.isnan(value):
        return None
    return value / baseline


def check(ratio: float | None, op: str, goal: float) -> bool | None:
    if ratio is None or math.isnan(ratio):
        return None
    return ratio <= goal if op == "<=" else ratio >= goal


def fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "s":  # seconds, shown in ms below 1 s
        if value < 0.1:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "/s":
        return f"{value:.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:g} {unit}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None or math.isnan(ratio):
        return ""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"1/{1 / ratio:.0f}"


def render(rows: Sequence[Row]) -> str:
    head = ("#", "measure", "loopstore", "baseline", "ratio", "target", "result")
    cells = []
    for r in rows:
        base = r.base_display or (fmt(r.baseline, r.unit) if r.baseline is not None else "")
        if base and r.baseline_label:
            base = f"{base} ({r.baseline_label})"
        cells.append(
            (
                r.key,
                r.measure,
                r.display or fmt(r.value, r.unit),
                base,
                fmt_ratio(r.ratio),
                r.target,
                r.result(),
            )
        )
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    line = "|" + "|".join("-" * (x + 2) for x in w) + "|"
    out = ["| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cell)) + " |" for cell in cells]
    return "\n".join(out)


def summary(rows: Sequence[Row]) -> str:
    judged = [r for r in rows if r.met is not None]
    if not judged:
        return "no targets (information only)"
    met = sum(1 for r in judged if r.met)
    return f"{met}/{len(judged)} targets met"


def document(
    name: str, env: dict[str, Any], config: dict[str, Any], rows: Sequence[Row], **details: Any
) -> dict[str, Any]:
    return {
        "benchmark": name,
        "environment": env,
        "config": config,
        "rows": [{**asdict(r), "result": r.result()} for r in rows],
        "details": details,
    }


def report(
    name: str,
    env: dict[str, Any],
    config: dict[str, Any],
    rows: Sequence[Row],
    details: dict[str, Any],
    seconds: float,
    json_path: Path | None,
) -> None:
    """Print the table, the targets met, the time and the load at the end; write the
    JSON document when asked."""
    print(render(rows))
    env["loadavg_end"] = loadavg()
    load = " ".join(map(str, env["loadavg_end"]))
    print(f"{summary(rows)}; {seconds:.0f} s in all; load average at the end {load}")
    if json_path:
        write_json(json_path, document(name, env, config, rows, seconds=seconds, **details))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(doc), indent=2) + "\n", encoding="utf-8")
