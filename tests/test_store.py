"""The session store: API behaviour, format v2 on disk, damage detection, gc.

Tests taking `make_store` run on both backends ([fs], [s3]); the others are about the
directory store's files, locks and fsyncs."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    RawStore,
    StoreFactory,
    blob_key,
    lock_held_in_thread,
    loop_blob,
    make_loop,
    make_session,
    manifest_key,
)
from loopstore import ondisk
from loopstore.aio import AsyncSessionStore
from loopstore.errors import (
    CorruptSession,
    InvalidSessionId,
    LoopNotFound,
    SessionNotFound,
    UnsupportedFormat,
)
from loopstore.store import FileSystemSessionStore, SessionStore


@pytest.fixture
def store(tmp_path: Path) -> FileSystemSessionStore:
    return FileSystemSessionStore(tmp_path / "store", durable=False, lock_timeout=2)


def _blobs(store: FileSystemSessionStore, sid: str) -> list[Path]:
    """The session's blob files, once its journal is folded (blobs become files then)."""
    store.checkpoint(sid)
    return sorted((store.root / "sessions" / sid / "loops").iterdir())


def _blob_keys(raw: RawStore, store: SessionStore, sid: str) -> list[str]:
    """`_blobs` on either backend: the keys of the session's blobs, once folded."""
    store.checkpoint(sid)
    return raw.ls(f"sessions/{sid}/loops/")


def _any(make_store: StoreFactory) -> SessionStore:
    """What the `store` fixture is, on the test's backend."""
    return make_store(durable=False, lock_timeout=2)


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


