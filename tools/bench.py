"""Write-path benchmark: loopstore against SQLite and the physical floor, in one run.

    python tools/bench.py [--quick | --long] [--json FILE] [--dir DIR] [--procs 8]

Every baseline runs in the same run, on the same disk (the scratch directory, a temp dir
unless --dir). loopstore is reached through its public API only. Issue targets in
brackets:

1. durable `append_loop` latency at N = 2 vs N = 10,000 loops already in the session
   [<= 1.3x]; --long adds N = 100,000. Big sessions are built with durable=False
   `save` (small filler loops under fresh ids), synced, and reopened durable.
   N = 1,000 is also timed, against the phi-core scheme (whole session rewritten as
   pretty JSON per save, flock sidecar, tmp + fsync + rename).
2. single-writer durable append latency vs SQLite, median and p99 [<= 1.2x; moonshot
   1.0x]: appends alternate between the two, sessions of up to 50 loops.
3. 8 processes (multiprocessing spawn), each appending to its own session: appends/s vs
   SQLite with 8 processes in one database [>= 1.2x].
4. 8 processes appending to ONE shared session: appends/s vs SQLite [>= 2x], errors
   [0], p99 latency and per-process fairness (min/max acknowledged appends).
5. CPU per append: user+sys of the workers, summed, over acknowledged appends, own and
   shared sessions [<= 1.2x SQLite].

Row 4 also shows a ceiling no store can pass on this machine: the cores divided by the
CPU it takes to serialize and compress one workload loop (the least any store does per
append), beside SQLite's shared-session rate.

Baselines: SQLite (stdlib sqlite3, WAL, synchronous=FULL, one transaction per append,
the loop as zstd level-3 `model_dump_json()`, see tools/_benchlib.py); the physical
floor: one small file made durable (tmp write, fsync, rename, directory fsync) and a
bare fdatasync of a 20 KB append to an existing file.

Workload: `loopstore.synth` loops of 32-800 KB of JSON (median ~240 KB), generated before
anything is timed; every append gets a fresh loop id, so a fresh blob. Multi-process
rows run for a fixed time after a warm-up, rounds interleave loopstore and SQLite, and
the median round is reported (the reference machine is a noisy, shared 2-core VM;
the load average is printed at the start and the end).
On that VM: --quick about 1 minute, the default about 3, --long a few minutes more
(building and syncing the 100,000-loop session is most of the extra).
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib as bl
from loopstore import FileSystemSessionStore
from loopstore.models import LoopRecord, Session

SESSION_LOOPS = 50  # single-writer rows: a new session every this many appends
WARMUP = 2


# --------------------------------------------------------------------------- phi-core scheme


class PhiCoreScheme:
    """phi-core 0.10 FileSystemSessionStore::save: flock sidecar, pretty JSON, tmp+fsync+rename."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, session: Session) -> None:
        sid = session.session_id
        final = self.dir / f"{sid}.json"
        with open(self.dir / f"{sid}.json.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tmp = self.dir / f"{sid}.json.tmp.{os.getpid()}.{time.time_ns()}"
            # serde_json::to_writer_pretty equivalent, serialized in Rust (pydantic-core).
            data = session.model_dump_json(indent=2).encode()
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)

    def append(self, session: Session, loop: LoopRecord) -> None:
        session.loops.append(loop)
        self.save(session)


# --------------------------------------------------------------------------- 1. append vs N


