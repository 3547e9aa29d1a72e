"""Backups (format v2): consistent, incremental copies of a live store into another store.

What every test leans on: a dest session is never compared by generation (the dest's may
differ) but by its *state key* (header + loop index, `_workers_backup.state_key`) and by
what loading it gives; both must be those of a state the source session had.

Tests taking `pair` run between every two backends ([fs-fs], [fs-s3], [s3-fs], [s3-s3]:
source-dest); hard links, inodes, journals, tree copies and rsync are a directory's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workers_backup as workers
from helpers import StoreFactory, blob_key, make_loop, make_session, manifest_key
from loopstore import cli, journal, ondisk
from loopstore.backup import BackupReport, backup, verify_backup
from loopstore.errors import CorruptSession, StorageError
from loopstore.fsbackend import FsSession
from loopstore.models import SessionScope
from loopstore.store import FileSystemSessionStore, SessionStore

CTX = mp.get_context("spawn")

_store = workers.open_store


def _populate(
    store: SessionStore, sessions: int = 3, loops: int = 3, *, checkpoint: bool = True
) -> list[str]:
    """Sessions sess-0.. of `loops` loops; with `checkpoint` every blob is a file in loops/."""
    ids = [f"sess-{i}" for i in range(sessions)]
    for sid in ids:
        store.save(make_session(sid, loops))
        if checkpoint:
            store.checkpoint(sid)
    return ids


def _ids(store: SessionStore) -> list[str]:
    """Session ids from the directory (not the listing catalog: see the catalog test)."""
    return sorted(sid for sid in store.backend.list_sessions() if store.exists(sid))


def _assert_mirrors(src: SessionStore, dst: SessionStore) -> None:
    """dst holds exactly src's sessions, each loading to the same bytes, and verifies clean."""
    report = dst.verify()
    assert report.ok, report.problems
    assert _ids(dst) == _ids(src)
    for sid in _ids(src):
        assert workers.snapshot(dst, sid) == workers.snapshot(src, sid)
        assert dst.load(sid) == src.load(sid)


def _blob_files(root: Path) -> dict[str, os.stat_result]:
    """Every blob file under a store root: 'session/digest.zst' -> its stat."""
    return {
        f"{p.parent.parent.name}/{p.name}": p.stat()
        for p in sorted((root / ondisk.SESSIONS_DIR).glob(f"*/{ondisk.LOOPS_DIR}/*.zst"))
    }


def _shared_inodes(a: Path, b: Path) -> set[str]:
    """Blob files of store `b` that are the same inode as a blob file of store `a`."""
    inodes = {(st.st_dev, st.st_ino) for st in _blob_files(a).values()}
    return {name for name, st in _blob_files(b).items() if (st.st_dev, st.st_ino) in inodes}


