"""Process workers for the backup tests (importable, so multiprocessing "spawn" finds them).

A session's identity across stores is its *state key*: the header and the loop index
(loop id and blob of every loop, in order). Generations differ between a source and its
backup; the key does not. Writers log, under the session lock, the key and the hash of
the session's phi-core JSON after every commit, so the log is exactly the set of states
the source had; a backup may only ever hold one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import StoreSpec, make_loop, make_session, open_spec
from loopstore import atomic
from loopstore.backup import backup, verify_backup
from loopstore.errors import SessionError
from loopstore.journal import SessionState
from loopstore.models import LoopRecord
from loopstore.store import FileSystemSessionStore, SessionStore

EPHEMERAL = "eph"
"""A session worker 0 deletes and re-creates while backups run."""


def open_store(root: str | Path | StoreSpec, **opts: Any) -> FileSystemSessionStore:
    """A directory store; with a `StoreSpec` (a dest on either backend), that store."""
    opts.setdefault("durable", False)
    opts.setdefault("lock_timeout", 60.0)
    return open_spec(root, **opts)  # type: ignore[return-value]


def state_key(state: SessionState) -> str:
    """What a backup must reproduce: the header and the loop index (not the generation)."""
    doc = {"header": dict(state.header), "loops": [[e.loop_id, e.blob] for e in state.entries]}
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def json_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(store: SessionStore, session_id: str) -> tuple[str, str]:
    """(state key, digest of the loaded phi-core JSON), both of one state.

    Lock-free: another process may commit between the two reads, so read until the
    state is the same before and after loading.
    """
    for _ in range(20):
        before = state_key(store.session_state(session_id))
        data = store.load_json(session_id)
        if state_key(store.session_state(session_id)) == before:
            return before, json_digest(data)
    raise AssertionError(f"{session_id!r} kept changing while it was read")


def snapshot_all(store: SessionStore) -> dict[str, tuple[str, str]]:
    """Every session of `store` that exists from start to end of its read."""
    out: dict[str, tuple[str, str]] = {}
    for sid in sorted(store.backend.list_sessions()):
        try:
            out[sid] = snapshot(store, sid)
        except SessionError as exc:
            if exc.__class__.__name__ != "SessionNotFound":
                raise
    return out


def _log_state(store: SessionStore, log: Any, session_id: str) -> None:
    key, digest = snapshot(store, session_id)
    log.write(json.dumps({"sid": session_id, "key": key, "json": digest}) + "\n")
    log.flush()


def log_states(root: str, log_path: str) -> None:
    """Log every session's current state (the states before the writers start)."""
    store = open_store(root)
    with open(log_path, "a", encoding="utf-8") as log:
        for sid in sorted(store.backend.list_sessions()):
            with store.lock(sid):
                _log_state(store, log, sid)


def read_log(log_path: str | Path) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        out.add((doc["sid"], doc["key"], doc["json"]))
    return out


def _tagged(loop: LoopRecord, tag: str) -> LoopRecord:
    """The loop with a writer's tag in its metadata: every commit's blob is new."""
    meta = dict(loop.metadata) if isinstance(loop.metadata, dict) else {}
    meta["tag"] = tag
    return loop.model_copy(update={"metadata": meta})


def writer_worker(
    root: str, session_ids: list[str], worker: int, commits: int, log_path: str
) -> int:
    """Append, replace in place, save (drop the last loop), fold; log every state.

    Each commit and its log line happen under the session lock (nobody else commits
    meanwhile), so the log holds every state the source had. Worker 0 also deletes and
    re-creates `EPHEMERAL`. Returns the number of commits.
    """
    store = open_store(root)
    rng = random.Random(worker)
    done = 0
    with open(log_path, "a", encoding="utf-8") as log:
        for i in range(commits):
            tag = f"w{worker}-{i}"
            if worker == 0 and i % 10 == 9:
                with store.lock(EPHEMERAL):
                    if store.exists(EPHEMERAL):
                        store.delete(EPHEMERAL)
                    else:
                        s = make_session(EPHEMERAL, 2)
                        s.loops = [_tagged(lp, tag) for lp in s.loops]
                        store.save(s)
                        _log_state(store, log, EPHEMERAL)
                done += 1
                continue
            sid = rng.choice(session_ids)
            with store.lock(sid):
                count = store.session_state(sid).loop_count
                roll = rng.random()
                if roll < 0.45 or count < 2:  # a new loop at the end
                    loop = make_loop(sid, count, text_bytes=300 + 7 * i)
                    store.append_loop(sid, _tagged(loop, tag))
                elif roll < 0.75:  # a loop replaced in place (its old blob is orphaned)
                    loop = make_loop(sid, rng.randrange(count), text_bytes=300 + 7 * i)
                    store.append_loop(sid, _tagged(loop, tag))
                elif roll < 0.9:  # the whole session replaced: one loop fewer
                    s = store.load(sid)
                    store.save(s.model_copy(update={"loops": s.loops[:-1]}))
                else:  # a fold: the journal's blobs become files, same state
                    store.checkpoint(sid)
                _log_state(store, log, sid)
            done += 1
    return done