def bench_append_vs_n(
    base: Path,
    pool: list[LoopRecord],
    filler: list[LoopRecord],
    ns: list[int],
    reps: int,
    phi_reps: int,
) -> dict[str, Any]:
    """Append one realistic loop to sessions of N loops, interleaved across N each round."""
    root = base / "ls-n"
    rounds = WARMUP + reps
    small_ids = [f"n2-{i}" for i in range(rounds)]  # each gets one append: N is always 2
    big = [n for n in ns if n != 2]
    build_s: dict[int, float] = {}
    with FileSystemSessionStore(root, durable=False) as fast:
        for sid in small_ids:
            fast.save(bl.session_with(sid, bl.fresh_loops(filler, 2, session_id=sid, tag="f")))
        for n in big:
            t0 = time.perf_counter()
            sid = f"n{n}"
            fast.save(bl.session_with(sid, bl.fresh_loops(filler, n, session_id=sid, tag="f")))
            build_s[n] = time.perf_counter() - t0
            bl.say(f"  built a {n:,}-loop session in {build_s[n]:.1f} s (durable=False save)")
    plan: list[list[tuple[int, str, LoopRecord]]] = []
    for i in range(rounds):
        lp = pool[i % len(pool)]
        row = []
        for n in ns:
            sid = small_ids[i] if n == 2 else f"n{n}"
            row.append(
                (n, sid, lp.model_copy(update={"loop_id": f"{sid}.a{i}", "session_id": sid}))
            )
        plan.append(row[i % len(row) :] + row[: i % len(row)])
    bl.settle()
    store = FileSystemSessionStore(root, durable=True)
    times: dict[int, list[float]] = {n: [] for n in ns}
    for i, row in enumerate(plan):
        for n, sid, loop in row:
            t = bl.timed(lambda s=sid, lp=loop: store.append_loop(s, lp))  # type: ignore[misc]
            if i >= WARMUP:
                times[n].append(t)
    for n in big:  # every timed append landed (session_info reads no loop)
        got = store.session_info(f"n{n}").loop_count
        assert got == n + rounds, (n, got)
    store.close()
    out: dict[str, Any] = {
        "reps": reps,
        "build_s": build_s,
        "filler_json_bytes": bl.size_summary(bl.json_sizes(filler)),
        "median_s": {n: bl.median(times[n]) for n in ns},
        "p99_s": {n: bl.pct(times[n], 99) for n in ns},
        "samples_s": times,
    }
    if 1000 in ns:
        # The phi-core scheme at N = 1,000: the whole session rewritten per append.
        phi = PhiCoreScheme(base / "phi")
        session = bl.session_with("phi", bl.fresh_loops(filler, 1000, session_id="phi", tag="f"))
        phi.save(session)
        extra = [
            pool[i % len(pool)].model_copy(update={"loop_id": f"phi.a{i}", "session_id": "phi"})
            for i in range(phi_reps)
        ]
        bl.settle()
        phi_times = [bl.timed(lambda lp=lp: phi.append(session, lp)) for lp in extra]  # type: ignore[misc]
        out["phicore_n1000_s"] = bl.median(phi_times)
        shutil.rmtree(base / "phi", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- 2. single writer


def bench_single(base: Path, pool: list[LoopRecord], count: int) -> dict[str, Any]:
    """Durable appends alternating loopstore / SQLite (order swapped every append)."""
    store = FileSystemSessionStore(base / "ls-single", durable=True)
    db = bl.SqliteStore(base / "single.sqlite")
    db.create_schema()
    plan = []
    for i in range(count):
        sid = f"single-{i // SESSION_LOOPS}"
        lp = pool[i % len(pool)]
        plan.append(
            (
                sid,
                lp.model_copy(update={"loop_id": f"{sid}.ls{i}", "session_id": sid}),
                lp.model_copy(update={"loop_id": f"{sid}.sq{i}", "session_id": sid}),
            )
        )
    bl.settle()
    wall: dict[str, list[float]] = {"loopstore": [], "sqlite": []}
    cpu: dict[str, list[float]] = {"loopstore": [], "sqlite": []}
    for i, (sid, ls_loop, sq_loop) in enumerate(plan):
        ops = [
            ("loopstore", lambda s=sid, lp=ls_loop: store.append_loop(s, lp)),
            ("sqlite", lambda s=sid, lp=sq_loop: db.append(s, lp)),
        ]
        if i % 2:
            ops.reverse()
        for kind, op in ops:
            c0 = time.process_time()
            t0 = time.perf_counter()
            op()  # type: ignore[no-untyped-call]
            t = time.perf_counter() - t0
            c = time.process_time() - c0
            if i % SESSION_LOOPS >= WARMUP:  # the first appends create the session
                wall[kind].append(t)
                cpu[kind].append(c)
    last = plan[-1][0]
    want = (count - 1) % SESSION_LOOPS + 1
    assert store.session_info(last).loop_count == db.count_loops(last) == want
    store.close()
    db.close()
    return {
        "appends_each": count,
        "timed_each": len(wall["loopstore"]),
        **{
            kind: {
                "median_s": bl.median(wall[kind]),
                "p90_s": bl.pct(wall[kind], 90),
                "p99_s": bl.pct(wall[kind], 99),
                "max_s": max(wall[kind]),
                "cpu_per_append_s": sum(cpu[kind]) / len(cpu[kind]),
            }
            for kind in wall
        },
    }


# --------------------------------------------------------------------------- 3-5. processes

_WORKER_POOL: list[LoopRecord] = []


def _mp_worker(
    kind: str,
    root: str,
    session_id: str,
    worker: int,
    duration: float,
    tag: str,
    barrier: Any,
) -> dict[str, Any]:
    """One process: warm up, wait for all, append durably for `duration` seconds."""
    if not _WORKER_POOL:
        _WORKER_POOL.extend(bl.realistic_pool(1))
    cap = int(duration * 2_000) + WARMUP
    loops = bl.fresh_loops(_WORKER_POOL, cap, session_id=session_id, tag=f"{tag}w{worker}.")
    loops = loops[worker % len(_WORKER_POOL) :] + loops[: worker % len(_WORKER_POOL)]
    if kind == "loopstore":
        store = FileSystemSessionStore(root, durable=True)

        def append(lp: LoopRecord) -> None:
            store.append_loop(session_id, lp)

        close = store.close
    else:
        db = bl.SqliteStore(Path(root) / "bench.sqlite")

        def append(lp: LoopRecord) -> None:
            db.append(session_id, lp)

        close = db.close
    for lp in loops[:WARMUP]:
        append(lp)
    todo = iter(loops[WARMUP:])
    latencies: list[float] = []
    errors: dict[str, int] = {}
    barrier.wait()
    cpu0 = bl.cpu_seconds()
    start = time.monotonic()
    stop = start + duration
    last = start
    for lp in todo:
        t0 = time.perf_counter()
        if time.monotonic() >= stop:
            break
        try:
            append(lp)
        except Exception as exc:  # counted, never retried: not acknowledged
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        finally:
            last = time.monotonic()
        latencies.append(time.perf_counter() - t0)
    cpu = bl.cpu_seconds() - cpu0
    close()
    return {
        "start": start,
        "end": last,
        "acknowledged": len(latencies),
        "errors": errors,
        "latencies": latencies,
        "cpu_s": cpu,
    }


def parallel_run(
    mpool: Any,
    manager: Any,
    kind: str,
    root: Path,
    procs: int,
    shared: bool,
    duration: float,
    tag: str,
) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        db = bl.SqliteStore(root / "bench.sqlite")
        db.create_schema()
        db.close()
    else:
        FileSystemSessionStore(root).close()
    bl.settle()
    barrier = manager.Barrier(procs, timeout=300)
    tasks = [
        (kind, str(root), "shared" if shared else f"own-{w}", w, duration, tag, barrier)
        for w in range(procs)
    ]
    results = mpool.starmap(_mp_worker, tasks)
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    counts = [r["acknowledged"] for r in results]
    lat = [x for r in results for x in r["latencies"]]
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    acked = sum(counts)
    # Every acknowledged append is in the store (warm-up appends included).
    if kind == "loopstore":
        with FileSystemSessionStore(root) as check:
            stored = sum(check.session_info(sid).loop_count for sid in check.list_ids())
    else:
        db = bl.SqliteStore(root / "bench.sqlite")
        (stored,) = db.conn.execute("SELECT COUNT(*) FROM loops").fetchone()
        db.close()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "rate_per_s": acked / (end - start),
        "seconds": end - start,
        "acknowledged": acked,
        "stored_ok": stored == acked + WARMUP * procs,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "per_process": counts,
        "fairness": min(counts) / max(counts) if max(counts) else 0.0,
        "p50_s": bl.median(lat),
        "p99_s": bl.pct(lat, 99),
        "max_s": max(lat) if lat else float("nan"),
        "cpu_per_append_s": sum(r["cpu_s"] for r in results) / acked if acked else float("nan"),
    }


