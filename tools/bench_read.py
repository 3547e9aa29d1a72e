"""Read-path benchmark: loopstore against SQLite and the physical floor, in one run.

    python tools/bench_read.py [--quick | --long] [--json FILE] [--dir DIR]

Everything goes through loopstore's public API and the `loopstore` command. Issue
targets in brackets:

1. `load()` of a 100-loop session into models vs SQLite rows + one
   `LoopRecord.model_validate_json` per loop [<= 0.8x]; and "header + one loop":
   `store.load(sid, lazy=True).loops[k]` vs SQLite header row + one row + model
   [moonshot <= 0.3x]
2. `load_loop()` vs SQLite one row + model [<= 1.0x]
3. raw JSON: `store.load_json(sid) -> bytes` and `store.iter_loop_json(sid)` (v2 API;
   "n/a (API not present)" when the store has no such attribute) vs the physical cost
   of reading the same zstd blobs from one file and decompressing them
4. listings at 1,000 and 10,000 sessions (--long: also 100,000) of 1-3 small loops,
   stores built with durable=False: `list_ids()`, `list_for_agent(A)` (A has 10
   sessions), and `loopstore ls --limit 20` / `loopstore ls --agent A --limit 20` as
   subprocesses (wall time); each run once first (warm) [<= 50 ms, and <= 3x the
   1,000-session figure]; baseline: the same from SQLite (`SELECT ... ORDER BY`, the
   subprocess rows as a `python -c` script doing the query); these subprocesses share a
   bytecode cache in the scratch dir (PYTHONPYCACHEPREFIX, PYTHONDONTWRITEBYTECODE
   dropped), which the warm-up run fills, as pip's compile at install does
5. peak RSS of `loopstore stats`, `verify`, `gc --dry-run`, `backup DEST` and
   `export-legacy --all DIR`, each in a fresh process (getrusage maxrss of the child,
   read by a fresh wrapper process), with their wall times [must not grow with the
   store: <= 1.2x of the 1,000-session figure]

Workload: `loopstore.synth` loops of 32-800 KB of JSON (median ~240 KB) for rows 1-3,
small synth loops (15-25 KB) for listings. Timings alternate between loopstore and the
baseline and report medians (the reference machine is a noisy, shared 2-core VM).
On that VM --quick takes about 3.5 minutes, most of it `backup` and `export-legacy --all`
of the 10,000-session store; --long adds the 100,000-session store (build and
commands: several times that again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zstandard

import _benchlib as bl
from loopstore import FileSystemSessionStore
from loopstore.models import LoopRecord, Session

SESSION_LOOPS = 100
AGENT_A_SESSIONS = 10
RSS_GOAL = 1.2
LIST_GOAL_S = 0.050
LIST_GROWTH = 3.0


# --------------------------------------------------------------------------- 1-3. one session


def _consume(item: Any) -> int:
    """Bytes in one item an iterator of loop JSON yields (bytes, str, or a tuple of them)."""
    if isinstance(item, (bytes, bytearray, memoryview, str)):
        return len(item)
    if isinstance(item, tuple):
        return sum(_consume(x) for x in item if isinstance(x, (bytes, bytearray, str)))
    raise TypeError(f"iter_loop_json yielded {type(item).__name__}")


def bench_session(base: Path, quick: bool) -> dict[str, Any]:
    pool = bl.realistic_pool(1)
    sid = "read-100"
    loops = bl.fresh_loops(pool, SESSION_LOOPS, session_id=sid, tag="r")
    session = bl.session_with(sid, loops)
    with FileSystemSessionStore(base / "ls-read", durable=False) as fast:
        fast.save(session)
    db = bl.SqliteStore(base / "read.sqlite")
    db.create_schema()
    db.save_many([session])
    # The physical floor: the same zstd frames (level 3, content size in the frame
    # header, as loopstore writes them) back to back in one file.
    cctx = zstandard.ZstdCompressor(level=bl.ZSTD_LEVEL)
    frames = [cctx.compress(lp.model_dump_json().encode()) for lp in loops]
    header_json = session.model_copy(update={"loops": []}).model_dump_json().encode()
    frames_path = base / "frames.bin"
    frames_path.write_bytes(b"".join(frames))
    spans = []
    off = 0
    for fr in frames:
        spans.append((off, len(fr)))
        off += len(fr)
    raw_total = sum(len(lp.model_dump_json()) for lp in loops)
    bl.settle()

    store = FileSystemSessionStore(base / "ls-read")
    dctx = zstandard.ZstdDecompressor()

    def floor_iter() -> Iterator[bytes]:
        with open(frames_path, "rb") as f:
            buf = memoryview(f.read())
        for o, n in spans:
            yield dctx.decompress(buf[o : o + n])

    def floor_doc() -> bytes:
        parts = [header_json[:-2]]  # the header ends with `[]}`
        for i, raw_loop in enumerate(floor_iter()):
            parts.append(b"," if i else b"")
            parts.append(raw_loop)
        parts.append(b"]}")
        return b"".join(parts)  # one copy into the result, as any bytes API must do

    assert header_json.endswith(b"[]}")
    assert json.loads(floor_doc())["loops"][0]["loop_id"] == loops[0].loop_id

    reps = 5 if quick else 11
    ids = [lp.loop_id for lp in loops]
    ks = iter(range(10**9))

    def next_k() -> int:
        return (next(ks) * 37) % SESSION_LOOPS

    def ls_load() -> None:
        assert len(store.load(sid).loops) == SESSION_LOOPS

    def sq_load() -> None:
        assert len(db.load(sid).loops) == SESSION_LOOPS

    def ls_one() -> None:
        k = next_k()
        session = store.load(sid, lazy=True)  # the header now, a loop when touched
        assert session.agent_id and session.loops[k].loop_id == ids[k]

    def sq_one() -> None:
        k = next_k()
        assert db.load_header_and_loop(sid, k)[1].loop_id == ids[k]

    def ls_loop() -> None:
        k = next_k()
        assert store.load_loop(sid, ids[k]).loop_id == ids[k]

    def sq_loop() -> None:
        k = next_k()
        assert db.load_loop(sid, ids[k]).loop_id == ids[k]

    out: dict[str, Any] = {
        "loops": SESSION_LOOPS,
        "raw_json_bytes": raw_total,
        "stored_bytes": sum(len(f) for f in frames),
    }
    bl.say("1. load() and header + one loop")
    t_load = bl.interleaved([ls_load, sq_load], reps)
    t_one = bl.interleaved([ls_one, sq_one], reps * 2)
    bl.say("2. load_loop()")
    t_loop = bl.interleaved([ls_loop, sq_loop], 30 if quick else 200)
    out["load"] = {"loopstore_s": bl.median(t_load[0]), "sqlite_s": bl.median(t_load[1])}
    out["header_one"] = {"loopstore_s": bl.median(t_one[0]), "sqlite_s": bl.median(t_one[1])}
    out["load_loop"] = {"loopstore_s": bl.median(t_loop[0]), "sqlite_s": bl.median(t_loop[1])}

    bl.say("3. raw JSON paths")
    raw: dict[str, Any] = {}
    floor_reps = reps * 2
    t_floor = bl.interleaved([floor_doc, lambda: sum(len(b) for b in floor_iter())], floor_reps)
    raw["floor_doc_s"] = bl.median(t_floor[0])
    raw["floor_iter_s"] = bl.median(t_floor[1])
    load_json: Callable[[str], Any] | None = getattr(store, "load_json", None)
    iter_loop_json: Callable[[str], Any] | None = getattr(store, "iter_loop_json", None)
    raw["load_json_present"] = hasattr(store, "load_json")
    raw["iter_loop_json_present"] = hasattr(store, "iter_loop_json")
    if load_json is not None:
        doc = load_json(sid)
        assert json.loads(doc)["loops"][-1]["loop_id"] == ids[-1]
        raw["load_json_s"] = bl.median(bl.interleaved([lambda: load_json(sid)], floor_reps)[0])
    if iter_loop_json is not None:
        assert sum(_consume(x) for x in iter_loop_json(sid)) >= raw_total

        def it() -> None:
            sum(_consume(x) for x in iter_loop_json(sid))

        raw["iter_loop_json_s"] = bl.median(bl.interleaved([it], floor_reps)[0])
    out["raw"] = raw
    store.close()
    db.close()
    return out


# --------------------------------------------------------------------------- 4-5. stores


_SMALL: list[LoopRecord] = []


def listing_session(i: int, count: int) -> Session:
    """Session i of a listing store of `count`: 1-3 small loops; agents of 10 sessions each."""
    if not _SMALL:
        _SMALL.extend(bl.small_pool(3))
    sid = f"sess-{i:07d}"
    agent = agent_of(i, count)
    loops = bl.fresh_loops(_SMALL, 1 + i % 3, session_id=sid, tag="l", start=i, agent_id=agent)
    # Recency order differs from id order (7919 is prime, so this permutes 0..count-1).
    active = bl.BASE_NS + ((i * 7919) % count) * 60 * 10**9
    return bl.session_with(sid, loops, agent_id=agent, active_ns=active)


def agent_of(i: int, count: int) -> str:
    return f"agent-{i % (count // AGENT_A_SESSIONS):06d}"


def _build_slice(root: str, count: int, lo: int, hi: int) -> int:
    with FileSystemSessionStore(root, durable=False) as store:
        for i in range(lo, hi):
            store.save(listing_session(i, count))
    return hi - lo


def build_listing(base: Path, count: int) -> tuple[Path, Path, float]:
    """A loopstore store and an equivalent SQLite database of `count` small sessions."""
    root = base / f"store-{count}"
    FileSystemSessionStore(root, durable=False).close()
    t0 = time.perf_counter()
    workers = max(1, min(4, os.cpu_count() or 1))
    step = -(-count // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        futs = [
            ex.submit(_build_slice, str(root), count, lo, min(count, lo + step))
            for lo in range(0, count, step)
        ]
        assert sum(f.result() for f in futs) == count
    built = time.perf_counter() - t0
    db_path = base / f"store-{count}.sqlite"
    db = bl.SqliteStore(db_path)
    db.create_schema()
    db.save_many(listing_session(i, count) for i in range(count))
    db.close()
    bl.settle()
    return root, db_path, built


def loopstore_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "loopstore"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from loopstore.cli import main; sys.exit(main())"]


def _env(pycache: Path | None = None) -> dict[str, str]:
    """The children's environment; with `pycache`, bytecode is written to and read from there."""
    env = {**os.environ, "NO_COLOR": "1"}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def run_wall(cmd: list[str], pycache: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(pycache))
    t = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} exited {p.returncode}: {p.stderr.decode()[-400:]}")
    return t


