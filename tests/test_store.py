"""FileSystemSessionStore: API behaviour, format v2 on disk, damage detection, gc."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from helpers import lock_held_in_thread, loop_blob, make_loop, make_session
from loopstore import ondisk
from loopstore.aio import AsyncFileSystemSessionStore
from loopstore.errors import (
    CorruptSession,
    InvalidSessionId,
    LoopNotFound,
    SessionNotFound,
    UnsupportedFormat,
)
from loopstore.store import FileSystemSessionStore


@pytest.fixture
def store(tmp_path: Path) -> FileSystemSessionStore:
    return FileSystemSessionStore(tmp_path / "store", durable=False, lock_timeout=2)


def _blobs(store: FileSystemSessionStore, sid: str) -> list[Path]:
    """The session's blob files, once its journal is folded (blobs become files then)."""
    store.checkpoint(sid)
    return sorted((store.root / "sessions" / sid / "loops").iterdir())


def _dump(obj: object) -> str:
    return obj.model_dump_json()  # type: ignore[attr-defined,no-any-return]


def test_layout_and_round_trip(tmp_path: Path) -> None:
    store = FileSystemSessionStore(tmp_path / "store")  # durable
    s = make_session("s1", 3)
    store.save(s)
    root = store.root
    marker = json.loads((root / "loopstore.json").read_text())
    assert marker == {"format": "loopstore", "version": 2, "hash": "xxh3_128", "codec": "zstd"}
    sdir = root / "sessions" / "s1"
    # A new session is its checkpoint plus the journal holding its first commit.
    assert sorted(p.name for p in sdir.iterdir()) == ["journal-0.log", "manifest.json"]
    assert (root / "locks" / "s1.lock").is_file()
    assert (root / "tmp").is_dir()
    assert _dump(store.load("s1")) == _dump(s)
    blobs = _blobs(store, "s1")  # folded: the journal's blobs become files
    assert sorted(p.name for p in sdir.iterdir()) == ["journal-1.log", "loops", "manifest.json"]
    assert len(blobs) == 3
    expected = sorted(loop_blob(lp).name for lp in s.loops)
    assert [p.name for p in blobs] == expected
    assert not list((root / "tmp").iterdir())
    back = store.load("s1")
    assert _dump(back) == _dump(s)
    assert store.exists("s1") and not store.exists("s2")
    assert store.list_ids() == ["s1"]


def test_save_writes_only_new_blobs_and_bumps_generation(store: FileSystemSessionStore) -> None:
    s = make_session("g", 3)
    store.save(s)
    first = {p.name: p.stat().st_mtime_ns for p in _blobs(store, "g")}
    assert store.session_info("g").generation == 1
    store.save(s)  # identical: nothing to commit
    assert store.session_info("g").generation == 1
    s.loops.append(make_loop("g", 3, parent_loop_id=s.loops[-1].loop_id))
    journal = store.root / "sessions" / "g" / "journal-1.log"
    before = journal.stat().st_size
    store.save(s)
    info = store.session_info("g")
    assert info.generation == 2 and info.loop_count == 4 and info.journal_records == 1
    new_blob = loop_blob(s.loops[-1]).data
    # The record carries the one new blob, not the three stored ones.
    assert before < journal.stat().st_size < before + len(new_blob) + 2000
    after = {p.name: p.stat().st_mtime_ns for p in _blobs(store, "g")}
    assert len(after) == 4
    assert all(after[name] == mtime for name, mtime in first.items())


def test_append_loop_without_header_opens_the_session_like_the_recorder(
    store: FileSystemSessionStore,
) -> None:
    first = make_loop("n", 0)
    store.append_loop("n", first)
    s = store.load("n")
    assert s.agent_id == first.agent_id
    assert s.created_at == s.last_active_at == first.started_at
    assert s.model_dump(mode="json")["formation"] == {"FirstLoop": {"timestamp": first.started_at}}
    assert s.parent_spawn_ref is None
    assert [lp.loop_id for lp in s.loops] == [first.loop_id]