def test_save_writes_only_new_blobs_and_bumps_generation(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
    s = make_session("g", 3)
    store.save(s)
    first = {k: raw.read(k) for k in _blob_keys(raw, store, "g")}
    mtimes = {} if make_store.is_s3 else {p.name: p.stat().st_mtime_ns for p in _blobs(store, "g")}  # type: ignore[arg-type]
    assert store.session_info("g").generation == 1
    store.save(s)  # identical: nothing to commit
    assert store.session_info("g").generation == 1
    s.loops.append(make_loop("g", 3, parent_loop_id=s.loops[-1].loop_id))
    if not make_store.is_s3:
        journal = store.root / "sessions" / "g" / "journal-1.log"  # type: ignore[attr-defined]
        before = journal.stat().st_size
    store.save(s)
    info = store.session_info("g")
    assert info.generation == 2 and info.loop_count == 4 and info.journal_records == 1
    new_blob = loop_blob(s.loops[-1]).data
    # The record carries the one new blob, not the three stored ones (on S3 the record
    # is an object of its own).
    if make_store.is_s3:
        (record,) = raw.ls("sessions/g/log/")
        assert len(new_blob) < len(raw.read(record)) < len(new_blob) + 2000
    else:
        assert before < journal.stat().st_size < before + len(new_blob) + 2000
    after = {k: raw.read(k) for k in _blob_keys(raw, store, "g")}
    assert len(after) == 4
    assert all(after[k] == data for k, data in first.items())
    if not make_store.is_s3:  # not rewritten either (object stores keep no usable mtime)
        now = {p.name: p.stat().st_mtime_ns for p in _blobs(store, "g")}  # type: ignore[arg-type]
        assert all(now[name] == mtime for name, mtime in mtimes.items())


def test_append_loop_without_header_opens_the_session_like_the_recorder(
    make_store: StoreFactory,
) -> None:
    store = _any(make_store)
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


def test_append_loop_adds_replaces_and_creates(make_store: StoreFactory) -> None:
    store = _any(make_store)
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


def test_load_loop_decodes_only_its_blob(make_store: StoreFactory) -> None:
    store = _any(make_store)
    s = make_session("ll", 3)
    store.save(s)
    store.checkpoint("ll")
    info = store.session_info("ll")
    # Damage loop 0's blob: loading loop 2 must not touch it.
    make_store.raw().write(blob_key("ll", info.loops[0].blob), b"garbage")
    assert _dump(store.load_loop("ll", "ll.test.3")) == _dump(s.loops[2])
    with pytest.raises(CorruptSession):
        store.load_loop("ll", "ll.test.1")
    with pytest.raises(LoopNotFound, match="nope"):
        store.load_loop("ll", "nope")


def test_update_is_read_modify_write(make_store: StoreFactory) -> None:
    store = _any(make_store)
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


def test_list_ids_most_recent_first_and_list_for_agent(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
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
        for key in _blob_keys(raw, store, sid):
            raw.write(key, b"x")
    got = store.list_for_agent("A")
    assert [s.session_id for s in got] == ["mid", "old"]
    assert store.list_for_agent("nobody") == []
    assert [i.session_id for i in store.sessions()] == store.list_ids()


def test_delete(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
    store.save(make_session("d", 2))
    store.delete("d")
    assert not store.exists("d")
    assert store.list_ids() == []
    with pytest.raises(SessionNotFound):
        store.delete("d")
    with pytest.raises(SessionNotFound):
        store.load("d")
    if make_store.is_s3:  # what remains is the tombstone record until gc (FORMAT.md 7)
        assert [k.split("/")[2] for k in raw.ls("sessions/d/")] == ["log"]
    else:
        assert not (store.root / "sessions" / "d").exists()  # type: ignore[attr-defined]
        assert list((store.root / "tmp").iterdir()) == []  # type: ignore[attr-defined]
    store.save(make_session("d", 1))  # re-creatable
    assert len(store.load("d").loops) == 1


def test_hostile_ids_never_escape_root(tmp_path: Path, make_store: StoreFactory) -> None:
    store, raw = make_store(durable=False), make_store.raw()
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
    odd_ids = ("...", ".hidden", "sp ace", "ünï-会话", "x" * 200, "-rf", "a..b")
    for odd in odd_ids:
        store.save(make_session(odd, 1))
        assert _dump(store.load(odd)) == _dump(make_session(odd, 1))
        assert raw.exists(manifest_key(odd))
    tops = {k.split("/")[0] for k in raw.ls() if "/" in k}
    assert {t for t in tops if not t.startswith("catalog")} <= {"sessions", "locks", "tmp"}
    assert {k.split("/")[1] for k in raw.ls("sessions/")} == set(odd_ids)
    if make_store.is_s3:
        return
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    root = store.root  # type: ignore[attr-defined]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("catalog")) == [
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


def test_verify_detects_damage_and_lists_orphans_apart(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
    fs = not make_store.is_s3
    for sid in ("ok", "flip", "trunc", "gone", "man", "rot", "fresh"):
        store.save(make_session(sid, 2))
        if sid != "fresh":
            store.checkpoint(sid)  # blobs become files
    store.append_loop("rot", make_loop("rot", 2))
    store.append_loop("rot", make_loop("rot", 3))
    assert store.verify().ok
    # bit rot inside the first of two journal records: damage, not a torn tail (on S3
    # each record is an object: the first of the two)
    if fs:
        journal = store.root / "sessions" / "rot" / "journal-1.log"  # type: ignore[attr-defined]
        jdata = bytearray(journal.read_bytes())
        jdata[len(jdata) // 3] ^= 0x01
        journal.write_bytes(bytes(jdata))
    else:
        first_record = raw.ls("sessions/rot/log/")[0]
        raw.flip(first_record)
    # bit flip in a blob's compressed payload
    raw.flip(_blob_keys(raw, store, "flip")[0])
    raw.write(_blob_keys(raw, store, "trunc")[0], b"")
    raw.delete(_blob_keys(raw, store, "gone")[1])
    man = bytearray(raw.read(manifest_key("man")))
    man[40] ^= 0x01
    raw.write(manifest_key("man"), bytes(man))
    # harmless leftovers
    raw.write(blob_key("ok", "0" * 32), b"orphan")
    if fs:
        stale = store.root / "tmp" / "123-abc.tmp"  # type: ignore[attr-defined]
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
    assert {o.kind for o in report.orphans} == (
        {"orphan_blob", "stale_tmp"} if fs else {"orphan_blob"}
    )
    assert report.sessions_checked == 7
    assert seen[-1] == (7, 7)

    def inside(path: object) -> bool:
        if fs:
            return isinstance(path, Path) and path.is_relative_to(store.root)  # type: ignore[attr-defined]
        return isinstance(path, str) and path.startswith(store.location + "/")

    for p in report.problems:
        assert inside(p.path), p.path
    # Each damage surfaces on load as CorruptSession naming the file (in a process that
    # had not read the session before: a reader never re-parses records it has parsed).
    fresh = make_store(durable=False)
    for sid in ("flip", "trunc", "gone", "man", "rot"):
        with pytest.raises(CorruptSession) as exc:
            fresh.load(sid)
        assert exc.value.path is not None and inside(exc.value.path), exc.value.path
    assert store.verify("ok").ok
    with pytest.raises(SessionNotFound):
        store.verify("absent")


def test_orphans_alone_leave_verify_ok_and_gc_removes_them(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
    fs = not make_store.is_s3
    s = make_session("o", 3)
    store.save(s)
    store.checkpoint("o")
    store.save(s.model_copy(update={"loops": s.loops[:1]}))  # two blob files now unreferenced
    store.checkpoint("o")
    if fs:  # object stores have no tmp/
        stale = store.root / "tmp" / "1-x.tmp"  # type: ignore[attr-defined]
        stale.write_bytes(b"z")
    report = store.verify()
    assert report.ok and len([o for o in report.orphans if o.kind == "orphan_blob"]) == 2
    # On S3 the record the second checkpoint folded stays until gc (FORMAT.md 7).
    stale = [] if fs else ["stale_journal"]
    assert sorted(o.kind for o in report.orphans if o.kind != "orphan_blob") == stale
    kept = store.gc()  # default grace: everything is fresh
    assert kept.blobs_removed == 0 and kept.tmp_removed == 0
    assert len(_blob_keys(raw, store, "o")) == 3
    # stats counts what verify lists: the two blobs (the fresh tmp file is in flight)
    assert store.stats().orphans == len(report.orphans) == 2 + len(stale)
    gone = store.gc(grace=0)
    assert gone.blobs_removed == 2 and gone.tmp_removed == (1 if fs else 0)
    assert gone.journals_removed == len(stale)
    assert len(_blob_keys(raw, store, "o")) == 1
    assert store.verify().ok and not store.verify().orphans
    assert _dump(store.load("o")) == _dump(s.model_copy(update={"loops": s.loops[:1]}))
    stats = store.stats()
    assert (stats.sessions, stats.loops, stats.blobs, stats.orphans) == (1, 1, 1, 0)


def test_gc_never_touches_a_damaged_session(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
    store.save(make_session("dm", 2))
    store.checkpoint("dm")
    raw.write(manifest_key("dm"), raw.read(manifest_key("dm"))[:-30])
    report = store.gc(grace=0)
    assert report.sessions_skipped == 1 and report.blobs_removed == 0
    assert [p.session_id for p in report.problems] == ["dm"]
    assert len(raw.ls("sessions/dm/loops/")) == 2


def test_newer_format_is_refused(make_store: StoreFactory) -> None:
    store, raw = make_store(durable=False), make_store.raw()
    store.save(make_session("v", 1))
    marker = json.loads(raw.read("loopstore.json"))
    marker["version"] = 3
    raw.write("loopstore.json", json.dumps(marker).encode())
    with pytest.raises(UnsupportedFormat, match="newer"):
        make_store()
    # A manifest from a newer writer is refused, not misread.
    data, _ = ondisk.encode_manifest("v", 1, 1, {"session_id": "v"}, ())
    raw.write(manifest_key("v"), data.replace(b'"version":2', b'"version":9'))
    with pytest.raises(UnsupportedFormat, match="newer"):
        store.load("v")


def test_async_store(make_store: StoreFactory) -> None:
    astore = AsyncSessionStore(make_store(durable=False))

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
        copy = await astore.backup(make_store("backup"))
        assert copy.ok and copy.sessions == 1
        backed_up = make_store("backup")
        assert _dump(backed_up.load("as")) == _dump(await astore.load("as"))
        await astore.delete("as")
        assert not await astore.exists("as")

    asyncio.run(main())


def test_store_is_picklable(make_store: StoreFactory) -> None:
    import pickle

    store = make_store(durable=False, lock_timeout=1.5)
    clone = pickle.loads(pickle.dumps(store))
    assert type(clone) is type(store) and clone.location == store.location
    assert clone.lock_timeout == 1.5
    assert clone.durable is store.durable is make_store.is_s3  # S3: always durable


def test_reader_rereads_state_when_a_blob_vanishes(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopstore import atomic

    store = _any(make_store)
    s = make_session("v", 2)
    store.save(s)
    store.checkpoint("v")
    newer = s.model_copy(update={"loops": [make_loop("v", 7)]})
    fired: list[int] = []

    def install(action: Callable[[], object]) -> None:
        """Run `action` just before the first blob is read (the race to lose)."""
        if make_store.is_s3:  # the object store's blob read
            from loopstore.s3backend import S3Session

            real_blob = S3Session.blob

            def blob(self: S3Session, digest: str) -> bytes:
                if not fired:
                    fired.append(1)
                    action()
                return real_blob(self, digest)

            monkeypatch.setattr(S3Session, "blob", blob)
            return
        real = atomic.read_file

        def read_file(dir_fd: int | None, name: str | Path) -> bytes:
            if str(name).endswith(".zst") and not fired:
                fired.append(1)
                action()
            return real(dir_fd, name)

        monkeypatch.setattr(atomic, "read_file", read_file)

    def replace_and_collect() -> None:
        store.save(newer)  # a writer replaces every loop...
        store.checkpoint("v")
        store.gc(grace=0)  # ...and gc removes the old blobs before we read them

    install(replace_and_collect)
    assert _dump(store.load("v")) == _dump(newer)
    assert fired == [1]
    fired.clear()
    monkeypatch.undo()
    store.save(s)
    store.checkpoint("v")
    install(lambda: store.delete("v"))
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


def test_gc_removes_crash_leftovers(make_store: StoreFactory) -> None:
    store, raw = _any(make_store), make_store.raw()
    fs = not make_store.is_s3
    store.save(make_session("keep", 1))
    # a first commit that died before its manifest, and (filesystem) a delete that died
    # mid-way in tmp/
    raw.write(blob_key("half", "1" * 32), b"x")
    if fs:
        grave = store.root / "tmp" / "deleted-1-2-3.tmp" / "loops"  # type: ignore[attr-defined]
        grave.mkdir(parents=True)
        (grave / "f").write_bytes(b"y")
    assert not store.exists("half") and store.list_ids() == ["keep"]
    report = store.verify()
    assert report.ok
    assert {o.kind for o in report.orphans} == {"incomplete_session"}
    assert store.gc().dirs_removed == 0  # still within the grace period
    dry = store.gc(grace=0, dry_run=True)
    assert (dry.dirs_removed, dry.blobs_removed) == (2 if fs else 1, 0)
    assert raw.ls("sessions/half/")  # a dry run removes nothing
    if fs:
        assert grave.exists()
    gone = store.gc(grace=0)
    assert gone.dirs_removed == (2 if fs else 1)
    assert {k.split("/")[1] for k in raw.ls("sessions/")} == {"keep"}
    if fs:
        assert list((store.root / "tmp").iterdir()) == []  # type: ignore[attr-defined]
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
    make_store: StoreFactory, lock_busy: bool
) -> None:
    """A crash can leave garbage of exactly the right size at loops/<hash>.zst with no
    manifest naming it; appending that loop again must rewrite it, whether the blob is
    written under the lock or staged while waiting for it."""
    import threading

    store, raw = make_store(durable=True, lock_timeout=10), make_store.raw()
    store.save(make_session("torn", 1))
    store.checkpoint("torn")
    loop = make_loop("torn", 1)
    good = loop_blob(loop, store.compression_level)
    key = blob_key("torn", good.digest)
    half = good.stored_size // 2
    raw.write(key, good.data[:half] + b"\0" * (good.stored_size - half))  # torn tail
    torn = raw.read(key)
    assert len(torn) == good.stored_size and torn != good.data
    if lock_busy:
        with lock_held_in_thread(store, "torn") as release:
            threading.Timer(0.3, release.set).start()
            store.append_loop("torn", loop)
    else:
        store.append_loop("torn", loop)
    store.checkpoint("torn")  # materializing the blob replaces the torn file
    assert raw.read(key) == good.data
    assert _dump(store.load("torn").loops[-1]) == _dump(loop)
    assert store.verify(deep=True).ok


def test_existing_blob_file_with_other_bytes_is_replaced_by_ours(make_store: StoreFactory) -> None:
    """A file under the blob's name with other bytes (another compression level, or
    junk) is never trusted as ours: materializing writes our bytes over it."""
    store, raw = make_store(durable=False, compression_level=3), make_store.raw()
    store.save(make_session("lv", 1))
    store.checkpoint("lv")
    loop = make_loop("lv", 1)
    other = loop_blob(loop, 19)
    ours = loop_blob(loop, 3)
    key = blob_key("lv", other.digest)
    raw.write(key, other.data)
    store.append_loop("lv", loop)
    store.checkpoint("lv")
    assert raw.read(key) == ours.data
    assert _dump(store.load("lv").loops[-1]) == _dump(loop)
    assert store.verify(deep=True).ok