def backup_worker(
    root: str, dest: str | StoreSpec, runs: int, stop_path: str, link: bool
) -> list[dict[str, Any]]:
    """Back up at least `runs` times and until `stop_path` exists (the writers are done).

    After each run: the run's failures, what verify_backup says and every dest session's
    snapshot (another backup process may be writing the same dest meanwhile).
    """
    store = open_store(root)
    dst = open_store(dest)
    out: list[dict[str, Any]] = []
    while len(out) < runs or not Path(stop_path).exists():
        report = backup(store, dst, link=link)
        check = verify_backup(store, dst)
        out.append(
            {
                "failed": [(f.session_id, f.reason) for f in report.failed],
                "dest_ok": check.dest_report.ok,
                "problems": [str(p) for p in check.dest_report.problems],
                "diverged": list(check.diverged),
                "updated": report.sessions_updated,
                "state": {sid: list(v) for sid, v in snapshot_all(dst).items()},
            }
        )
    return out


def backup_once(root: str, dest: StoreSpec, lock_timeout: float) -> list[tuple[str, str]]:
    """One backup of `root` into `dest` (waiting `lock_timeout` for a dest session's
    lock); returns its failures as (session id, reason)."""
    report = backup(open_store(root), open_store(dest, lock_timeout=lock_timeout))
    return [(f.session_id, f.reason) for f in report.failed]


def append_worker(root: str, session_ids: list[str], appends: int, log_path: str) -> int:
    """Only appends (never a fold: fewer than 256 records a session), logging each state."""
    store = open_store(root)
    with open(log_path, "a", encoding="utf-8") as log:
        for i in range(appends):
            sid = session_ids[i % len(session_ids)]
            with store.lock(sid):
                count = store.session_state(sid).loop_count
                store.append_loop(sid, _tagged(make_loop(sid, count, text_bytes=4000), f"a{i}"))
                _log_state(store, log, sid)
    return appends


# --------------------------------------------------------------------------- killed backups


def _pause_forever(signal_path: str) -> None:
    """Tell the test we are at the chosen point, then wait to be killed (SIGKILL)."""
    tmp = f"{signal_path}.{os.getpid()}.tmp"
    Path(tmp).write_text("paused", encoding="utf-8")
    os.replace(tmp, signal_path)
    while True:
        time.sleep(60)


def _pause_on_rename(
    should_pause: Callable[[str, str], bool], signal_path: str, *, after: bool = False
) -> None:
    """Rebind the store's rename seam (loopstore.atomic.rename) to pause at one rename:
    before it, or (`after`) once it is done."""
    inner = atomic.rename

    def rename(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
        pause = should_pause(src, dst)
        if pause and not after:
            _pause_forever(signal_path)
        inner(src_dir_fd, src, dst_dir_fd, dst)
        if pause:
            _pause_forever(signal_path)

    atomic.rename = rename


def killable_backup(root: str, dest: str | StoreSpec, mode: str, signal_path: str) -> None:
    """A backup that stops at a chosen point and waits there to be SIGKILLed.

    - "between": after the 3rd session was backed up (the progress callback);
    - "install": before the 3rd new session's staging directory is renamed into sessions/;
    - "blobs": after the 1st blob was placed into an existing dest session, before its record;
    - "fold": after a dest session's record was committed, before its fold's new checkpoint.
    """
    store = open_store(root)
    dst = open_store(dest)
    progress = None
    count = [0]
    if mode == "between":

        def progress(done: int, total: int) -> None:
            if done == 3:
                _pause_forever(signal_path)

    elif mode == "install":

        def at_install(src: str, dst_name: str) -> bool:
            if src.startswith("new-"):
                count[0] += 1
            return count[0] == 3 and src.startswith("new-")

        _pause_on_rename(at_install, signal_path)
    elif mode == "blobs":

        def at_blob(src: str, dst_name: str) -> bool:
            # The thread that places a blob stops right after it: sessions are copied a
            # few at a time, and another one's blobs may be named by its record meanwhile.
            if dst_name.endswith(".zst"):
                count[0] += 1
            return count[0] == 1 and dst_name.endswith(".zst")

        _pause_on_rename(at_blob, signal_path, after=True)
    elif mode == "fold":
        _pause_on_rename(lambda src, dst_name: dst_name == "manifest.json", signal_path)
    else:
        raise ValueError(mode)
    backup(store, dst, progress=progress)
    raise AssertionError(f"backup in mode {mode!r} finished without pausing")