def test_the_first_loop_header_is_what_the_session_model_writes() -> None:
    from loopstore.models import Session, SessionFormation
    from loopstore.store import _first_loop_header

    loop = make_loop("h", 3)
    expected = Session(
        session_id="h",
        agent_id=loop.agent_id,
        created_at=loop.started_at,
        last_active_at=loop.started_at,
        formation=SessionFormation.first_loop(loop.started_at),
        parent_spawn_ref=None,
        loops=[],
    ).header()
    assert _first_loop_header("h", loop) == expected
    assert list(_first_loop_header("h", loop)) == list(expected)


def test_append_loop_adds_replaces_and_creates(store: FileSystemSessionStore) -> None:
    header = make_session("a", 0)
    store.append_loop("a", make_loop("a", 0), session=header)
    store.append_loop("a", make_loop("a", 1))
    store.append_loop("a", make_loop("a", 2))
    ids = [lp.loop_id for lp in store.load("a").loops]
    assert ids == ["a.test.1", "a.test.2", "a.test.3"]
    # last_active_at follows the newest loop start, as phi-core's recorder does.
    assert store.load("a").last_active_at == make_loop("a", 2).started_at
    replaced = make_loop("a", 1, status="Rejected")
    store.append_loop("a", replaced)
    loops = store.load("a").loops
    assert [lp.loop_id for lp in loops] == ids
    assert loops[1].status == "Rejected"
    assert store.session_info("a").generation == 4
    store.append_loop("a", replaced)  # same content: no new commit
    assert store.session_info("a").generation == 4
    with pytest.raises(ValueError):
        store.append_loop("b", make_loop("b", 0), session=make_session("other", 0))
    # A loop of another session is refused, naming both ids.
    with pytest.raises(InvalidSessionId, match=r"'b'.*'a'|'a'.*'b'"):
        store.append_loop("a", make_loop("b", 5))
    assert not store.exists("b")


def test_load_loop_decodes_only_its_blob(store: FileSystemSessionStore) -> None:
    s = make_session("ll", 3)
    store.save(s)
    store.checkpoint("ll")
    info = store.session_info("ll")
    # Damage loop 0's blob: loading loop 2 must not touch it.
    victim = store.root / "sessions" / "ll" / "loops" / f"{info.loops[0].blob}.zst"
    victim.write_bytes(b"garbage")
    assert _dump(store.load_loop("ll", "ll.test.3")) == _dump(s.loops[2])
    with pytest.raises(CorruptSession):
        store.load_loop("ll", "ll.test.1")
    with pytest.raises(LoopNotFound, match="nope"):
        store.load_loop("ll", "nope")


def test_update_is_read_modify_write(store: FileSystemSessionStore) -> None:
    store.save(make_session("u", 2))

    def rename_agent(s):  # type: ignore[no-untyped-def]
        s.agent_id = "agent-new"

    out = store.update("u", rename_agent)
    assert out.agent_id == "agent-new"
    assert store.load("u").agent_id == "agent-new"
    out = store.update("u", lambda s: s.model_copy(update={"loops": s.loops[:1]}))
    assert len(store.load("u").loops) == 1
    with pytest.raises(SessionNotFound):
        store.update("missing", lambda s: None)
    with pytest.raises(ValueError):
        store.update("u", lambda s: s.model_copy(update={"session_id": "other"}))


def test_list_ids_most_recent_first_and_list_for_agent(store: FileSystemSessionStore) -> None:
    old = make_session("old", 1, agent_id="A")
    new = make_session("new", 3, agent_id="B")
    mid = make_session("mid", 2, agent_id="A")
    for s in (new, old, mid):
        store.save(s)
    assert store.list_ids() == ["new", "mid", "old"]
    # Tie on last_active_at: the later commit comes first.
    twin = make_session("twin", 3, agent_id="B")
    store.save(twin)
    assert store.list_ids()[:2] == ["twin", "new"]
    # list_for_agent must not read B's loops: damage them all.
    for sid in ("new", "twin"):
        for blob in _blobs(store, sid):
            blob.write_bytes(b"x")
    got = store.list_for_agent("A")
    assert [s.session_id for s in got] == ["mid", "old"]
    assert store.list_for_agent("nobody") == []
    assert [i.session_id for i in store.sessions()] == store.list_ids()


def test_delete(store: FileSystemSessionStore) -> None:
    store.save(make_session("d", 2))
    store.delete("d")
    assert not store.exists("d")
    assert store.list_ids() == []
    with pytest.raises(SessionNotFound):
        store.delete("d")
    with pytest.raises(SessionNotFound):
        store.load("d")
    assert not (store.root / "sessions" / "d").exists()
    assert list((store.root / "tmp").iterdir()) == []
    store.save(make_session("d", 1))  # re-creatable
    assert len(store.load("d").loops) == 1


