"""Session locks: thread exclusion, re-entrancy, the retry budget, dead holders.

Cross-process claims use real processes (multiprocessing "spawn"). Timing asserts
only the lower bound strictly (never sooner than lock_timeout) and a generous upper
bound, so a loaded CI machine does not make them flaky.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _workers_store as workers
from helpers import lock_held_in_thread
from loopstore.aio import AsyncFileSystemSessionStore
from loopstore.errors import SessionLocked
from loopstore.store import FileSystemSessionStore

CTX = mp.get_context("spawn")
SLACK_S = 1.5  # generous upper bound over the budget (shared, loaded CI cores)


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    with CTX.Pool(2) as p:
        yield p


def _store(tmp_path: Path, **opts: Any) -> FileSystemSessionStore:
    opts.setdefault("durable", False)
    return FileSystemSessionStore(tmp_path / "store", **opts)


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    store = _store(tmp_path, lock_timeout=30)
    other = FileSystemSessionStore(tmp_path / "store", durable=False, lock_timeout=30)
    inside = 0
    overlaps = 0
    done = 0
    guard = threading.Lock()

    def work(s: FileSystemSessionStore) -> None:
        nonlocal inside, overlaps, done
        for _ in range(20):
            with s.lock("one"):
                with guard:
                    inside += 1
                    overlaps += inside > 1
                time.sleep(0.001)
                with guard:
                    inside -= 1
                    done += 1

    threads = [threading.Thread(target=work, args=(s,)) for s in (store, other, store, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == 80
    assert overlaps == 0


def test_reentrant_lock_keeps_the_file_lock(tmp_path: Path, pool: Any) -> None:
    store = _store(tmp_path)
    root = str(store.root)
    with store.lock("r"):
        with store.lock("r"):
            pass
        # The inner exit must not have released the process lock.
        outcome, _ = pool.apply(workers.try_lock, (root, "r", 0.0, 0.01))
        assert outcome == "locked"
    outcome, _ = pool.apply(workers.try_lock, (root, "r", 0.0, 0.01))
    assert outcome == "ok"


def test_lock_timeout_window_in_process(tmp_path: Path) -> None:
    store = _store(tmp_path, lock_timeout=0.4, lock_poll_interval=0.05)
    with lock_held_in_thread(store, "w"):
        begin = time.monotonic()
        with pytest.raises(SessionLocked) as exc, store.lock("w"):
            pass
        spent = time.monotonic() - begin
        assert isinstance(exc.value, TimeoutError)
        assert exc.value.session_id == "w"
        assert spent >= 0.4
        assert spent < 0.4 + SLACK_S


def test_lock_timeout_window_across_processes(tmp_path: Path, pool: Any) -> None:
    store = _store(tmp_path)
    root = str(store.root)
    ready = CTX.Event()
    release = CTX.Event()
    holder = CTX.Process(target=workers.hold_lock, args=(root, "x", 30.0, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        # Contenders in this process and in another one.
        result = pool.apply_async(workers.try_lock, (root, "x", 0.6, 0.05))
        contender = FileSystemSessionStore(
            root, durable=False, lock_timeout=0.6, lock_poll_interval=0.05
        )
        begin = time.monotonic()
        with pytest.raises(SessionLocked), contender.lock("x"):
            pass
        spent = time.monotonic() - begin
        assert 0.6 <= spent < 0.6 + SLACK_S
        outcome, remote_spent = result.get(30)
        assert outcome == "locked"
        assert 0.6 <= remote_spent < 0.6 + SLACK_S
        # lock_timeout=0 tries exactly once.
        zero = FileSystemSessionStore(root, durable=False, lock_timeout=0)
        begin = time.monotonic()
        with pytest.raises(SessionLocked), zero.lock("x"):
            pass
        assert time.monotonic() - begin < SLACK_S
    finally:
        release.set()
        holder.join(30)
    # A short hold: every contender within budget gets the lock.
    ready2 = CTX.Event()
    short = CTX.Process(target=workers.hold_lock, args=(root, "x", 0.3, ready2))
    short.start()
    assert ready2.wait(30)
    patient = FileSystemSessionStore(root, durable=False, lock_timeout=20)
    got: list[int] = []

    def contend(i: int) -> None:
        with patient.lock("x"):
            got.append(i)
            time.sleep(0.05)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [0, 1, 2, 3]
    short.join(30)


def test_sigkilled_holder_does_not_block(tmp_path: Path) -> None:
    store = _store(tmp_path, lock_timeout=10)
    ready = CTX.Event()
    p = CTX.Process(target=workers.hold_lock_forever, args=(str(store.root), "k", ready))
    p.start()
    assert ready.wait(30)
    quick = FileSystemSessionStore(store.root, durable=False, lock_timeout=0)
    with pytest.raises(SessionLocked), quick.lock("k"):
        pass
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    begin = time.monotonic()
    with store.lock("k"):
        pass
    assert time.monotonic() - begin < 5
    assert (store.root / "locks" / "k.lock").exists()  # never unlinked


def test_update_inside_lock_and_nested_calls_do_not_deadlock(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_loop, make_session

    store = _store(tmp_path, lock_timeout=1)
    store.save(make_session("n", 1))
    with store.lock("n"):
        store.append_loop("n", make_loop("n", 5))

        def fn(s: Any) -> None:
            store.append_loop("n", make_loop("n", 6))

        store.update("n", fn)
    # No deadlock; the function's session (read before its own nested append) wins.
    assert [lp.loop_id for lp in store.load("n").loops] == ["n.test.1", "n.test.6"]
    assert store.session_info("n").generation == 4


def test_async_lock_is_reentrant_for_the_task(tmp_path: Path) -> None:
    import asyncio
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_session

    astore = AsyncFileSystemSessionStore(tmp_path / "store", durable=False, lock_timeout=1)

    async def main() -> list[str]:
        async with astore.lock("a"):
            await astore.save(make_session("a", 2))
            await astore.update("a", lambda s: None)
        return await astore.list_ids()

    assert asyncio.run(main()) == ["a"]


def test_bad_options_create_nothing(tmp_path: Path) -> None:
    for opts in ({"lock_timeout": -1}, {"lock_poll_interval": 0}, {"compression_level": 99}):
        with pytest.raises(ValueError):
            FileSystemSessionStore(tmp_path / "never", **opts)
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(
    not hasattr(os, "fork"), reason="os.fork does not exist on this platform (not POSIX)"
)
def test_forked_child_does_not_inherit_lock_ownership(tmp_path: Path) -> None:
    store = _store(tmp_path, lock_timeout=0.3, lock_poll_interval=0.02)
    with store.lock("f"):
        pid = os.fork()
        if pid == 0:  # child: same thread id as the holder, but it holds no file lock
            code = 3
            try:
                with store.lock("f"):
                    code = 1
            except SessionLocked:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
