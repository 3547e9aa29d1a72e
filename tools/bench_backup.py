"""Benchmark incremental backups against copying the whole store directory.

    python tools/bench_backup.py [--sessions 50] [--loops 20] [--loop-bytes 20000]
                                 [--changed 10] [--repeat 3] [--dir DIR] [--json out.json]

Workload: `sessions` x `loops` synthetic loops (loopstore.synth), then `changed` loops
changed (half replaced in place, half appended; 10 of 1,000 = 1%). Measured, warm page
cache, the same disk:

* full backup (hard links, and copy mode) of the fresh store;
* second backup after the change (hard links, and copy mode): time and bytes written;
* `shutil.copytree` of the whole store directory (what a naive full copy costs);
* `rsync -a` of the live store onto its previous copy, when rsync is installed
  (cheap too, but not consistent while writers commit: see README "Backups").

Medians of `repeat` runs (os.sync() before each); each second backup runs on its own
copy of the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopstore.backup import BackupReport, backup, verify_backup
from loopstore.store import FileSystemSessionStore
from loopstore.synth import generate_loops, generate_session


def tree_bytes(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `fn` took; dirty pages of earlier steps are flushed first, not billed to it."""
    os.sync()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def build(root: Path, sessions: int, loops: int, loop_bytes: int) -> FileSystemSessionStore:
    """Built without fsyncs for speed, then os.sync()ed and reopened as a durable store."""
    with FileSystemSessionStore(root, durable=False) as fast:
        for i in range(sessions):
            fast.save(
                generate_session(i, session_id=f"bench-{i:03d}", loops=loops, loop_bytes=loop_bytes)
            )
    os.sync()
    return FileSystemSessionStore(root)


def change(store: FileSystemSessionStore, changed: int, loop_bytes: int) -> None:
    """Replace half of `changed` loops in place and append the other half."""
    ids = sorted(store.list_ids())
    for k in range(changed):
        sid = ids[(k * 7) % len(ids)]
        if k % 2 == 0:
            loops = store.load(sid).loops
            old = loops[k % len(loops)]
            new = generate_loops(10_000 + k, sid, 1, loop_bytes=loop_bytes)[0]
            store.append_loop(sid, new.model_copy(update={"loop_id": old.loop_id}))
        else:
            store.append_loop(sid, generate_loops(20_000 + k, sid, 1, loop_bytes=loop_bytes)[0])


def summary(r: BackupReport) -> dict[str, Any]:
    keys = (
        "mode",
        "sessions_updated",
        "sessions_unchanged",
        "files_linked",
        "bytes_linked",
        "files_copied",
        "bytes_copied",
        "files_skipped",
        "bytes_skipped",
        "sessions_removed",
        "blobs_verified",
    )
    return {k: getattr(r, k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--loops", type=int, default=20)
    ap.add_argument("--loop-bytes", type=int, default=20_000)
    ap.add_argument("--changed", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-backup-", dir=args.dir))
    rsync = shutil.which("rsync")
    out: dict[str, Any] = {"workload": vars(args) | {"dir": str(base)}}
    try:
        t, store = timed(lambda: build(base / "src", args.sessions, args.loops, args.loop_bytes))
        files, size = tree_bytes(store.root)
        out["store"] = {"build_s": t, "files": files, "bytes": size, "stats": vars(store.stats())}
        print(f"store: {files} files, {size / 1e6:.1f} MB (built in {t:.1f}s)")

        rep = range(args.repeat)
        full_link = [timed(lambda i=i: backup(store, base / f"link{i}")) for i in rep]
        full_copy = [timed(lambda i=i: backup(store, base / f"copy{i}", link=False)) for i in rep]
        copytree = [timed(lambda i=i: shutil.copytree(store.root, base / f"tree{i}")) for i in rep]
        if rsync:
            subprocess.run([rsync, "-a", f"{store.root}/", f"{base / 'rsync'}/"], check=True)

        change(store, args.changed, args.loop_bytes)

        second_link = [timed(lambda i=i: backup(store, base / f"link{i}")) for i in rep]
        second_copy = [timed(lambda i=i: backup(store, base / f"copy{i}", link=False)) for i in rep]
        copytree2 = [
            timed(lambda i=i: shutil.copytree(store.root, base / f"tree2-{i}")) for i in rep
        ]
        for i in rep:
            assert verify_backup(store, base / f"link{i}").in_sync
            assert verify_backup(store, base / f"copy{i}").in_sync
        _, size2 = tree_bytes(store.root)

        def med(runs: list[tuple[float, Any]]) -> float:
            return statistics.median(t for t, _ in runs)

        out["full_backup_link"] = {"s": med(full_link), **summary(full_link[0][1])}
        out["full_backup_copy"] = {"s": med(full_copy), **summary(full_copy[0][1])}
        out["copytree_full"] = {"s": med(copytree), "bytes": size}
        out["second_backup_link"] = {"s": med(second_link), **summary(second_link[0][1])}
        out["second_backup_copy"] = {"s": med(second_copy), **summary(second_copy[0][1])}
        out["copytree_after_change"] = {"s": med(copytree2), "bytes": size2}
        if rsync:
            t_rsync, proc = timed(
                lambda: subprocess.run(
                    [rsync, "-a", "--stats", f"{store.root}/", f"{base / 'rsync'}/"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
            )
            stats = {
                line.split(":")[0].strip(): line.split(":", 1)[1].strip()
                for line in proc.stdout.splitlines()
                if ":" in line
            }
            out["rsync_live_incremental"] = {
                "s": t_rsync,
                "files_transferred": stats.get("Number of regular files transferred"),
                "literal_bytes": stats.get("Literal data"),
            }

        sl, sc = out["second_backup_link"], out["second_backup_copy"]
        print(f"full backup (link):   {out['full_backup_link']['s'] * 1000:8.1f} ms")
        print(f"full backup (copy):   {out['full_backup_copy']['s'] * 1000:8.1f} ms")
        print(f"copytree (full copy): {out['copytree_full']['s'] * 1000:8.1f} ms, {size:,} B")
        print(
            f"second backup (link): {sl['s'] * 1000:8.1f} ms, {sl['files_linked']} blobs linked "
            f"({sl['bytes_linked']:,} B shared), {sl['sessions_updated']} sessions updated, "
            f"{sl['files_skipped']} skipped, {sl['blobs_verified']} hash-checked"
        )
        print(
            f"second backup (copy): {sc['s'] * 1000:8.1f} ms, {sc['files_copied']} blobs copied "
            f"({sc['bytes_copied']:,} B), {sc['sessions_updated']} sessions updated"
        )
        print(
            f"copytree after change:{out['copytree_after_change']['s'] * 1000:8.1f} ms, {size2:,} B"
        )
        if rsync:
            r = out["rsync_live_incremental"]
            print(
                f"rsync -a live store (incremental, unsafe while writers run): "
                f"{r['s'] * 1000:.1f} ms, {r['files_transferred']} files, {r['literal_bytes']}"
            )
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
