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
    ("target", "err", "when"),
    [
        ("write_all", errno.ENOSPC, lambda *a: True),
        ("fsync", errno.EIO, lambda *a: True),
        # only the journal's fdatasync fails: the written record is taken back
        ("fsync", errno.EIO, lambda fd: not _is_dir(fd)),
    ],
)
def test_failed_commit_keeps_previous_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    err: int,
    when: Callable[..., bool],
) -> None:
    store = FileSystemSessionStore(tmp_path / "store", durable=True)
    before = make_session("f", 2)
    store.save(before)
    gen = store.session_info("f").generation
    monkeypatch.setattr(atomic, target, _failing(getattr(atomic, target), err, when))
    with pytest.raises(StorageError) as exc:
        store.append_loop("f", make_loop("f", 2))
    assert isinstance(exc.value, SessionError)
    assert exc.value.session_id == "f"
    assert exc.value.path is not None and exc.value.path.is_relative_to(store.root)
    assert isinstance(exc.value.__cause__, OSError)
    assert str(exc.value.path) in str(exc.value)
    with pytest.raises(StorageError):
        store.save(make_session("new-session", 1))
    monkeypatch.undo()
    # A new session is published by one rename of its staging directory: fail it.
    monkeypatch.setattr(atomic, "rename", _failing(atomic.rename, errno.EACCES))
    with pytest.raises(StorageError):
        store.save(make_session("new-session", 1))
    monkeypatch.undo()
    assert _dump(store.load("f")) == _dump(before)
    assert store.session_info("f").generation == gen
    assert not store.exists("new-session")
    assert store.verify().ok
    assert [p for p in (store.root / "tmp").iterdir()] == []
    # The store works again once the fault is gone.
    store.append_loop("f", make_loop("f", 2))
    assert len(store.load("f").loops) == 3


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