def bench_parallel(base: Path, procs: int, rounds: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict[str, Any]]] = {}
    with ctx.Manager() as manager, ctx.Pool(procs) as mpool:
        for r in range(rounds):
            for shared in (False, True):
                mode = "shared" if shared else "own"
                kinds = ["loopstore", "sqlite"] if r % 2 == 0 else ["sqlite", "loopstore"]
                for kind in kinds:
                    key = f"{kind}_{mode}"
                    res = parallel_run(
                        mpool,
                        manager,
                        kind,
                        base / f"par-{key}-{r}",
                        procs,
                        shared,
                        duration,
                        f"r{r}",
                    )
                    runs.setdefault(key, []).append(res)
                    bl.say(
                        f"  round {r + 1}/{rounds} {key}: {res['rate_per_s']:.0f} appends/s,"
                        f" p99 {res['p99_s'] * 1e3:.1f} ms, errors {res['errors']},"
                        f" per process {min(res['per_process'])}-{max(res['per_process'])},"
                        f" CPU {res['cpu_per_append_s'] * 1e3:.2f} ms/append"
                    )
    out: dict[str, Any] = {"processes": procs, "rounds": rounds, "duration_s": duration}
    for key, rs in runs.items():
        by_rate = sorted(rs, key=lambda x: x["rate_per_s"])
        mid = by_rate[len(by_rate) // 2]
        out[key] = {
            "rate_per_s": bl.median([x["rate_per_s"] for x in rs]),
            "p99_s": bl.median([x["p99_s"] for x in rs]),
            "p50_s": bl.median([x["p50_s"] for x in rs]),
            "cpu_per_append_s": bl.median([x["cpu_per_append_s"] for x in rs]),
            "errors": sum(x["errors"] for x in rs),
            "stored_ok": all(x["stored_ok"] for x in rs),
            "median_run_per_process": mid["per_process"],
            "median_run_fairness": mid["fairness"],
            "runs": rs,
        }
    return out


# --------------------------------------------------------------------------- ceiling


def serialize_cpu(pool: list[LoopRecord], count: int) -> float:
    """CPU seconds to turn one workload loop into compressed bytes, the least any store
    must do per append (the cheaper of loopstore's and the SQLite baseline's way)."""
    loops = bl.fresh_loops(pool, count, session_id="ceiling", tag="c")
    cctx = zstandard.ZstdCompressor(level=bl.ZSTD_LEVEL)
    ways = (
        lambda lp: cctx.compress(lp.dump_json(indent=2)),
        lambda lp: cctx.compress(lp.model_dump_json().encode()),
    )
    best = []
    for way in ways:
        c0 = time.process_time()
        for lp in loops:
            way(lp)
        best.append((time.process_time() - c0) / count)
    return min(best)


# --------------------------------------------------------------------------- table


def rows_of(res: dict[str, Any]) -> list[bl.Row]:
    rows: list[bl.Row] = []
    nv = res["append_vs_n"]
    med = nv["median_s"]
    for n in [n for n in (10_000, 100_000) if n in med]:
        measure = f"durable append, N={n:,} vs N=2 (median)"
        rows.append(bl.compare("1", measure, med[n], med[2], label="N=2", op="<=", goal=1.3))
    if "phicore_n1000_s" in nv:
        measure = "durable append, N=1,000 (median)"
        rows.append(bl.compare("1", measure, med[1000], nv["phicore_n1000_s"], label="phi-core"))
    ls, sq = res["single"]["loopstore"], res["single"]["sqlite"]
    for stat, label in (("median_s", "median"), ("p99_s", "p99")):
        measure = f"single-writer durable append, {label}"
        target = "<= 1.2x (moonshot 1.0x)"
        rows.append(bl.compare("2", measure, ls[stat], sq[stat], op="<=", goal=1.2, target=target))
    par = res["parallel"]
    procs = par["processes"]
    for mode, key, goal in (("own", "3", 1.2), ("shared", "4", 2.0)):
        a, b = par[f"loopstore_{mode}"], par[f"sqlite_{mode}"]
        what = f"{procs} procs, " + ("own sessions" if mode == "own" else "ONE shared session")
        rows.append(
            bl.compare(
                key,
                f"{what}: appends/s",
                a["rate_per_s"],
                b["rate_per_s"],
                unit="/s",
                op=">=",
                goal=goal,
            )
        )
        lost = "" if a["stored_ok"] else " (ACKNOWLEDGED APPENDS MISSING)"
        rows.append(
            bl.Row(
                key,
                f"{what}: errors, all rounds",
                a["errors"],
                "count",
                b["errors"],
                "SQLite",
                target="0",
                met=a["errors"] == 0 and a["stored_ok"],
                display=f"{a['errors']}{lost}",
            )
        )
        rows.append(bl.compare(key, f"{what}: p99 latency", a["p99_s"], b["p99_s"]))
        ca, cb = a["median_run_per_process"], b["median_run_per_process"]
        fa, fb = a["median_run_fairness"], b["median_run_fairness"]
        rows.append(
            bl.Row(
                key,
                f"{what}: appends per process, min/max",
                fa,
                "x",
                fb,
                "SQLite",
                target="info",
                display=f"{min(ca)}/{max(ca)} = {fa:.2f}",
                base_display=f"{min(cb)}/{max(cb)} = {fb:.2f}",
            )
        )
    ceiling = res["cores"] / res["serialize_cpu_s"]
    rows.append(
        bl.compare(
            "4",
            f"ceiling for any store: {res['cores']} cores / serialize+compress CPU",
            ceiling,
            par["sqlite_shared"]["rate_per_s"],
            unit="/s",
            base_display=f"{res['serialize_cpu_s'] * 1e3:.2f} ms CPU per loop",
        )
    )
    for mode in ("own", "shared"):
        a, b = par[f"loopstore_{mode}"], par[f"sqlite_{mode}"]
        measure = f"CPU per append, {procs} procs, {mode} session" + ("s" if mode == "own" else "")
        cpu_a, cpu_b = a["cpu_per_append_s"], b["cpu_per_append_s"]
        rows.append(bl.compare("5", measure, cpu_a, cpu_b, op="<=", goal=1.2))
    measure = "CPU per append, single writer"
    rows.append(bl.compare("5", measure, ls["cpu_per_append_s"], sq["cpu_per_append_s"]))
    fl = res["floor"]
    for k, label in (
        ("durable_small_file_s", "durable small file"),
        ("fdatasync_20k_append_s", "fdatasync 20 KB append"),
    ):
        measure = "single-writer append (median) vs physical floor"
        rows.append(bl.compare("F", measure, ls["median_s"], fl[k], label=label))
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 1 minute: fewer reps and rounds")
    mode.add_argument("--long", action="store_true", help="also N = 100,000 (a few minutes more)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    ap.add_argument("--procs", type=int, default=8, help="processes in rows 3-5 (default 8)")
    args = ap.parse_args(argv)

    quick, long = args.quick, args.long
    cfg: dict[str, Any] = {
        "mode": "quick" if quick else "long" if long else "default",
        "ns": [2, 1000, 10_000] + ([100_000] if long else []),
        "n_reps": 20 if quick else 40,
        "phi_reps": 2 if quick else 3,
        "single_appends": 200 if quick else 600,
        "floor_reps": 50 if quick else 200,
        "procs": args.procs,
        "rounds": 3 if quick else 7,
        "duration_s": 3.0 if quick else 5.0,
    }
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="loopstore-bench-", dir=args.dir))
    env = bl.environment(base)
    print(bl.environment_line(env), flush=True)
    t_start = time.monotonic()
    res: dict[str, Any] = {}
    try:
        pool = bl.realistic_pool(1)
        filler = bl.small_pool(2)
        res["workload"] = {
            "loop_json_bytes": bl.size_summary(bl.json_sizes(pool)),
            "filler_json_bytes": bl.size_summary(bl.json_sizes(filler)),
        }
        w = res["workload"]["loop_json_bytes"]
        print(
            f"workload: {w['count']} distinct synth loops of {w['min'] / 1e3:.0f}-"
            f"{w['max'] / 1e3:.0f} KB JSON (median {w['median'] / 1e3:.0f} KB), fresh loop id"
            " per append; mode " + cfg["mode"],
            flush=True,
        )
        bl.say("floor: durable small file, fdatasync of a 20 KB append")
        res["floor"] = {
            "durable_small_file_s": bl.median(
                bl.floor_durable_small_file(base / "floor", cfg["floor_reps"])
            ),
            "fdatasync_20k_append_s": bl.median(
                bl.floor_fdatasync_append(base / "floor" / "journal", cfg["floor_reps"])
            ),
        }
        bl.say("2. single writer, loopstore vs SQLite")
        res["single"] = bench_single(base, pool, cfg["single_appends"])
        bl.say("1. append latency vs session size")
        res["append_vs_n"] = bench_append_vs_n(
            base, pool, filler, cfg["ns"], cfg["n_reps"], cfg["phi_reps"]
        )
        bl.say(f"3-5. {args.procs} processes, own sessions and one shared session")
        res["parallel"] = bench_parallel(base, args.procs, cfg["rounds"], cfg["duration_s"])
        res["cores"] = os.cpu_count() or 1
        res["serialize_cpu_s"] = serialize_cpu(pool, 100 if quick else 300)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    bl.report("bench", env, cfg, rows_of(res), res, time.monotonic() - t_start, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
