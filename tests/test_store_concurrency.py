"""Many OS processes (each with threads) on one session: no lost update, readers
never see an error, even while gc deletes unreferenced blobs under them. On both
backends: on S3 the processes' commits race by compare-and-swap (no lock between them)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import _workers_store as workers
from helpers import StoreFactory, make_loop, make_session

CTX = mp.get_context("spawn")
PROCESSES = 4
THREADS = 2
PER_THREAD = 6


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    with CTX.Pool(PROCESSES) as p:
        yield p


def test_processes_times_threads_lose_nothing(make_store: StoreFactory, pool: Any) -> None:
    store = make_store(durable=False)
    store.save(make_session("shared", 1))
    root = make_store.spec()
    acked = pool.starmap(
        workers.update_worker,
        [(root, "shared", w, THREADS, PER_THREAD) for w in range(PROCESSES)],
    )
    expected = PROCESSES * THREADS * PER_THREAD
    assert sum(acked) == expected
    s = store.load("shared")
    tags = s.loops[0].metadata["tags"]
    assert len(tags) == expected == len(set(tags))  # every update, none twice
    assert len(s.loops) == 1 + expected  # every append_loop
    assert len({lp.loop_id for lp in s.loops}) == len(s.loops)
    info = store.session_info("shared")
    # Every update is a commit of its own; appends may share one (group commit, which
    # object stores do not have: one commit each).
    if make_store.is_s3:
        assert info.generation == 1 + 2 * expected
    else:
        assert 1 + expected < info.generation <= 1 + 2 * expected
    assert store.verify().ok


def test_readers_never_fail_while_writers_commit_and_gc_runs(
    make_store: StoreFactory, pool: Any
) -> None:
    store = make_store(durable=False)
    base = make_session("busy", 4)
    store.save(base)
    root = make_store.spec()
    readers = [pool.apply_async(workers.reader_worker, (root, "busy", 2.5)) for _ in range(3)]
    n = 4
    import time

    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        # replace the last loop (old blob becomes garbage), append, then gc at once
        store.append_loop("busy", make_loop("busy", n - 1, status="Aborted", text_bytes=500 + n))
        store.append_loop("busy", make_loop("busy", n))
        n += 1
        if n % 3 == 0:
            store.save(store.load("busy").model_copy(update={"loops": base.loops}))
            n = 4
        store.gc(grace=0)
    total = 0
    for r in readers:
        loads, errors = r.get(60)
        assert errors == []
        total += loads
    assert total > 0
    assert store.verify().ok


def test_an_append_left_queued_by_a_failed_round_is_never_reported_as_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit, a holder process dies after claiming our handed-off append; we take
    the lock and serve the queue, and putting the dead holder's claim back fails. Our
    append is still queued (a later holder commits it), so the call may not say "not
    committed": it raises StorageError with maybe_committed, and the loop appears later."""
    from loopstore import FileSystemSessionStore, atomic
    from loopstore.errors import StorageError

    root = tmp_path / "store"
    store = FileSystemSessionStore(root, durable=False, lock_timeout=30)
    store.save(make_session("hot", 1))
    held, go = tmp_path / "held", tmp_path / "go"
    holder = CTX.Process(
        target=workers.die_as_holder, args=(str(root), "hot", 50, str(held), str(go))
    )
    holder.start()
    try:
        _wait_for(held.exists)
        outcome: list[BaseException | None] = []

        def append() -> None:
            try:
                store.append_loop("hot", make_loop("hot", 7))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=append)
        waiter.start()
        queue = root / "locks" / "hot.q"
        _wait_for(lambda: queue.is_dir() and any(queue.glob("*.item")))
        real = atomic.rename

        def no_requeue(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
            if src.endswith(".claimed") and dst.endswith(".item"):
                raise OSError(errno.EIO, "injected EIO")
            real(src_fd, src, dst_fd, dst)

        monkeypatch.setattr(atomic, "rename", no_requeue)
        go.touch()
        holder.join(30)
        assert holder.exitcode == -signal.SIGKILL  # died writing the record
        waiter.join(30)
        monkeypatch.undo()
    finally:
        if holder.is_alive():
            holder.kill()
    (err,) = outcome
    assert isinstance(err, StorageError) and err.maybe_committed, err
    # The claim stayed behind: the next holder commits it.
    store.append_loop("hot", make_loop("hot", 8))
    ids = [lp.loop_id for lp in store.load("hot").loops]
    assert make_loop("hot", 7).loop_id in ids and make_loop("hot", 50).loop_id not in ids
    assert store.verify().ok


def _wait_for(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
