"""Atomic file primitives: exclusive create, no-follow reads, fd-relative rmtree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from loopstore import atomic


@pytest.fixture
def dfd(tmp_path: Path):  # type: ignore[no-untyped-def]
    fd = atomic.open_dir(tmp_path)
    yield fd
    os.close(fd)


def test_create_read_rename(tmp_path: Path, dfd: int) -> None:
    atomic.create_file(dfd, "a.tmp", b"hello", point="staging")
    with pytest.raises(FileExistsError):
        atomic.create_file(dfd, "a.tmp", b"again", point=None)
    atomic.rename(dfd, "a.tmp", dfd, "a")
    atomic.sync(dfd, "staging")
    assert atomic.read_file(dfd, "a") == b"hello"
    assert not (tmp_path / "a.tmp").exists()


def test_read_of_large_file(tmp_path: Path, dfd: int) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "big").write_bytes(data)
    assert atomic.read_file(dfd, "big") == data


def test_symlinks_are_not_followed(tmp_path: Path, dfd: int) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (tmp_path / "link").symlink_to(outside / "secret")
    (tmp_path / "dirlink").symlink_to(outside)
    with pytest.raises(OSError) as exc:
        atomic.read_file(dfd, "link")
    assert exc.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        atomic.open_dir("dirlink", dfd)
    with pytest.raises(OSError):
        atomic.create_file(dfd, "link", b"x", point=None)
    assert (outside / "secret").read_bytes() == b"s"


def test_rmtree_at_does_not_follow_symlinks(tmp_path: Path, dfd: int) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-keep"
    outside.mkdir()
    (outside / "keep").write_text("k")
    tree = tmp_path / "tree" / "sub"
    tree.mkdir(parents=True)
    (tree / "f").write_text("f")
    (tree / "escape").symlink_to(outside)
    atomic.rmtree_at(dfd, "tree")
    assert not (tmp_path / "tree").exists()
    assert (outside / "keep").read_text() == "k"


def test_create_file_failure_leaves_nothing(
    tmp_path: Path, dfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(fd: int, *, data_only: bool = False) -> None:
        raise OSError(errno.EIO, "injected fsync failure")

    monkeypatch.setattr(atomic, "fsync", boom)
    with pytest.raises(OSError):
        atomic.create_file(dfd, "x.tmp", b"data", point="staging")
    assert not (tmp_path / "x.tmp").exists()


def test_atomic_write_path_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    target.write_bytes(b"old")
    atomic.atomic_write_path(target, b"new content", point="staging", tmp_prefix="s.json")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_a_skipped_sync_point_issues_no_fsync(
    tmp_path: Path, dfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopstore import faults

    calls: list[int] = []
    monkeypatch.setattr(atomic, "fsync", lambda fd, *, data_only=False: calls.append(fd))
    atomic.sync(dfd, "journal")
    with faults.skipping("journal"):
        atomic.sync(dfd, "journal")
        atomic.sync(dfd, "blob")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="unknown sync points"):
        faults.skipping("no-such-point").__enter__()