_RSS_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
kb = ru.ru_maxrss / 1024 if sys.platform == "darwin" else ru.ru_maxrss
print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kb": kb,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "stderr": p.stderr.decode()[-400:]}))
"""


def peak_rss(cmd: list[str]) -> dict[str, Any]:
    """Peak RSS and wall time of `cmd`, the only child of a fresh wrapper process."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, *cmd],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    res: dict[str, Any] = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd} exited {res['rc']}: {res['stderr']}")
    res["rss_mb"] = res["maxrss_kb"] / 1024
    return res


def bench_listing(base: Path, count: int, quick: bool) -> dict[str, Any]:
    bl.say(f"4. listing store of {count:,} sessions: building")
    root, db_path, built = build_listing(base, count)
    bl.say(f"  built in {built:.1f} s (durable=False save, {min(4, os.cpu_count() or 1)} procs)")
    agent = agent_of(7, count)
    store = FileSystemSessionStore(root)
    db = bl.SqliteStore(db_path)
    reps = 3 if quick else 5
    ids = store.list_ids()
    assert len(ids) == count and ids == db.list_ids(), "both list the same, newest first"
    assert len(store.list_for_agent(agent)) == AGENT_A_SESSIONS

    def ls_ids() -> None:
        store.list_ids()

    def sq_ids() -> None:
        db.list_ids()

    def ls_agent() -> None:
        store.list_for_agent(agent)

    def sq_agent() -> None:
        db.list_for_agent(agent)

    ls = [*loopstore_cmd(), "--root", str(root), "ls", "--limit", "20"]
    ls_a = [*loopstore_cmd(), "--root", str(root), "ls", "--agent", agent, "--limit", "20"]
    sq = [sys.executable, "-c", bl.SQLITE_LS_SCRIPT, str(db_path)]
    sq_a = [*sq, agent]
    out: dict[str, Any] = {"sessions": count, "build_s": built}
    t = bl.interleaved([ls_ids, sq_ids], reps)
    out["list_ids"] = {"loopstore_s": bl.median(t[0]), "sqlite_s": bl.median(t[1])}
    t = bl.interleaved([ls_agent, sq_agent], reps)
    out["list_for_agent"] = {"loopstore_s": bl.median(t[0]), "sqlite_s": bl.median(t[1])}
    pyc = base / "pycache"
    t = bl.interleaved([lambda: run_wall(ls, pyc), lambda: run_wall(sq, pyc)], reps)
    out["cli_ls"] = {"loopstore_s": bl.median(t[0]), "sqlite_s": bl.median(t[1])}
    t = bl.interleaved([lambda: run_wall(ls_a, pyc), lambda: run_wall(sq_a, pyc)], reps)
    out["cli_ls_agent"] = {"loopstore_s": bl.median(t[0]), "sqlite_s": bl.median(t[1])}
    store.close()
    db.close()
    for k in ("list_ids", "list_for_agent", "cli_ls", "cli_ls_agent"):
        bl.say(f"  {k}: loopstore {out[k]['loopstore_s'] * 1e3:.1f} ms")

    bl.say(f"5. peak RSS of maintenance commands at {count:,} sessions")
    cli = [*loopstore_cmd(), "--root", str(root)]
    commands = {
        "stats": [*cli, "stats"],
        "verify": [*cli, "verify"],
        "gc --dry-run": [*cli, "gc", "--dry-run"],
        "backup DEST": [*cli, "backup", str(base / f"backup-{count}")],
        "export-legacy --all DIR": [*cli, "export-legacy", "--all", str(base / f"export-{count}")],
    }
    out["rss"] = {}
    for name, cmd in commands.items():
        res = peak_rss(cmd)
        out["rss"][name] = res
        bl.say(f"  {name}: {res['rss_mb']:.1f} MB peak, {res['wall_s']:.2f} s")
    exported = len(os.listdir(base / f"export-{count}"))
    assert exported == count, exported
    for p in (root, base / f"backup-{count}", base / f"export-{count}"):
        shutil.rmtree(p, ignore_errors=True)
    db_path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- table


