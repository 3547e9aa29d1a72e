"""Process workers for the store tests (importable, so multiprocessing "spawn" finds them)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import StoreSpec, make_loop, open_spec
from loopstore.errors import SessionError, SessionLocked
from loopstore.models import Session
from loopstore.store import SessionStore


def _store(root: str | StoreSpec, **opts: Any) -> SessionStore:
    """`root` is a directory, or a `StoreSpec` (a store on either backend)."""
    opts.setdefault("durable", False)
    opts.setdefault("lock_timeout", 60.0)
    opts.setdefault("lock_poll_interval", 0.005)
    return open_spec(root, **opts)


def update_worker(
    root: str | StoreSpec, session_id: str, worker: int, threads: int, per_thread: int
) -> int:
    """Each thread does read-modify-write updates that add one marker to the metadata
    of the first loop and appends one loop through append_loop; returns acks."""
    store = _store(root)
    acked = [0] * threads
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for i in range(per_thread):
                tag = f"w{worker}-t{t}-{i}"

                def bump(s: Session, tag: str = tag) -> None:
                    meta = s.loops[0].metadata
                    assert isinstance(meta, dict)
                    meta.setdefault("tags", []).append(tag)

                store.update(session_id, bump)
                loop = make_loop(session_id, 1000 + worker * 1000 + t * 100 + i, text_bytes=300)
                store.append_loop(session_id, loop)
                acked[t] += 1
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    if errors:
        raise errors[0]
    return sum(acked)


def hold_lock(root: str, session_id: str, hold_s: float, ready: Any, release: Any = None) -> None:
    """Take the session lock, signal `ready`, keep it `hold_s` seconds (or until released)."""
    store = _store(root)
    with store.lock(session_id):
        ready.set()
        if release is not None:
            release.wait(hold_s)
        else:
            time.sleep(hold_s)


def hold_lock_forever(root: str, session_id: str, ready: Any) -> None:
    """Take the lock and block until killed (SIGKILL test)."""
    store = _store(root)
    with store.lock(session_id):
        ready.set()
        while True:
            time.sleep(1)


def try_lock(root: str, session_id: str, timeout: float, poll: float) -> tuple[str, float]:
    """Try to take the lock once with the given budget; return outcome and seconds spent."""
    store = _store(root, lock_timeout=timeout, lock_poll_interval=poll)
    start = time.monotonic()
    try:
        with store.lock(session_id):
            pass
    except SessionLocked:
        return ("locked", time.monotonic() - start)
    return ("ok", time.monotonic() - start)


def reader_worker(root: str | StoreSpec, session_id: str, seconds: float) -> tuple[int, list[str]]:
    """Load continuously; every error is returned (readers must never see one)."""
    store = _store(root)
    deadline = time.monotonic() + seconds
    loads = 0
    errors: list[str] = []
    while time.monotonic() < deadline:
        try:
            s = store.load(session_id)
            if len({lp.loop_id for lp in s.loops}) != len(s.loops):
                errors.append("duplicate loop ids")
            loads += 1
        except SessionError as exc:
            errors.append(repr(exc))
    return loads, errors


def pid() -> int:
    return os.getpid()


def append_one(root: str, session_id: str, index: int) -> None:
    """One append from another process (the listing test checks it is listed)."""
    _store(root).append_loop(session_id, make_loop(session_id, index))


def churn_worker(root: str, name: str, deadline: float, log: Path) -> None:
    """Create, append to and delete sessions of our own until `deadline` (monotonic).

    Each call is logged as a line `begin ack op session loops` after it returned, with
    monotonic times (one clock for every process on the machine).
    """
    store = _store(root)
    loops: dict[str, int] = {}
    n = 0
    with open(log, "w", encoding="utf-8") as out:
        while time.monotonic() < deadline:
            sid = f"{name}.s{n % 4}"
            n += 1
            t0 = time.monotonic()
            if sid in loops and loops[sid] >= 3:
                store.delete(sid)
                del loops[sid]
                op, count = "delete", 0
            else:
                count = loops.get(sid, 0)
                store.append_loop(sid, make_loop(sid, count))
                loops[sid] = count + 1
                op, count = "append", count + 1
            out.write(f"{t0} {time.monotonic()} {op} {sid} {count}\n")
            out.flush()


def read_acks(log: Path) -> list[tuple[float, float, str, str, int]]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        begin, ack, op, sid, count = line.split()
        out.append((float(begin), float(ack), op, sid, int(count)))
    return out


def die_as_holder(root: str, session_id: str, index: int, held: str, go: str) -> None:
    """Hold the session lock, wait for `go`, then append as the holder of the group
    commit: claim the waiting appends and die (SIGKILL) as the record is being written,
    leaving their claims behind with no outcome."""
    import signal

    from loopstore import atomic, journal

    real = atomic.write_all

    def killed_on_record(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
        if bytes(data[:5]) == journal.MAGIC + journal.KIND_RECORD:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd, data, offset)

    store = _store(root)
    atomic.write_all = killed_on_record
    with store.lock(session_id):
        Path(held).touch()
        while not Path(go).exists():
            time.sleep(0.005)
        store.append_loop(session_id, make_loop(session_id, index))
