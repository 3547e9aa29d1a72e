"""Injected OS errors: a failed commit is a StorageError naming session and path,
and the previously committed state stays intact (old manifest, nothing half-new)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import make_loop, make_session
from loopstore import atomic
from loopstore.errors import SessionError, StorageError
from loopstore.store import FileSystemSessionStore


def _failing(
    real: Callable[..., Any], err: int, when: Callable[..., bool] = lambda *a: True
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            raise OSError(err, f"injected {errno.errorcode[err]}")
        return real(*args, **kwargs)

    return wrapper


def _dump(obj: Any) -> str:
    return obj.model_dump_json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("target", "err"),
    [("write_all", errno.ENOSPC), ("rename", errno.EACCES), ("fsync", errno.EIO)],
)
def test_failed_write_before_its_commit_point_keeps_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, err: int
) -> None:
    store = FileSystemSessionStore(tmp_path / "store", durable=True)
    before = make_session("f", 2)
    store.save(before)
    gen = store.session_info("f").generation
    if target != "rename":  # an append renames nothing; a new session is one rename
        monkeypatch.setattr(atomic, target, _failing(getattr(atomic, target), err))
        with pytest.raises(StorageError) as exc:
            store.append_loop("f", make_loop("f", 2))
        _names_session_and_path(exc.value, store, "f")
        # a failed write before the record: nothing of it stays
        assert exc.value.maybe_committed is (target == "fsync")
        monkeypatch.undo()
    monkeypatch.setattr(atomic, target, _failing(getattr(atomic, target), err))
    with pytest.raises(StorageError) as exc:
        store.save(make_session("new-session", 1))
    _names_session_and_path(exc.value, store, "new-session")
    monkeypatch.undo()
    if target != "fsync":
        assert _dump(store.load("f")) == _dump(before)
        assert store.session_info("f").generation == gen
    assert not store.exists("new-session")
    assert store.verify().ok
    assert [p for p in (store.root / "tmp").iterdir()] == []
    # The store works again once the fault is gone.
    store.append_loop("f", make_loop("f", 3))
    assert make_loop("f", 3).loop_id in [lp.loop_id for lp in store.load("f").loops]


def test_a_record_whose_fdatasync_failed_stays_and_is_made_durable_by_the_next_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the record is written, a failed fdatasync fails the call with
    maybe_committed=True; the record stays (a reader may already have seen it), and the
    next reader fsyncs it before returning it."""
    store = FileSystemSessionStore(tmp_path / "store", durable=True)
    store.save(make_session("f", 2))
    calls: list[int] = []
    real = atomic.fsync
    monkeypatch.setattr(atomic, "fsync", _failing(real, errno.EIO, lambda fd: not _is_dir(fd)))
    with pytest.raises(StorageError) as exc:
        store.append_loop("f", make_loop("f", 2))
    assert exc.value.maybe_committed
    monkeypatch.undo()

    def counting(fd: int, *, data_only: bool = False) -> None:
        calls.append(fd)
        real(fd, data_only=data_only)

    monkeypatch.setattr(atomic, "fsync", counting)
    fresh = FileSystemSessionStore(store.root, durable=True)
    calls.clear()
    assert len(fresh.load("f").loops) == 3  # the record stood
    assert len(calls) == 3  # journal, session directory, sessions/: then it is durable
    calls.clear()
    fresh.load("f")
    assert calls == []  # known durable now (cached): no more fsyncs
    assert store.verify().ok


def _names_session_and_path(err: StorageError, store: FileSystemSessionStore, sid: str) -> None:
    assert isinstance(err, SessionError)
    assert err.session_id == sid
    assert isinstance(err.path, Path) and err.path.is_relative_to(store.root)
    assert isinstance(err.__cause__, OSError)
    assert str(err.path) in str(err)


def _is_dir(fd: int) -> bool:
    import os
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_read_errors_are_storage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    store.save(make_session("p", 1))
    monkeypatch.setattr(atomic, "read_file", _failing(atomic.read_file, errno.EACCES))
    for call in (lambda: store.load("p"), lambda: store.load_loop("p", "p.test.1")):
        with pytest.raises(StorageError) as exc:
            call()
        assert exc.value.session_id == "p"
        assert exc.value.path is not None and exc.value.path.is_relative_to(store.root)


def test_a_fold_that_fails_on_io_does_not_fail_the_committed_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append whose record triggers a fold is durable before the fold starts: a fold
    that cannot write its blob files leaves checkpoint and journal as they were, the call
    returns, and the next append folds."""
    from loopstore.store import FOLD_MIN_RECORDS

    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    store.save(make_session("f", 1))
    for i in range(1, FOLD_MIN_RECORDS - 1):
        store.append_loop("f", make_loop("f", i))
    assert store.session_info("f").journal_records == FOLD_MIN_RECORDS - 1

    def blob_file(src_fd: int, src: str, dst_fd: int, dst: str) -> bool:
        return dst.endswith(".zst")

    monkeypatch.setattr(atomic, "rename", _failing(atomic.rename, errno.ENOSPC, blob_file))
    store.append_loop("f", make_loop("f", FOLD_MIN_RECORDS - 1))  # folding fails: no error
    info = store.session_info("f")
    assert info.loop_count == FOLD_MIN_RECORDS
    assert info.journal_records == FOLD_MIN_RECORDS  # not folded
    monkeypatch.undo()
    store.append_loop("f", make_loop("f", FOLD_MIN_RECORDS))
    info = store.session_info("f")
    assert info.journal_records == 0 and info.loop_count == FOLD_MIN_RECORDS + 1
    assert store.verify().ok