def rows_of(res: dict[str, Any]) -> list[bl.Row]:
    rows: list[bl.Row] = []
    s = res["session"]
    a, b = s["load"]["loopstore_s"], s["load"]["sqlite_s"]
    rows.append(bl.compare("1", "load() of 100 loops into models", a, b, op="<=", goal=0.8))
    a, b = s["header_one"]["loopstore_s"], s["header_one"]["sqlite_s"]
    measure = "header + one loop: load(sid, lazy=True).loops[k]"
    rows.append(
        bl.compare("1", measure, a, b, op="<=", goal=0.3, target="moonshot <= 0.3x"),
    )
    a, b = s["load_loop"]["loopstore_s"], s["load_loop"]["sqlite_s"]
    rows.append(bl.compare("2", "load_loop()", a, b, op="<=", goal=1.0))
    raw = s["raw"]
    for name, key, floor, label in (
        ("load_json(sid) -> bytes", "load_json", "floor_doc_s", "read+decompress+join"),
        ("iter_loop_json(sid)", "iter_loop_json", "floor_iter_s", "read+decompress"),
    ):
        if raw[f"{key}_present"]:
            rows.append(bl.compare("3", name, raw[f"{key}_s"], raw[floor], label=label))
        else:
            rows.append(
                bl.Row(
                    "3",
                    name,
                    None,
                    "s",
                    raw[floor],
                    label,
                    display="n/a (API not present)",
                )
            )
    listings = res["listings"]
    first = listings[0]
    n0 = first["sessions"]
    for key, what in (
        ("list_ids", "list_ids()"),
        ("list_for_agent", "list_for_agent(A), 10 sessions"),
        ("cli_ls", "`loopstore ls --limit 20`, wall"),
        ("cli_ls_agent", "`loopstore ls --agent A --limit 20`, wall"),
    ):
        for lst in listings:
            n = lst["sessions"]
            a, b = lst[key]["loopstore_s"], lst[key]["sqlite_s"]
            growth = bl.ratio_of(a, first[key]["loopstore_s"])
            ok = a <= LIST_GOAL_S
            target = "<= 50 ms"
            display = bl.fmt(a, "s")
            if n != n0:
                target += f", <= {LIST_GROWTH:g}x {n0 // 1000}k"
                ok = ok and growth is not None and growth <= LIST_GROWTH
                display += f" ({growth:.2f}x {n0 // 1000}k)"
            rows.append(
                bl.Row(
                    "4",
                    f"{what} @{n // 1000}k",
                    a,
                    "s",
                    b,
                    "SQLite",
                    bl.ratio_of(a, b),
                    target,
                    ok,
                    display=display,
                )
            )
    floor = res["import_floor"]
    for name in first["rss"]:
        for lst in listings:
            n = lst["sessions"]
            r = lst["rss"][name]
            measure = f"`loopstore {name}` @{n // 1000}k: peak RSS (wall)"
            display = f"{r['rss_mb']:.1f} MB ({bl.fmt(r['wall_s'], 's')})"
            if n == n0:
                rows.append(
                    bl.compare(
                        "5",
                        measure,
                        r["rss_mb"],
                        floor["rss_mb"],
                        unit="MB",
                        label="import loopstore.cli",
                        display=display,
                    )
                )
            else:
                f = first["rss"][name]
                rows.append(
                    bl.compare(
                        "5",
                        measure,
                        r["rss_mb"],
                        f["rss_mb"],
                        unit="MB",
                        op="<=",
                        goal=RSS_GOAL,
                        target=f"<= {RSS_GOAL:g}x {n0 // 1000}k",
                        display=display,
                        base_display=f"{f['rss_mb']:.1f} MB ({bl.fmt(f['wall_s'], 's')})",
                        label=f"{n0 // 1000}k",
                    )
                )
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 1 minute: fewer repetitions")
    mode.add_argument("--long", action="store_true", help="also a 100,000-session store")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = [1_000, 10_000] + ([100_000] if args.long else [])
    cfg: dict[str, Any] = {
        "mode": "quick" if args.quick else "long" if args.long else "default",
        "session_loops": SESSION_LOOPS,
        "listing_sizes": sizes,
    }
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="loopstore-bench-read-", dir=args.dir))
    env = bl.environment(base)
    print(bl.environment_line(env), flush=True)
    t_start = time.monotonic()
    res: dict[str, Any] = {}
    try:
        res["session"] = bench_session(base, args.quick)
        s = res["session"]
        print(
            f"workload: a {SESSION_LOOPS}-loop session of synth loops,"
            f" {s['raw_json_bytes'] / 1e6:.1f} MB JSON ({s['stored_bytes'] / 1e6:.2f} MB"
            f" compressed); listing stores of {', '.join(f'{n:,}' for n in sizes)} sessions"
            f" of 1-3 small loops; mode {cfg['mode']}",
            flush=True,
        )
        res["import_floor"] = peak_rss([sys.executable, "-c", "import loopstore.cli"])
        res["listings"] = [bench_listing(base, n, args.quick) for n in sizes]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    bl.report("bench_read", env, cfg, rows_of(res), res, time.monotonic() - t_start, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
