"""Process workers for tests/test_acceptance.py (importable under multiprocessing "spawn")."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import StoreSpec, make_loop, open_spec
from loopstore import FileSystemSessionStore, SessionLocked


def hold_lock(root: str, session_id: str, ready: str, hold_s: float) -> None:
    """Take the session lock, say so through `ready`, hold it `hold_s` seconds."""
    store = FileSystemSessionStore(root)
    with store.lock(session_id):
        Path(ready).write_text("held")
        time.sleep(hold_s)


def try_append(root: str, session_id: str, index: int, lock_timeout: float) -> str:
    """One append under a short budget: 'ok', 'locked' or the error's class name."""
    store = FileSystemSessionStore(root, lock_timeout=lock_timeout, lock_poll_interval=0.02)
    try:
        store.append_loop(session_id, make_loop(session_id, index))
    except SessionLocked:
        return "locked"
    except Exception as exc:
        return type(exc).__name__
    return "ok"


def append_many(
    root: str | StoreSpec, session_id: str, proc: int, threads: int, per_thread: int
) -> list[str]:
    """`threads` threads each append `per_thread` loops (half via update); acked loop ids.
    `root` is a directory or a `StoreSpec` (either backend)."""
    store = open_spec(root, lock_timeout=60.0, durable=True)
    acked: list[str] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work(t: int) -> None:
        for i in range(per_thread):
            index = 10_000 * (proc + 1) + 100 * t + i
            loop = make_loop(session_id, index, text_bytes=300)
            try:
                if i % 2 == 0:
                    store.append_loop(session_id, loop)
                else:

                    def add(s, lp=loop):  # type: ignore[no-untyped-def]
                        s.loops.append(lp)

                    store.update(session_id, add)
            except BaseException as exc:
                with guard:
                    errors.append(exc)
                return
            with guard:
                acked.append(loop.loop_id)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return acked


def append_forever(root: str | StoreSpec, session_id: str, log: str, start: int) -> None:
    """Append loops until killed; each acknowledged loop id is logged after it returned."""
    store = open_spec(root, durable=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = start
    while True:
        loop = make_loop(session_id, i, text_bytes=4000)
        store.append_loop(session_id, loop)
        os.write(fd, (loop.loop_id + "\n").encode())
        i += 1