def test_hostile_ids_never_escape_root(tmp_path: Path) -> None:
    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    bad_ids = [
        "",
        ".",
        "..",
        "../x",
        "../../etc/passwd",
        "/abs",
        "a/b",
        "a\\b",
        "n\x00l",
        "x" * 201,
    ]
    for bad in bad_ids:
        for call in (
            lambda bad=bad: store.load(bad),
            lambda bad=bad: store.exists(bad),
            lambda bad=bad: store.delete(bad),
            lambda bad=bad: store.append_loop(bad, make_loop("x", 0)),
            lambda bad=bad: store.lock(bad).__enter__(),
            lambda bad=bad: store.load_loop(bad, "l"),
            lambda bad=bad: store.update(bad, lambda s: None),
        ):
            with pytest.raises(InvalidSessionId):
                call()
    # Odd but valid ids work and stay inside sessions/.
    for odd in ("...", ".hidden", "sp ace", "ünï-会话", "x" * 200, "-rf", "a..b"):
        store.save(make_session(odd, 1))
        assert _dump(store.load(odd)) == _dump(make_session(odd, 1))
        assert (store.root / "sessions" / odd / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith("catalog")) == [
        "locks",
        "loopstore.json",
        "sessions",
        "tmp",
    ]


def test_symlinks_inside_store_are_not_followed(tmp_path: Path) -> None:
    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "sessions" / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Exception) as exc:
        store.save(make_session("evil", 1))
    assert "symlink" in str(exc.value)
    assert list(outside.iterdir()) == []
    # A manifest that is a symlink to a file outside is refused too.
    store.save(make_session("m", 1))
    secret = outside / "secret.json"
    secret.write_text("{}")
    man = store.root / "sessions" / "m" / "manifest.json"
    man.unlink()
    man.symlink_to(secret)
    with pytest.raises(Exception) as exc:
        store.load("m")
    assert "symlink" in str(exc.value)