def _session_files(root: Path, sid: str) -> dict[str, tuple[int, int, bytes]]:
    """Every file of a session directory: relative name -> (inode, mtime_ns, bytes)."""
    base = root / ondisk.SESSIONS_DIR / sid
    return {
        p.relative_to(base).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


def _flip_byte(path: Path, offset: int) -> None:
    """Bit rot: one byte changed in place (same inode, same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _stored_size(store: SessionStore, sid: str, digest: str) -> int:
    return next(e.stored_size for e in store.session_state(sid).entries if e.blob == digest)


@pytest.fixture
def pair(
    make_store: StoreFactory, make_other_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> tuple[StoreFactory, StoreFactory]:
    """(source, dest) factories on every two backends. The AWS_* variables are set, so
    an s3:// URL given as a dest opens as the command line's would."""
    for f in (make_store, make_other_store):
        for name, value in f.env.items():
            monkeypatch.setenv(name, value)
    return make_store, make_other_store


@pytest.fixture
def dest_factory(make_other_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> StoreFactory:
    """A dest on either backend for a directory source (AWS_* set, as for `pair`)."""
    for name, value in make_other_store.env.items():
        monkeypatch.setenv(name, value)
    return make_other_store


def _open(f: StoreFactory, name: str, **opts: Any) -> SessionStore:
    """`_store` on either backend."""
    return f(name, **{"durable": False, "lock_timeout": 60.0, **opts})


def _place(f: StoreFactory, name: str) -> Path | str:
    """A dest as `backup` is given one: a directory, or an s3:// URL."""
    return f.location(name) if f.is_s3 else Path(f.location(name))


def _links(src: StoreFactory, dst: StoreFactory) -> bool:
    """Whether a backup from src to dst hard-links blobs (two directories only)."""
    return not (src.is_s3 or dst.is_s3)


def _dest_files(f: StoreFactory, name: str, sid: str) -> dict[str, Any]:
    """`_session_files` on either backend (objects: their bytes; they have no inode)."""
    if not f.is_s3:
        return dict(_session_files(Path(f.location(name)), sid))
    raw, base = f.raw(name), f"{ondisk.SESSIONS_DIR}/{sid}/"
    return {k[len(base) :]: raw.read(k) for k in raw.ls(base)}


# --------------------------------------------------------------------------- basics


def test_backup_is_a_valid_store_equal_to_the_source(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    link = _links(sf, df)
    src = _open(sf, "src")
    ids = _populate(src, checkpoint=False)  # every blob still lives in a journal
    dest = _place(df, "bk")
    seen: list[tuple[int, int]] = []
    report = src.backup(dest, progress=lambda d, t: seen.append((d, t)))  # a path: made a store
    assert isinstance(report, BackupReport) and report.ok and report.failed == []
    assert report.mode == ("link" if link else "copy")
    assert report.source == src.location and report.dest == str(dest)
    assert report.sessions == report.sessions_updated == 3 and report.sessions_unchanged == 0
    # journal-held blobs cannot be linked: they are copied out of the journal
    assert (report.files_copied, report.files_linked, report.files_skipped) == (9, 0, 0)
    assert report.blobs_verified == 9 and report.bytes_copied > 0
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    doc = report.as_dict()
    assert doc["ok"] is True and doc["failed"] == [] and doc["sessions"] == 3
    json.dumps(doc)  # JSON-ready

    assert df.raw("bk").exists(ondisk.MARKER_NAME)
    for sid in ids:  # each session installed at rest: checkpoint, empty sealed journal, blobs
        state = _open(df, "bk").session_state(sid)
        files = _dest_files(df, "bk", sid)
        if df.is_s3:  # a checkpoint and its blobs, no record
            assert {n for n in files if not n.startswith(ondisk.LOOPS_DIR)} == {
                ondisk.MANIFEST_NAME
            }
        else:
            assert files[ondisk.journal_filename(state.checkpoint_generation)][2] == journal.MARK
        assert state.records == 0 and state.journal_blobs == {}
        assert {n for n in files if n.startswith(ondisk.LOOPS_DIR)} == {
            f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(d)}" for d in state.blobs
        }
    with _open(df, "bk") as copy:
        _assert_mirrors(src, copy)
        assert copy.verify().orphans == []
    check = verify_backup(src, dest)
    assert check.ok and check.in_sync and check.current == ids and check.sessions_checked == 3
    assert check.as_dict()["in_sync"] is True

    again = backup(src, dest)
    assert again.ok and again.sessions == again.sessions_unchanged == 3
    assert again.sessions_updated == again.sessions_removed == 0
    assert again.files_copied == again.files_linked == again.bytes_copied == 0
    assert again.files_skipped == 9 and again.bytes_skipped == report.bytes_copied

    for sid in ids:  # once folded, the blobs are files: a fresh backup links every one
        src.checkpoint(sid)
    linked = backup(src, _place(df, "bk2"))
    if link:
        assert (linked.files_linked, linked.files_copied) == (9, 0)
        assert linked.bytes_linked == report.bytes_copied
        assert len(_shared_inodes(Path(sf.location("src")), Path(df.location("bk2")))) == 9
    else:  # (or copies them, to or from an object store)
        assert (linked.files_linked, linked.files_copied) == (0, 9)
        assert linked.bytes_copied == report.bytes_copied
    with _open(df, "bk2") as copy:
        _assert_mirrors(src, copy)


def test_unchanged_backup_writes_nothing(pair: tuple[StoreFactory, StoreFactory]) -> None:
    sf, df = pair
    src = _open(sf, "src")
    ids = _populate(src, sessions=4, loops=5)
    dest = _place(df, "bk")
    backup(src, dest)
    before = {sid: _dest_files(df, "bk", sid) for sid in ids}
    for _ in range(2):
        again = backup(src, dest)
        assert again.sessions_unchanged == 4 and again.sessions_updated == 0
        assert again.files_linked == again.files_copied == 0 and again.files_skipped == 20
    assert {sid: _dest_files(df, "bk", sid) for sid in ids} == before


def test_incremental_backup_rewrites_only_the_changed_session_and_moves_only_new_blobs(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    link = _links(sf, df)
    src = _open(sf, "src")
    ids = _populate(src, sessions=4, loops=5)
    dest = _place(df, "bk")
    backup(src, dest)
    before = {sid: _dest_files(df, "bk", sid) for sid in ids}

    # one new loop in sess-0, folded: its blob is a file, so it is linked (between two
    # directories; else copied)
    src.append_loop("sess-0", make_loop("sess-0", 5))
    src.checkpoint("sess-0")
    new = src.session_state("sess-0").entries[-1].blob
    first = backup(src, dest)
    assert first.ok and first.sessions_updated == 1 and first.sessions_unchanged == 3
    moved = (1, 0) if link else (0, 1)
    assert (first.files_linked, first.files_copied, first.files_skipped) == (*moved, 20)
    assert first.bytes_linked + first.bytes_copied == _stored_size(src, "sess-0", new)
    assert first.blobs_verified == 6  # the changed session's blobs, all hash-checked
    after = {sid: _dest_files(df, "bk", sid) for sid in ids}
    for sid in ids[1:]:
        assert after[sid] == before[sid]  # not rewritten: same inodes, times and bytes
    for name, was in before["sess-0"].items():
        if name.startswith(ondisk.LOOPS_DIR):
            if df.is_s3:
                assert after["sess-0"][name] == was
            else:
                assert after["sess-0"][name][0] == was[0] and after["sess-0"][name][2] == was[2]
    assert f"{ondisk.LOOPS_DIR}/{ondisk.blob_filename(new)}" in after["sess-0"]
    if link:
        src_root, dest_root = Path(sf.location("src")), Path(df.location("bk"))
        assert "sess-0/" + ondisk.blob_filename(new) in _shared_inodes(src_root, dest_root)

    # a new loop not yet folded lives in the journal: it is copied, not linked
    src.append_loop("sess-1", make_loop("sess-1", 5))
    second = backup(src, dest)
    assert (second.sessions_updated, second.files_copied, second.files_linked) == (1, 1, 0)

    # a loop replaced in place: one new blob; dest's old one is left for dest's gc
    old = src.session_state("sess-2").entries[2].blob
    src.append_loop("sess-2", make_loop("sess-2", 2, text_bytes=4321))
    src.checkpoint("sess-2")
    third = backup(src, dest)
    assert (third.sessions_updated, third.files_linked + third.files_copied) == (1, 1)
    with _open(df, "bk") as copy:
        _assert_mirrors(src, copy)
        # (an object store also lists the records its folds superseded, until gc)
        orphans = [o for o in copy.verify().orphans if o.kind != "stale_journal" or not df.is_s3]
        assert [(o.session_id, o.kind, Path(o.path).name) for o in orphans] == [
            ("sess-2", "orphan_blob", ondisk.blob_filename(old))
        ]
        assert copy.gc(grace=0).blobs_removed == 1
        assert copy.verify().orphans == []
    assert verify_backup(src, dest).in_sync


def test_other_filesystem_falls_back_to_copying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _store(tmp_path / "src")
    _populate(src, sessions=2)

    def cross_device(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    report = backup(src, tmp_path / "bk")
    assert report.ok and report.files_copied == 6 and report.files_linked == 0
    assert _shared_inodes(src.root, tmp_path / "bk") == set()
    with _store(tmp_path / "bk") as copy:
        _assert_mirrors(src, copy)


# --------------------------------------------------------------------------- pruning, refusals


def test_deleted_sessions_are_pruned_by_default_and_kept_on_request(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src)
    mirror, archive = _place(df, "mirror"), _place(df, "archive")
    backup(src, mirror)
    backup(src, archive)
    kept_before = _dest_files(df, "archive", "sess-1")
    src.delete("sess-1")

    kept = backup(src, archive, prune=False)
    assert kept.ok and kept.sessions_removed == 0 and kept.sessions_unchanged == 2
    assert _dest_files(df, "archive", "sess-1") == kept_before
    with _open(df, "archive") as copy:
        assert copy.verify().ok and copy.load("sess-1") == make_session("sess-1", 3)
    check = verify_backup(src, archive)
    assert check.ok and check.extra == ["sess-1"] and not check.in_sync

    pruned = backup(src, mirror)
    assert pruned.ok and pruned.sessions_removed == 1 and pruned.sessions == 2
    if df.is_s3:  # a deleted session's tombstone stays until gc (FORMAT.md 7)
        assert not df.raw("mirror").exists(manifest_key("sess-1"))
    else:
        assert not (Path(mirror) / ondisk.SESSIONS_DIR / "sess-1").exists()
    with _open(df, "mirror") as copy:
        assert not copy.exists("sess-1")
        _assert_mirrors(src, copy)
    assert verify_backup(src, mirror).in_sync


def test_pruning_leaves_what_is_not_a_session_alone(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dest = _place(df, "bk")
    backup(src, dest)
    raw = df.raw("bk")
    raw.write(f"{ondisk.SESSIONS_DIR}/notes/todo.txt", b"mine")  # a directory without a manifest
    raw.write("README.txt", b"mine too")
    report = backup(src, dest)
    assert report.ok and report.sessions_removed == 0
    assert raw.read(f"{ondisk.SESSIONS_DIR}/notes/todo.txt") == b"mine"
    assert raw.read("README.txt") == b"mine too"


def test_refuses_destinations_that_are_not_backups(tmp_path: Path) -> None:
    src = _store(tmp_path / "src")
    _populate(src, sessions=1)
    home = tmp_path / "home"
    home.mkdir()
    (home / "photo.jpg").write_bytes(b"\xff")
    with pytest.raises(StorageError, match="not a loopstore store; refusing"):
        backup(src, home)
    assert sorted(os.listdir(home)) == ["photo.jpg"]
    for overlapping in (src.root, src.root / "inside", src.root / ondisk.SESSIONS_DIR, tmp_path):
        with pytest.raises(StorageError, match="overlaps the source store"):
            backup(src, overlapping)
    assert not (src.root / "inside").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for under_file in (a_file, a_file / "sub"):
        with pytest.raises(StorageError, match="is not a directory"):
            backup(src, under_file)
    assert a_file.read_text() == "x"
    with pytest.raises(StorageError, match="no store marker"):
        verify_backup(src, home)
    skeleton = tmp_path / "racing"  # what a concurrent first backup has made so far
    (skeleton / ondisk.SESSIONS_DIR).mkdir(parents=True)
    (skeleton / ondisk.TMP_DIR).mkdir()
    assert backup(src, skeleton).ok
    assert verify_backup(src, skeleton).in_sync


# --------------------------------------------------------------------------- damaged sources


def _backed_up_then_damaged(
    tmp_path: Path, which: str, sf: StoreFactory | None = None
) -> tuple[SessionStore, Path, str]:
    """A source with a good backup (copies: no inode shared), then a new loop in sess-0
    and one byte flipped in a blob file of sess-0: the `new` loop's, or an `old` one's
    (which the backup already holds). Returns src, dest and the damaged digest. The
    source is a directory, or a store of `sf`'s backend."""
    src = _store(tmp_path / "src") if sf is None else _open(sf, "src")
    _populate(src, sessions=2)
    dest = tmp_path / "bk"
    assert backup(src, dest, link=False).ok
    src.append_loop("sess-0", make_loop("sess-0", 3))
    src.checkpoint("sess-0")
    entries = src.session_state("sess-0").entries
    digest = entries[-1].blob if which == "new" else entries[1].blob
    if sf is None or not sf.is_s3:
        path = src.layout.blob("sess-0", digest)  # type: ignore[attr-defined]
        _flip_byte(path, path.stat().st_size // 2)
    else:
        raw = sf.raw("src")
        data = bytearray(raw.read(blob_key("sess-0", digest)))
        data[len(data) // 2] ^= 0x5A
        raw.write(blob_key("sess-0", digest), bytes(data))
    with pytest.raises(CorruptSession):
        (_store(src.root) if sf is None else _open(sf, "src")).load("sess-0")  # type: ignore[attr-defined]
    return src, dest, digest


@pytest.mark.parametrize("link", [True, False], ids=["link", "copy"])
@pytest.mark.parametrize("which", ["new", "old"])
def test_a_damaged_source_blob_fails_its_session_and_dest_keeps_the_good_copy(
    tmp_path: Path, which: str, link: bool, make_store: StoreFactory
) -> None:
    """From a source on either backend into a directory (`link` is moot from S3)."""
    src, dest, digest = _backed_up_then_damaged(tmp_path, which, make_store)
    good = _store(dest).load_json("sess-0")
    before = _session_files(dest, "sess-0")

    report = backup(src, dest, link=link)
    assert not report.ok and [f.session_id for f in report.failed] == ["sess-0"]
    reason = report.failed[0].reason
    assert "damaged blob" in reason and ondisk.blob_filename(digest) in reason
    assert report.sessions == 1 and report.sessions_unchanged == 1  # sess-1: the run goes on
    assert report.files_linked == report.files_copied == 0
    assert report.as_dict()["ok"] is False

    assert _session_files(dest, "sess-0") == before  # nothing linked, copied or committed
    dest_blob = _store(dest).layout.blob("sess-0", digest)
    if which == "new":
        assert not dest_blob.exists()
    elif not make_store.is_s3:  # dest's own copy of it: still the good bytes, not the damaged inode
        src_blob = src.layout.blob("sess-0", digest)  # type: ignore[attr-defined]
        assert dest_blob.stat().st_ino != src_blob.stat().st_ino
    with _store(dest) as copy:
        assert copy.verify().ok and copy.load_json("sess-0") == good
    check = verify_backup(src, dest)
    assert check.ok and check.behind == ["sess-0"] and check.current == ["sess-1"]


def test_cli_backup_of_a_damaged_source_exits_1_and_names_the_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dest, digest = _backed_up_then_damaged(tmp_path, "new")
    good = _store(dest).load_json("sess-0")
    for extra in ([], ["--copy"]):
        code = cli.main(["--root", str(src.root), "backup", str(dest), *extra])
        out = capsys.readouterr().out
        assert code == 1
        assert "FAILED session 'sess-0'" in out and ondisk.blob_filename(digest) in out
        assert "1 failed" in out
    code = cli.main(["--root", str(src.root), "backup", str(dest), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["ok"] is False
    assert [f["session_id"] for f in doc["backup"]["failed"]] == ["sess-0"]
    assert cli.main(["--root", str(dest), "verify"]) == 0
    assert _store(dest).load_json("sess-0") == good


@pytest.mark.parametrize("reader", ["fresh", "cached"])
def test_damage_inside_a_journal_fails_the_session_not_the_run(tmp_path: Path, reader: str) -> None:
    """A journal-held blob with a byte flipped: the record's checksum fails and a sync
    mark follows it, so the journal is damaged (CorruptSession), not torn."""
    src = _store(tmp_path / "src")
    _populate(src, sessions=2)
    dest = tmp_path / "bk"
    assert backup(src, dest).ok
    good = _store(dest).load_json("sess-0")
    src.append_loop("sess-0", make_loop("sess-0", 3))  # held by the journal, not folded
    state = src.session_state("sess-0")
    path = src.layout.journal("sess-0", state.checkpoint_generation)
    frames, end = journal.scan(path.read_bytes())
    record = [f for f in frames if f.kind == journal.KIND_RECORD][-1]
    assert frames[-1].kind == journal.KIND_MARK and end == path.stat().st_size
    _flip_byte(path, record.payload_at + len(record.payload) // 2)
    # "cached": the writer's own store object (its parse of the journal is cached, so
    # only the blob hash catches it); "fresh": another process reads the damaged frame
    source = src if reader == "cached" else _store(src.root)
    with pytest.raises(CorruptSession):
        _store(src.root).load("sess-0")

    report = backup(source, dest)
    assert not report.ok and [f.session_id for f in report.failed] == ["sess-0"]
    assert ("bad journal" if reader == "fresh" else "damaged blob") in report.failed[0].reason
    assert report.sessions_unchanged == 1
    with _store(dest) as copy:
        assert copy.verify().ok and copy.load_json("sess-0") == good
    check = verify_backup(source, dest)
    assert check.dest_report.ok and check.current == ["sess-1"]
    assert "sess-0" not in check.current + check.missing + check.extra
    if reader == "cached":
        assert check.behind == ["sess-0"] and check.ok


def test_verify_backup_does_not_blame_the_backup_for_a_damaged_source(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dest = _place(df, "bk")
    assert backup(src, dest).ok
    raw = sf.raw("src")
    data = bytearray(raw.read(manifest_key("sess-0")))
    data[40] ^= 0x5A
    raw.write(manifest_key("sess-0"), bytes(data))
    check = verify_backup(_open(sf, "src"), dest)
    assert check.dest_report.ok and check.diverged == [] and check.ok and not check.in_sync
    assert [f.session_id for f in check.source_unreadable] == ["sess-0"]
    assert "bad manifest" in check.source_unreadable[0].reason


@pytest.mark.parametrize("link", [True, False], ids=["link", "copy"])
def test_bit_rot_in_an_unchanged_session_is_reported_by_a_checking_backup(
    pair: tuple[StoreFactory, StoreFactory], link: bool
) -> None:
    """An incremental backup stats an unchanged session's blobs (it copies nothing, so it
    vouches for nothing new); `check=True` reads and hash-checks them too."""
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=2)
    dest = _place(df, "bk")
    assert backup(src, dest, link=False).ok  # copies: dest's good version is its own
    good = _open(df, "bk").load_json("sess-0")
    raw, key = sf.raw("src"), blob_key("sess-0", src.session_state("sess-0").entries[1].blob)
    data = bytearray(raw.read(key))
    data[len(data) // 2] ^= 0x5A
    if sf.is_s3:
        raw.write(key, bytes(data))
    else:  # in place: the same inode, as bit rot is
        _flip_byte(Path(sf.location("src")) / key, len(data) // 2)
    quick = backup(src, dest, link=link)
    assert quick.ok and quick.sessions_unchanged == 2 and quick.blobs_verified == 0
    assert [p.session_id for p in src.verify().problems] == ["sess-0"]  # verify's job
    report = backup(src, dest, link=link, check=True)
    with _open(df, "bk") as copy:
        assert copy.verify().ok and copy.load_json("sess-0") == good
    assert [f.session_id for f in report.failed] == ["sess-0"]
    assert "damaged blob" in report.failed[0].reason and report.sessions_unchanged == 1


# --------------------------------------------------------------------------- copies and links


def test_copy_mode_shares_no_inode_with_the_source(tmp_path: Path) -> None:
    src = _store(tmp_path / "src")
    _populate(src, sessions=3, loops=4)
    dest = tmp_path / "bk"
    linked = backup(src, dest)
    assert linked.files_linked == 12 and len(_shared_inodes(src.root, dest)) == 12

    copied = backup(src, dest, link=False)
    assert copied.ok and copied.mode == "copy"
    assert copied.files_copied == 12 and copied.files_linked == 0
    assert copied.bytes_copied == linked.bytes_linked
    assert _shared_inodes(src.root, dest) == set()  # every shared inode replaced
    assert set(_blob_files(dest)) == set(_blob_files(src.root))
    with _store(dest) as copy:
        _assert_mirrors(src, copy)

    again = backup(src, dest, link=False)
    assert again.sessions_unchanged == 3 and again.files_copied == 0
    src.append_loop("sess-1", make_loop("sess-1", 4))
    src.checkpoint("sess-1")
    more = backup(src, dest, link=False)
    assert (more.files_copied, more.files_linked) == (1, 0)
    assert _shared_inodes(src.root, dest) == set()

    fresh = backup(src, tmp_path / "fresh", link=False)
    assert fresh.files_copied == 13 and _shared_inodes(src.root, tmp_path / "fresh") == set()
    with _store(tmp_path / "fresh") as copy:
        _assert_mirrors(src, copy)


def test_a_linking_backup_shares_in_place_damage_and_a_copying_one_does_not(
    tmp_path: Path,
) -> None:
    """Why `--copy` exists: a hard-linked blob is the source's inode, so bit rot in the
    source file is the same rot in a linking backup (which, the session being unchanged,
    does not notice either: see test_bit_rot_in_an_unchanged_session_is_reported)."""
    src = _store(tmp_path / "src")
    _populate(src, sessions=1)
    backup(src, tmp_path / "linked")
    backup(src, tmp_path / "copied", link=False)
    path = src.layout.blob("sess-0", src.session_state("sess-0").entries[0].blob)
    _flip_byte(path, path.stat().st_size // 2)
    with _store(tmp_path / "linked") as linked:
        assert [p.session_id for p in linked.verify().problems] == ["sess-0"]
    with _store(tmp_path / "copied") as copied:
        assert copied.verify().ok and copied.load("sess-0") == make_session("sess-0", 3)


def test_a_dest_store_object_whose_sessions_diverged_or_broke_gets_the_source_state(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    """Through the store interface (the code path every kind of store takes)."""
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=4)
    dst = _open(df, "bk")
    backup(src, dst)
    assert verify_backup(src, dst).in_sync
    dst.append_loop("sess-0", make_loop("sess-0", 7))  # written to directly
    shrunk = dst.load("sess-1")
    dst.save(
        shrunk.model_copy(update={"loops": shrunk.loops[:1], "scope": SessionScope.PERSISTENT})
    )
    raw = df.raw("bk")  # the dest's checkpoint damaged
    data = bytearray(raw.read(manifest_key("sess-2")))
    data[40] ^= 0x5A
    raw.write(manifest_key("sess-2"), bytes(data))
    dst.save(make_session("only-in-dest", 2))
    check = verify_backup(src, dst)
    assert sorted(check.diverged) == ["sess-0", "sess-1"] and check.extra == ["only-in-dest"]
    assert not check.ok and not check.dest_report.ok  # sess-2 is damaged

    report = backup(src, dst, prune=False)
    if df.is_s3:
        # An object store does not replace an unreadable copy in place: that session fails,
        # saying so (backup.py); once it is deleted there, the next run installs it.
        assert [f.session_id for f in report.failed] == ["sess-2"]
        assert "delete it there" in report.failed[0].reason
        assert report.sessions_updated == 2 and report.sessions_unchanged == 1
        dst.delete("sess-2")
        report = backup(src, dst, prune=False)
        assert report.ok and report.sessions_updated == 1 and report.sessions_unchanged == 3
    else:
        assert report.ok and report.sessions_updated == 3 and report.sessions_unchanged == 1
    with _open(df, "bk") as fresh:
        assert fresh.load("only-in-dest") == make_session("only-in-dest", 2)
        fresh.delete("only-in-dest")
        _assert_mirrors(src, fresh)
    assert verify_backup(src, dst).in_sync


def test_a_long_lived_dest_object_replaces_a_damaged_dest_checkpoint(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dst = _open(df, "bk")
    backup(src, dst)
    assert verify_backup(src, dst).in_sync  # dst has parsed (and cached) sess-0
    raw = df.raw("bk")
    data = bytearray(raw.read(manifest_key("sess-0")))
    data[40] ^= 0x5A
    raw.write(manifest_key("sess-0"), bytes(data))
    assert not dst.verify().ok
    report = backup(src, dst)
    if df.is_s3:  # not replaced in place on an object store: delete it there, back up again
        assert [f.session_id for f in report.failed] == ["sess-0"]
        assert "delete it there" in report.failed[0].reason
        dst.delete("sess-0")
        report = backup(src, dst)
    assert report.sessions_updated == 1 and dst.verify().ok


def test_verify_backup_reports_current_behind_missing_extra_and_diverged(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=5)
    dest = _place(df, "bk")
    backup(src, dest)
    src.append_loop("sess-0", make_loop("sess-0", 3))  # the backup is now behind
    src.save(make_session("sess-new"))  # missing from the backup
    src.delete("sess-1")  # extra in the backup
    with _open(df, "bk") as copy:  # somebody wrote into the backup itself
        copy.append_loop("sess-2", make_loop("sess-2", 3))
    check = verify_backup(src, dest)
    assert check.dest_report.ok
    assert check.current == ["sess-3", "sess-4"] and check.behind == ["sess-0"]
    assert check.missing == ["sess-new"] and check.extra == ["sess-1"]
    assert check.diverged == ["sess-2"] and not check.ok and not check.in_sync
    doc = check.as_dict()
    assert (doc["ok"], doc["diverged"], doc["problems"]) == (False, ["sess-2"], [])

    raw = df.raw("bk")
    blob = raw.ls(f"{ondisk.SESSIONS_DIR}/sess-3/{ondisk.LOOPS_DIR}/")[0]
    if not df.is_s3:
        (Path(df.location("bk")) / blob).unlink()  # hard links: damage a copy of its own
    raw.write(blob, b"rot")
    damaged = verify_backup(src, dest)
    assert not damaged.ok and [(p.session_id, p.kind) for p in damaged.dest_report.problems] == [
        ("sess-3", "undecodable")
    ]
    assert damaged.as_dict()["problems"][0]["session_id"] == "sess-3"

    assert backup(src, dest).ok  # brings behind, missing, extra and diverged in line
    after = verify_backup(src, dest)
    assert after.current == ["sess-0", "sess-2", "sess-3", "sess-4", "sess-new"]
    assert not (after.behind or after.missing or after.extra or after.diverged)


class _BeforeLockHook(SessionStore):
    """A dest that runs `before_lock` (once) before a session lock is taken: the source
    commits between the backup's read of it and the backup's write into dest. Its
    `after_lock` runs (once) as soon as the lock is held."""

    before_lock: Callable[[str], None] | None = None
    after_lock: Callable[[str], None] | None = None

    @contextlib.contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        hook, self.before_lock = self.before_lock, None
        if hook is not None:
            hook(session_id)
        with super().lock(session_id):
            after, self.after_lock = self.after_lock, None
            if after is not None:
                after(session_id)
            yield


class _CommitsBeforeDestLock(_BeforeLockHook, FileSystemSessionStore):
    pass


class _ReadHookSource(FileSystemSessionStore):
    """A source that runs `before_read` (once) before its next session-state read."""

    before_read: Callable[[], None] | None = None

    def read_state(self, h: Any, **kwargs: Any) -> Any:
        hook, self.before_read = self.before_read, None
        if hook is not None:
            hook()
        return super().read_state(h, **kwargs)


def _commits_before_dest_lock(f: StoreFactory, name: str) -> _BeforeLockHook:
    """A `_CommitsBeforeDestLock` on `f`'s backend."""
    if not f.is_s3:
        return _CommitsBeforeDestLock(f.location(name), durable=False)
    from loopstore.s3store import S3SessionStore

    class _S3CommitsBeforeDestLock(_BeforeLockHook, S3SessionStore):
        pass

    return _S3CommitsBeforeDestLock(f.location(name), **f.options)


def test_a_backup_publishes_the_state_the_source_holds_under_the_dest_lock(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    """The source commits between the backup's read and its taking of dest's lock: the
    backup reads again, so it never publishes an older state than the source had then
    (two backups into one dest cannot move a session back in time)."""
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dst = _commits_before_dest_lock(df, "bk")
    backup(src, dst)
    src.append_loop("sess-0", make_loop("sess-0", 3))
    dst.before_lock = lambda sid: src.append_loop(sid, make_loop(sid, 4))
    assert backup(src, dst).ok
    assert workers.snapshot(dst, "sess-0") == workers.snapshot(src, "sess-0")
    assert verify_backup(src, dst).current == ["sess-0"]


@pytest.mark.parametrize("race", ["install", "commit"])
def test_a_backup_raced_by_another_process_into_one_dest_still_completes(
    tmp_path: Path, dest_factory: StoreFactory, race: str
) -> None:
    """Another process backs up into the same dest while this backup holds the dest
    session's lock, between its read of dest and its write: a session dest lacks (it
    installs), or a newer state (it commits). A directory's lock makes the other process
    wait (it gives up: locked); an object store's lock excludes this process's threads
    only (FORMAT.md 7), so the other publishes first and this backup, like every writer
    that loses a compare-and-swap, reads dest again: it completes, dest in sync."""
    src = _ReadHookSource(tmp_path / "src", durable=False)
    _populate(src, sessions=1)
    dst = _commits_before_dest_lock(dest_factory, "bk")
    if race == "commit":
        assert backup(src, dst).ok
        src.append_loop("sess-0", make_loop("sess-0", 3))
    others: list[list[tuple[str, str]]] = []
    with ProcessPoolExecutor(1, mp_context=CTX) as pool:

        def other_backup() -> None:
            job = pool.submit(workers.backup_once, str(src.root), dest_factory.spec("bk"), 0.5)
            others.append(job.result(timeout=120))

        def arm(sid: str) -> None:
            # dest's lock held, dest read: the next source read is the last check before
            # publishing
            src.before_read = other_backup

        dst.after_lock = arm
        report = backup(src, dst)
    assert report.ok, report.failed
    assert verify_backup(src, dst).in_sync
    if dest_factory.is_s3:
        assert others == [[]]  # nothing held it back
    else:
        assert [[sid for sid, why in o if "lock" in why] for o in others] == [["sess-0"]]
    with _open(dest_factory, "bk") as copy:
        _assert_mirrors(src, copy)


def test_verify_backup_calls_a_state_the_source_had_behind(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    """An updated dest session carries its source state's commit time, so verify_backup
    orders it correctly against the source's later commits."""
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dst = _open(df, "bk")
    backup(src, dst)
    src.append_loop("sess-0", make_loop("sess-0", 3))
    assert backup(src, dst).sessions_updated == 1  # a record in dest, not a new session
    copied = workers.snapshot(dst, "sess-0")
    assert dst.session_state("sess-0").committed_at_ns == (
        src.session_state("sess-0").committed_at_ns
    )
    src.append_loop("sess-0", make_loop("sess-0", 4))
    check = verify_backup(src, dst)
    assert check.behind == ["sess-0"] and check.ok, check
    assert workers.snapshot(dst, "sess-0") == copied


def test_backup_repairs_a_damaged_blob_in_the_backup(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dest = _place(df, "bk")
    backup(src, dest)
    raw = df.raw("bk")
    raw.delete(raw.ls(f"{ondisk.SESSIONS_DIR}/sess-0/{ondisk.LOOPS_DIR}/")[0])  # lost
    assert not verify_backup(src, dest).ok
    assert backup(src, dest).ok
    assert verify_backup(src, dest).in_sync


# --------------------------------------------------------------------------- live writers


def test_backups_under_live_writers_hold_only_states_the_source_had(
    tmp_path: Path, dest_factory: StoreFactory
) -> None:
    """2 writer processes append, replace in place, save, fold, delete and re-create while
    2 backup processes (one linking, one copying) run into the same dest. After every
    run, every dest session is a logged source state (key and loaded JSON) and dest
    verifies clean; the final run is in sync. The source is a directory (its writers log
    under the session lock, which excludes other processes there only); the dest is on
    either backend."""
    root, log = tmp_path / "src", tmp_path / "states.jsonl"
    dest, dest_spec = _place(dest_factory, "bk"), dest_factory.spec("bk")
    stop = tmp_path / "writers-done"
    src = _store(root)
    ids = _populate(src, sessions=4, loops=2)
    workers.log_states(str(root), str(log))
    commits = 150
    with ProcessPoolExecutor(4, mp_context=CTX) as pool:
        backups = [
            pool.submit(workers.backup_worker, str(root), dest_spec, 3, str(stop), link)
            # one on S3, where nothing excludes two backup processes from one dest session:
            # see test_a_backup_raced_by_another_process_into_one_dest_still_completes
            for link in ((True,) if dest_factory.is_s3 else (True, False))
        ]
        try:
            writers = [
                pool.submit(workers.writer_worker, str(root), ids, w, commits, str(log))
                for w in range(2)
            ]
            done = [f.result(timeout=240) for f in writers]
        finally:
            stop.touch()  # the backup workers stop even if a writer failed
        runs = [r for f in backups for r in f.result(timeout=240)]
    assert done == [commits, commits]
    states = workers.read_log(log)
    seen: set[tuple[str, str, str]] = set()
    for run in runs:
        if dest_factory.is_s3:
            # A copy into an object store takes longer than a hard link: a session the
            # writers changed at each of backup's READ_RETRIES reads during its copy is
            # given up for that run, by name (the final run below has no writers).
            assert all("kept changing" in why for _sid, why in run["failed"]), run["failed"]
        else:
            assert run["failed"] == [], run["failed"]
        assert run["dest_ok"], run["problems"]
        assert run["diverged"] == []  # dest holds source states with their commit times
        for sid, (key, digest) in run["state"].items():
            assert (sid, key, digest) in states, f"{sid}: a state the source never had"
            seen.add((sid, key, digest))
    print(f"{len(runs)} backup runs held {len(seen)} distinct source states")
    assert sum(run["updated"] for run in runs) > 0

    final = backup(src, dest)
    assert final.ok
    assert verify_backup(src, dest).in_sync
    with _open(dest_factory, "bk") as copy:
        _assert_mirrors(src, copy)


def _wait_for(path: Path, proc: Any, what: str) -> None:
    deadline = time.monotonic() + 60  # a safety net for a hung worker, not a measurement
    while not path.exists():
        assert proc.is_alive(), f"worker exited ({proc.exitcode}) before {what}"
        assert time.monotonic() < deadline, f"worker never reached {what}"
        time.sleep(0.01)


# Every kill point but "between" (the progress callback) pauses at the filesystem's
# rename seam (loopstore.atomic.rename): a directory dest only.
@pytest.mark.parametrize(
    ("mode", "other_backend"),
    [("between", "fs"), ("install", "fs"), ("blobs", "fs"), ("fold", "fs"), ("between", "s3")],
)
def test_killed_backup_leaves_a_valid_dest_and_the_next_run_completes(
    tmp_path: Path, mode: str, dest_factory: StoreFactory
) -> None:
    src = _store(tmp_path / "src")
    ids = _populate(src, sessions=6, loops=3)
    dest, signal = _place(dest_factory, "bk"), tmp_path / "paused"
    old: dict[str, tuple[str, str]] = {}
    if mode in ("blobs", "fold"):  # these kill an update of sessions dest already has
        assert backup(src, _open(dest_factory, "bk")).ok
        old = workers.snapshot_all(src)
        for sid in ids:
            src.append_loop(sid, make_loop(sid, 3))
            src.append_loop(sid, make_loop(sid, 4))
            src.checkpoint(sid)
    new = workers.snapshot_all(src)

    proc = CTX.Process(
        target=workers.killable_backup,
        args=(str(src.root), dest_factory.spec("bk"), mode, str(signal)),
    )
    proc.start()
    try:
        _wait_for(signal, proc, f"its {mode!r} pause")
    finally:
        proc.kill()  # SIGKILL
        proc.join(30)
    assert proc.exitcode == -9

    with _open(dest_factory, "bk") as partial:
        report = partial.verify()
        assert report.ok, report.problems
        held = workers.snapshot_all(partial)
        for sid, snap in held.items():
            assert snap in (old.get(sid), new[sid])  # the old state or the new one, whole
        check = verify_backup(src, partial)
        assert check.ok and not check.diverged
        assert mode == "between" or not check.in_sync  # one session was cut short
        # Sessions are copied a few at a time (BACKUP_THREADS): besides the one it
        # stopped in, others may have finished, or been cut short too.
        assert check.missing == [s for s in ids if s not in held]
        assert check.behind == [s for s in ids if s in held and held[s] != new[s]]
        if mode == "between":  # killed once 3 sessions were reported done
            assert set(ids[:3]) <= set(held)
        elif mode == "install":  # the 3rd new session was staged, never published
            kinds = {o.kind for o in partial.verify(grace=0).orphans}
            assert check.missing and kinds == {"stale_tmp"}
        elif mode == "blobs":  # a new blob placed, the record never written
            assert check.behind
            kinds = {o.kind for o in report.orphans}  # and a fold cut short elsewhere
            assert "orphan_blob" in kinds and kinds <= {"orphan_blob", "stale_journal"}
        else:  # committed in dest, never folded: the new state, from the journal
            unfolded = [s for s in held if partial.session_state(s).records]
            assert unfolded and all(held[s] == new[s] for s in unfolded)

    again = backup(src, dest)
    assert again.ok
    assert again.sessions_updated == len([s for s in ids if held.get(s) != new[s]])
    assert verify_backup(src, dest).in_sync
    with _open(dest_factory, "bk") as copy:
        _assert_mirrors(src, copy)
        copy.gc(grace=0)
        assert copy.verify(grace=0).orphans == []


# --------------------------------------------------------------------------- tree copies


def _tree_copy(src: Path, dst: Path) -> None:
    """What to back up of a store by hand (docs/FORMAT.md section 1): marker and sessions/."""
    dst.mkdir(parents=True)
    shutil.copy2(src / ondisk.MARKER_NAME, dst / ondisk.MARKER_NAME)
    shutil.copytree(src / ondisk.SESSIONS_DIR, dst / ondisk.SESSIONS_DIR)


def test_tree_copy_of_a_checkpointed_quiet_store_is_a_valid_store(tmp_path: Path) -> None:
    """The rsync recipe: `checkpoint` every session, no writer running, copy the tree."""
    src = _store(tmp_path / "src")
    ids = _populate(src, sessions=3, checkpoint=False)
    src.append_loop("sess-0", make_loop("sess-0", 3))
    for sid in ids:
        src.checkpoint(sid)
        assert src.session_state(sid).journal_blobs == {}  # every blob is a plain file
    _tree_copy(src.root, tmp_path / "copy")
    shutil.copytree(src.root, tmp_path / "whole")  # locks/, tmp/ and the catalog as well
    for copy_root in (tmp_path / "copy", tmp_path / "whole"):
        with _store(copy_root) as copy:
            _assert_mirrors(src, copy)
            assert copy.verify().orphans == []
            assert {s: copy.session_state(s).generation for s in ids} == {
                s: src.session_state(s).generation for s in ids
            }
    # without the checkpoint too, as long as no writer runs: the journals come along
    src.append_loop("sess-1", make_loop("sess-1", 3))
    _tree_copy(src.root, tmp_path / "journals")
    with _store(tmp_path / "journals") as copy:
        _assert_mirrors(src, copy)
    # a backup is at rest (checkpoints, empty journals): copying it needs no checkpoint
    backup(src, tmp_path / "bk")
    _tree_copy(tmp_path / "bk", tmp_path / "offsite")
    with _store(tmp_path / "offsite") as copy:
        _assert_mirrors(src, copy)


def test_real_rsync_of_a_checkpointed_store_is_valid_and_incremental(tmp_path: Path) -> None:
    binary = shutil.which("rsync")
    if binary is None:  # a failure, not a skip: .ci/run installs it, as it does strace
        pytest.fail("no rsync binary on PATH: install it (apt-get install rsync)")
    src = _store(tmp_path / "src")
    ids = _populate(src, sessions=3)
    offsite = tmp_path / "offsite"
    excludes = ["--exclude=/tmp/", "--exclude=/locks/", "--exclude=/catalog*"]

    def rsync() -> int:
        out = subprocess.run(
            [binary, "-a", "--delete", *excludes, "--stats", f"{src.root}/", f"{offsite}/"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        line = next(x for x in out.splitlines() if "regular files transferred" in x)
        return int(line.split(":")[1].strip().replace(",", ""))

    assert rsync() == 1 + 3 * (3 + 2)  # marker; per session 3 blobs, manifest, journal
    with _store(offsite) as copy:
        _assert_mirrors(src, copy)
    src.append_loop("sess-2", make_loop("sess-2", 3))
    src.checkpoint("sess-2")
    assert rsync() == 3  # the new blob, the new manifest, the new (empty) journal
    with _store(offsite) as copy:
        _assert_mirrors(src, copy)
        assert copy.verify().orphans == []  # --delete removed the old journal
    assert ids == _ids(src)


def test_tree_copy_that_caught_a_journal_mid_append_reads_the_records_before_it(
    tmp_path: Path,
) -> None:
    """A copy of a live journal is a prefix of it, which may end inside a record (the
    writer's pwrite was not finished when the copier read): that is a torn tail, and
    readers of the copy stop before it. Every prefix is tried at the interesting cuts."""
    src = _store(tmp_path / "src")
    _populate(src, sessions=1, loops=2)
    states = [src.load_json("sess-0")]
    for i in range(2, 5):
        src.append_loop("sess-0", make_loop("sess-0", i))
        states.append(src.load_json("sess-0"))
    gen = src.session_state("sess-0").checkpoint_generation
    jpath = src.layout.journal("sess-0", gen)
    data = jpath.read_bytes()
    frames, _end = journal.scan(data)
    records = [f for f in frames if f.kind == journal.KIND_RECORD]
    assert len(records) == 3
    cuts = {0, len(data)}
    for f in frames:  # in the header, the meta, the payload, the last byte, the boundary
        cuts |= {f.offset + 5, f.offset + 30, f.payload_at + 10, f.end - 1, f.end}
    for cut in sorted(c for c in cuts if 0 <= c <= len(data)):
        copy_root = tmp_path / f"cut-{cut}"
        _tree_copy(src.root, copy_root)
        (copy_root / ondisk.SESSIONS_DIR / "sess-0" / jpath.name).write_bytes(data[:cut])
        whole = sum(1 for r in records if r.end <= cut)
        with _store(copy_root) as copy:
            assert copy.load_json("sess-0") == states[whole], f"cut at {cut}"
            report = copy.verify()
            assert report.ok, (cut, report.problems)
            torn = [o for o in report.orphans if o.kind == "torn_tail"]
            assert bool(torn) == (cut not in {f.end for f in frames} | {0}), cut


def test_tree_copy_of_a_live_store_with_appending_writers_is_readable(tmp_path: Path) -> None:
    """Real copies (shutil.copytree) of a store while a writer process appends: every
    copied session loads to a state the writer logged. Appends only: a fold during the
    copy is the case the next test shows is not safe."""
    root, log = tmp_path / "src", tmp_path / "states.jsonl"
    src = _store(root)
    ids = _populate(src, sessions=2, loops=1)
    workers.log_states(str(root), str(log))
    copies: list[Path] = []
    with ProcessPoolExecutor(1, mp_context=CTX) as pool:
        writer = pool.submit(workers.append_worker, str(root), ids, 40, str(log))
        while not writer.done() or not copies:
            copy_root = tmp_path / f"copy-{len(copies)}"
            _tree_copy(root, copy_root)
            copies.append(copy_root)
        assert writer.result() == 40
    assert src.session_state("sess-0").records == 20  # no fold happened
    states = workers.read_log(log)
    torn = 0
    for copy_root in copies:
        with _store(copy_root) as copy:
            report = copy.verify()
            assert report.ok, report.problems
            torn += sum(o.kind == "torn_tail" for o in report.orphans)
            for sid, (key, digest) in workers.snapshot_all(copy).items():
                assert (sid, key, digest) in states
    print(f"{len(copies)} live copies, {torn} with a torn journal tail")


def test_tree_copy_during_a_fold_can_miss_blobs_and_backup_does_not(tmp_path: Path) -> None:
    """Why a live tree copy is not a backup: copying in rsync's order (journal, loops/,
    manifest.json), a fold between loops/ and manifest.json gives a checkpoint naming
    blobs the copy does not have. `backup` of the same moment is consistent."""
    src = _store(tmp_path / "src")
    _populate(src, sessions=1)
    src.append_loop("sess-0", make_loop("sess-0", 3))  # journal-held until the fold
    sdir = src.root / ondisk.SESSIONS_DIR / "sess-0"
    naive = tmp_path / "naive"
    target = naive / ondisk.SESSIONS_DIR / "sess-0"
    target.mkdir(parents=True)
    shutil.copy2(src.root / ondisk.MARKER_NAME, naive / ondisk.MARKER_NAME)
    names = sorted(p.name for p in sdir.iterdir())
    assert names[-2:] == [ondisk.LOOPS_DIR, ondisk.MANIFEST_NAME]
    for name in names:
        if name == ondisk.MANIFEST_NAME:
            src.checkpoint("sess-0")  # the writer folds while the copy is under way
            bk = backup(src, tmp_path / "bk")
        if (sdir / name).is_dir():
            shutil.copytree(sdir / name, target / name)
        elif (sdir / name).exists():
            shutil.copy2(sdir / name, target / name)
    with _store(naive) as copy:
        with pytest.raises(CorruptSession, match="missing blob"):
            copy.load("sess-0")
        kinds = [(p.session_id, p.kind) for p in copy.verify().problems]
        assert kinds == [("sess-0", "missing_blob")]
    assert bk.ok
    with _store(tmp_path / "bk") as copy:
        _assert_mirrors(src, copy)


# --------------------------------------------------------------------------- library gaps


def _gc_races_the_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sf: StoreFactory
) -> tuple[SessionStore, Path, BackupReport, set[tuple[str, str]]]:
    """While backup reads sess-0's blobs, a writer replaces one of its loops, folds and a
    gc with no grace removes the old blob (what gc does to a blob once the grace period
    is over). Returns src (on `sf`'s backend), dest (a directory), the report and
    sess-0's source states since dest's copy."""
    src = _open(sf, "src")
    _populate(src, sessions=2)
    dest = tmp_path / "bk"
    assert backup(src, dest).ok
    states = {workers.snapshot(src, "sess-0")}  # dest's copy
    src.append_loop("sess-0", make_loop("sess-0", 3))
    src.checkpoint("sess-0")
    states.add(workers.snapshot(src, "sess-0"))  # what backup reads
    old = src.session_state("sess-0").entries[1].blob
    if sf.is_s3:
        from loopstore.s3backend import S3Session as handle_class
    else:
        handle_class = FsSession  # type: ignore[assignment]
    inner = handle_class.blob
    fired: list[str] = []

    def racing(self: Any, digest: str) -> bytes:
        in_src = str(self.blob_path(digest)).startswith(src.location + "/")
        if digest == old and not fired and in_src:
            fired.append(digest)
            src.append_loop("sess-0", make_loop("sess-0", 1, text_bytes=4321))
            src.checkpoint("sess-0")
            assert src.gc(grace=0).blobs_removed == 1
            states.add(workers.snapshot(src, "sess-0"))
        return inner(self, digest)

    monkeypatch.setattr(handle_class, "blob", racing)
    report = backup(src, dest)
    monkeypatch.setattr(handle_class, "blob", inner)
    assert fired
    return src, dest, report, states


def test_a_blob_collected_mid_backup_never_tears_the_dest_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_store: StoreFactory
) -> None:
    src, dest, report, states = _gc_races_the_backup(tmp_path, monkeypatch, make_store)
    assert [f.session_id for f in report.failed] in ([], ["sess-0"])
    with _store(dest) as copy:
        assert copy.verify().ok
        # dest's previous copy (the session failed), or a whole state the source had
        assert workers.snapshot(copy, "sess-0") in states
    again = backup(src, dest)
    assert again.ok and verify_backup(src, dest).in_sync


def test_a_blob_collected_mid_backup_is_retried_on_the_newer_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_store: StoreFactory
) -> None:
    _src, dest, report, states = _gc_races_the_backup(tmp_path, monkeypatch, make_store)
    assert report.ok, report.failed
    assert workers.snapshot(_store(dest), "sess-0") in states


def test_sessions_a_backup_installs_are_listed_in_dest(
    pair: tuple[StoreFactory, StoreFactory],
) -> None:
    sf, df = pair
    src = _open(sf, "src")
    _populate(src, sessions=1)
    dest = _place(df, "bk")
    backup(src, dest)
    assert _open(df, "bk").list_ids() == ["sess-0"]  # the dest's catalog is built
    src.save(make_session("sess-9", 2))
    assert backup(src, dest).ok
    with _open(df, "bk") as copy:
        assert sorted(copy.list_ids()) == ["sess-0", "sess-9"]
        assert copy.verify().ok
