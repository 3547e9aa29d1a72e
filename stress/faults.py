"""Fault injection inside a worker process: some writes fail with ENOSPC / EIO on purpose.

`loopstore.atomic` routes every store write through three module-level seams, `write_all`,
`fsync` and `rename` (its docstring names them as the places to inject OSError). `install`
rebinds those three in that worker process only, so a fraction of calls raise an injected
`OSError` before doing anything. Reads are never faulted.

The seams also note, per thread, whether the call in progress has passed its commit point
(format v2: writing a journal record, the rename that publishes a new session's directory,
or the rename of a session directory to a `deleted-*` name): a write that failed *before*
that point must leave the old state; one that failed after it (say, the fdatasync right
after the record was written) may have taken effect.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

INJECTED_ERRNOS = (errno.ENOSPC, errno.EIO)
RECORD_FRAME_START = b"LSJ1R"
"""A journal record frame starts so (loopstore.journal): writing one is a commit point."""
NEW_SESSION_PREFIX = "new-"
DELETE_PREFIX = "deleted-"

_local = threading.local()
_state: dict[str, Any] = {"installed": False, "counts": {}}


class InjectedFault(OSError):
    """An OSError raised on purpose (its own type so checks can tell it from a real one)."""


def installed() -> bool:
    return bool(_state["installed"])


def begin_op() -> None:
    _local.committed = False


def commit_passed() -> bool | None:
    """True/False when faults are installed; None (unknown) otherwise."""
    if not installed():
        return None
    return bool(getattr(_local, "committed", False))


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    old = getattr(_local, "suspended", False)
    _local.suspended = True
    try:
        yield
    finally:
        _local.suspended = old


def counts() -> dict[str, int]:
    return dict(_state["counts"])


def _maybe_fail(where: str) -> None:
    if getattr(_local, "suspended", False):
        return
    with _state["lock"]:
        rng: random.Random = _state["rng"]
        hit = rng.random() < _state["rate"]
        code = rng.choice(INJECTED_ERRNOS)
        if hit:
            key = f"{where}:{errno.errorcode[code]}"
            _state["counts"][key] = _state["counts"].get(key, 0) + 1
    if hit:
        raise InjectedFault(code, f"injected {os.strerror(code)} in {where}")


def install(rate: float, rng: random.Random) -> list[str]:
    """Wrap loopstore.atomic's write_all / fsync / rename seams; returns what was patched."""
    from loopstore import atomic

    _state.update(installed=True, rate=rate, rng=rng, lock=threading.Lock(), counts={})
    real_write: Callable[..., None] = atomic.write_all
    real_fsync: Callable[..., None] = atomic.fsync
    real_rename: Callable[..., None] = atomic.rename

    def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
        _maybe_fail("write")
        real_write(fd, data, offset)
        if bytes(data[:5]) == RECORD_FRAME_START:
            _local.committed = True  # a journal record: readers may take it from here on

    def fsync(fd: int, *, data_only: bool = False) -> None:
        _maybe_fail("fsync")
        real_fsync(fd, data_only=data_only)

    def rename(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
        _maybe_fail("rename")
        real_rename(src_dir_fd, src, dst_dir_fd, dst)
        if str(src).startswith(NEW_SESSION_PREFIX) or str(dst).startswith(DELETE_PREFIX):
            _local.committed = True

    atomic.write_all = write_all
    atomic.fsync = fsync
    atomic.rename = rename
    return ["loopstore.atomic.write_all", "loopstore.atomic.fsync", "loopstore.atomic.rename"]


def check_seams() -> list[str]:
    """Names the store uses that bypass the seams (imported by value), which would dodge faults."""
    import importlib

    problems = []
    for name in ("loopstore.store", "loopstore.fsbackend", "loopstore.catalog"):
        try:
            mod: Any = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ("write_all", "fsync", "rename"):
            if attr in vars(mod):
                problems.append(f"{name} imports atomic.{attr} by value; faults would not reach it")
    return problems