def test_verify_detects_damage_and_lists_orphans_apart(store: FileSystemSessionStore) -> None:
    for sid in ("ok", "flip", "trunc", "gone", "man", "rot", "fresh"):
        store.save(make_session(sid, 2))
        if sid != "fresh":
            store.checkpoint(sid)  # blobs become files
    store.append_loop("rot", make_loop("rot", 2))
    store.append_loop("rot", make_loop("rot", 3))
    assert store.verify().ok
    # bit rot inside the first of two journal records: damage, not a torn tail
    journal = store.root / "sessions" / "rot" / "journal-1.log"
    jdata = bytearray(journal.read_bytes())
    jdata[len(jdata) // 3] ^= 0x01
    journal.write_bytes(bytes(jdata))
    # bit flip in a blob's compressed payload
    blob = _blobs(store, "flip")[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    _blobs(store, "trunc")[0].write_bytes(b"")
    _blobs(store, "gone")[1].unlink()
    man = store.root / "sessions" / "man" / "manifest.json"
    raw = bytearray(man.read_bytes())
    raw[40] ^= 0x01
    man.write_bytes(bytes(raw))
    # harmless leftovers
    (store.root / "sessions" / "ok" / "loops" / ("0" * 32 + ".zst")).write_bytes(b"orphan")
    stale = store.root / "tmp" / "123-abc.tmp"
    stale.write_bytes(b"stale")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    seen: list[tuple[int, int]] = []
    report = store.verify(progress=lambda d, t: seen.append((d, t)))
    assert not report.ok
    kinds = {(p.session_id, p.kind) for p in report.problems}
    assert ("flip", "hash_mismatch") in kinds or ("flip", "undecodable") in kinds
    assert ("trunc", "undecodable") in kinds
    assert ("gone", "missing_blob") in kinds
    assert ("man", "bad_manifest") in kinds
    assert ("rot", "bad_journal") in kinds
    assert not any(p.session_id in ("ok", "fresh") for p in report.problems)
    assert {o.kind for o in report.orphans} == {"orphan_blob", "stale_tmp"}
    assert report.sessions_checked == 7
    assert seen[-1] == (7, 7)
    for p in report.problems:
        assert isinstance(p.path, Path) and p.path.is_relative_to(store.root)
    # Each damage surfaces on load as CorruptSession naming the file (in a process that
    # had not read the session before: a reader never re-parses records it has parsed).
    fresh = FileSystemSessionStore(store.root, durable=False)
    for sid in ("flip", "trunc", "gone", "man", "rot"):
        with pytest.raises(CorruptSession) as exc:
            fresh.load(sid)
        assert exc.value.path is not None and exc.value.path.is_relative_to(store.root)
    assert store.verify("ok").ok
    with pytest.raises(SessionNotFound):
        store.verify("absent")


def test_orphans_alone_leave_verify_ok_and_gc_removes_them(store: FileSystemSessionStore) -> None:
    s = make_session("o", 3)
    store.save(s)
    store.checkpoint("o")
    store.save(s.model_copy(update={"loops": s.loops[:1]}))  # two blob files now unreferenced
    store.checkpoint("o")
    stale = store.root / "tmp" / "1-x.tmp"
    stale.write_bytes(b"z")
    report = store.verify()
    assert report.ok and len([o for o in report.orphans if o.kind == "orphan_blob"]) == 2
    kept = store.gc()  # default grace: everything is fresh
    assert kept.blobs_removed == 0 and kept.tmp_removed == 0
    assert len(_blobs(store, "o")) == 3
    # stats counts what verify lists: the two blobs (the fresh tmp file is in flight)
    assert store.stats().orphans == len(report.orphans) == 2
    gone = store.gc(grace=0)
    assert gone.blobs_removed == 2 and gone.tmp_removed == 1
    assert len(_blobs(store, "o")) == 1
    assert store.verify().ok and not store.verify().orphans
    assert _dump(store.load("o")) == _dump(s.model_copy(update={"loops": s.loops[:1]}))
    stats = store.stats()
    assert (stats.sessions, stats.loops, stats.blobs, stats.orphans) == (1, 1, 1, 0)


def test_gc_never_touches_a_damaged_session(store: FileSystemSessionStore) -> None:
    store.save(make_session("dm", 2))
    store.checkpoint("dm")
    man = store.root / "sessions" / "dm" / "manifest.json"
    man.write_bytes(man.read_bytes()[:-30])
    report = store.gc(grace=0)
    assert report.sessions_skipped == 1 and report.blobs_removed == 0
    assert [p.session_id for p in report.problems] == ["dm"]
    assert len(list((store.root / "sessions" / "dm" / "loops").iterdir())) == 2


def test_newer_format_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = FileSystemSessionStore(root, durable=False)
    store.save(make_session("v", 1))
    marker = json.loads((root / "loopstore.json").read_text())
    marker["version"] = 3
    (root / "loopstore.json").write_text(json.dumps(marker))
    with pytest.raises(UnsupportedFormat, match="newer"):
        FileSystemSessionStore(root)
    # A manifest from a newer writer is refused, not misread.
    man = root / "sessions" / "v" / "manifest.json"
    data, _ = ondisk.encode_manifest("v", 1, 1, {"session_id": "v"}, ())
    man.write_bytes(data.replace(b'"version":2', b'"version":9'))
    with pytest.raises(UnsupportedFormat, match="newer"):
        store.load("v")


def test_async_store(tmp_path: Path) -> None:
    astore = AsyncFileSystemSessionStore(tmp_path / "store", durable=False)

    async def main() -> None:
        s = make_session("as", 2)
        await astore.save(s)
        assert await astore.exists("as")
        assert _dump(await astore.load("as")) == _dump(s)
        await astore.append_loop("as", make_loop("as", 2))
        assert (await astore.load_loop("as", "as.test.3")).loop_id == "as.test.3"
        await asyncio.gather(*(astore.append_loop("as", make_loop("as", i)) for i in range(3, 9)))
        assert len((await astore.load("as")).loops) == 9
        assert await astore.list_ids() == ["as"]
        assert len(await astore.list_for_agent("agent-test")) == 1
        assert (await astore.sessions())[0].loop_count == 9
        assert await astore.load_json("as") == astore.sync.load_json("as")
        loops = [json async for json in astore.iter_loop_json("as")]
        assert loops == list(astore.sync.iter_loop_json("as")) and len(loops) == 9
        assert await astore.checkpoint("as") and not await astore.checkpoint("as")
        assert (await astore.session_state("as")).records == 0
        eager = await astore.load("as")  # appends 3..8 ran concurrently: any order
        assert (await astore.load("as", lazy=True)).loops[3].loop_id == eager.loops[3].loop_id
        assert (await astore.verify()).ok
        await astore.gc()
        copy = await astore.backup(tmp_path / "backup")
        assert copy.ok and copy.sessions == 1
        backed_up = FileSystemSessionStore(tmp_path / "backup")
        assert _dump(backed_up.load("as")) == _dump(await astore.load("as"))
        await astore.delete("as")
        assert not await astore.exists("as")

    asyncio.run(main())


def test_store_is_picklable(tmp_path: Path) -> None:
    import pickle

    store = FileSystemSessionStore(tmp_path / "store", durable=False, lock_timeout=1.5)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root and clone.lock_timeout == 1.5 and not clone.durable


def test_reader_rereads_state_when_a_blob_vanishes(
    store: FileSystemSessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopstore import atomic

    s = make_session("v", 2)
    store.save(s)
    store.checkpoint("v")
    newer = s.model_copy(update={"loops": [make_loop("v", 7)]})
    real = atomic.read_file
    fired: list[int] = []

    def racing(action: object) -> object:
        def read_file(dir_fd: int | None, name: str | Path) -> bytes:
            if str(name).endswith(".zst") and not fired:
                fired.append(1)
                action()  # type: ignore[operator]
            return real(dir_fd, name)

        return read_file

    def replace_and_collect() -> None:
        store.save(newer)  # a writer replaces every loop...
        store.checkpoint("v")
        store.gc(grace=0)  # ...and gc removes the old blobs before we read them

    monkeypatch.setattr(atomic, "read_file", racing(replace_and_collect))
    assert _dump(store.load("v")) == _dump(newer)
    assert fired == [1]
    fired.clear()
    monkeypatch.undo()
    store.save(s)
    store.checkpoint("v")
    monkeypatch.setattr(atomic, "read_file", racing(lambda: store.delete("v")))
    with pytest.raises(SessionNotFound):
        store.load("v")
    assert fired == [1]


def test_store_survives_its_directories_being_removed(tmp_path: Path) -> None:
    import shutil

    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    store.save(make_session("r", 1))
    shutil.rmtree(store.root / "tmp")
    store.save(make_session("r", 2))  # tmp/ is re-created
    shutil.rmtree(store.root)
    assert store.list_ids() == []
    assert not store.exists("r")
    store.save(make_session("r", 1))  # the whole store is re-created
    other = FileSystemSessionStore(tmp_path / "store", durable=False)
    assert other.list_ids() == ["r"] and len(other.load("r").loops) == 1


def test_fsyncs_per_append_and_durable_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopstore import atomic

    calls: list[int] = []
    real = atomic.fsync

    def counting(fd: int, *, data_only: bool = False) -> None:
        calls.append(fd)
        real(fd, data_only=data_only)

    monkeypatch.setattr(atomic, "fsync", counting)
    durable = FileSystemSessionStore(tmp_path / "d", durable=True)
    calls.clear()
    durable.append_loop("x", make_loop("x", 0), session=make_session("x", 0))
    created = len(calls)
    calls.clear()
    durable.append_loop("x", make_loop("x", 1))
    # An append is one journal record and one fdatasync. A new session is published as
    # one directory: its manifest, its journal, the staging directory and sessions/.
    assert (created, len(calls)) == (4, 1)
    scratch = FileSystemSessionStore(tmp_path / "s", durable=False)
    calls.clear()
    scratch.append_loop("x", make_loop("x", 0), session=make_session("x", 0))
    scratch.append_loop("x", make_loop("x", 1))
    scratch.delete("x")
    assert calls == []


def test_gc_removes_crash_leftovers(store: FileSystemSessionStore) -> None:
    store.save(make_session("keep", 1))
    # a first commit that died before its manifest, and a delete that died mid-way
    half = store.root / "sessions" / "half" / "loops"
    half.mkdir(parents=True)
    (half / ("1" * 32 + ".zst")).write_bytes(b"x")
    grave = store.root / "tmp" / "deleted-1-2-3.tmp" / "loops"
    grave.mkdir(parents=True)
    (grave / "f").write_bytes(b"y")
    assert not store.exists("half") and store.list_ids() == ["keep"]
    report = store.verify()
    assert report.ok
    assert {o.kind for o in report.orphans} == {"incomplete_session"}
    assert store.gc().dirs_removed == 0  # still within the grace period
    dry = store.gc(grace=0, dry_run=True)
    assert (dry.dirs_removed, dry.blobs_removed) == (2, 0)
    assert half.exists() and grave.exists()  # a dry run removes nothing
    gone = store.gc(grace=0)
    assert gone.dirs_removed == 2
    assert sorted(p.name for p in (store.root / "sessions").iterdir()) == ["keep"]
    assert list((store.root / "tmp").iterdir()) == []
    assert store.verify().ok and store.load("keep")


def test_appends_waiting_for_the_lock_are_committed_together(tmp_path: Path) -> None:
    """Group commit: appends that wait for a held lock are handed to the next holder,
    which commits them all as one record (one fdatasync), each in its own position."""
    import threading

    store = FileSystemSessionStore(tmp_path / "store", durable=True, lock_timeout=10)
    store.save(make_session("gc", 1))
    before = store.session_info("gc").generation
    loops = [make_loop("gc", i) for i in range(1, 9)]
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            store.append_loop("gc", loops[i])
        except BaseException as exc:
            errors.append(exc)

    with lock_held_in_thread(store, "gc") as release:
        threads = [threading.Thread(target=append, args=(i,)) for i in range(len(loops))]
        for t in threads:
            t.start()
        queue = store.root / "locks" / "gc.q"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
            not queue.exists() or len(list(queue.glob("*.item"))) < len(loops) - 1
        ):
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join()
    assert errors == []
    got = store.load("gc")
    assert sorted(lp.loop_id for lp in got.loops[1:]) == sorted(lp.loop_id for lp in loops)
    records = store.session_info("gc").generation - before
    assert records < len(loops)  # several appends shared one record
    assert store.verify().ok
    assert list((store.root / "locks" / "gc.q").iterdir()) == []


@pytest.mark.parametrize("lock_busy", [False, True])
def test_torn_blob_under_its_final_name_is_replaced_not_trusted(
    tmp_path: Path, lock_busy: bool
) -> None:
    """A crash can leave garbage of exactly the right size at loops/<hash>.zst with no
    manifest naming it; appending that loop again must rewrite it, whether the blob is
    written under the lock or staged while waiting for it."""
    import threading

    store = FileSystemSessionStore(tmp_path / "store", durable=True, lock_timeout=10)
    store.save(make_session("torn", 1))
    store.checkpoint("torn")
    loop = make_loop("torn", 1)
    good = loop_blob(loop, store.compression_level)
    path = store.root / "sessions" / "torn" / "loops" / good.name
    half = good.stored_size // 2
    path.write_bytes(good.data[:half] + b"\0" * (good.stored_size - half))  # torn tail
    assert path.stat().st_size == good.stored_size and path.read_bytes() != good.data
    if lock_busy:
        with lock_held_in_thread(store, "torn") as release:
            threading.Timer(0.3, release.set).start()
            store.append_loop("torn", loop)
    else:
        store.append_loop("torn", loop)
    store.checkpoint("torn")  # materializing the blob replaces the torn file
    assert path.read_bytes() == good.data
    assert _dump(store.load("torn").loops[-1]) == _dump(loop)
    assert store.verify(deep=True).ok


def test_existing_blob_file_with_other_bytes_is_replaced_by_ours(tmp_path: Path) -> None:
    """A file under the blob's name with other bytes (another compression level, or
    junk) is never trusted as ours: materializing writes our bytes over it."""
    store = FileSystemSessionStore(tmp_path / "store", durable=False, compression_level=3)
    store.save(make_session("lv", 1))
    store.checkpoint("lv")
    loop = make_loop("lv", 1)
    other = loop_blob(loop, 19)
    ours = loop_blob(loop, 3)
    path = store.root / "sessions" / "lv" / "loops" / other.name
    path.write_bytes(other.data)
    store.append_loop("lv", loop)
    store.checkpoint("lv")
    assert path.read_bytes() == ours.data
    assert _dump(store.load("lv").loops[-1]) == _dump(loop)
    assert store.verify(deep=True).ok
