"""Black-box acceptance suite: only `from loopstore import ...` and the DESIGN section 3 layout.

Tests taking `make_store` run on both backends ([fs], [s3]); a store's files or objects
are reached through `make_store.raw()` (the same keys and bytes on both)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import xxhash
import zstandard

import _workers_acceptance as workers
from helpers import (
    RawStore,
    StoreFactory,
    blob_key,
    fixture_paths,
    make_loop,
    make_session,
    manifest_key,
)
from loopstore import (
    AsyncFileSystemSessionStore,
    CorruptSession,
    FileSystemSessionStore,
    InvalidSessionId,
    LoopRecord,
    Session,
    SessionError,
    SessionLocked,
    SessionNotFound,
    legacy,
    open_async_store,
)

SPAWN = multiprocessing.get_context("spawn")


def _store(root: Path, **kw: Any) -> FileSystemSessionStore:
    kw.setdefault("durable", False)
    return FileSystemSessionStore(root, **kw)


def _sdir(root: Path, sid: str) -> Path:
    return root / "sessions" / sid


def _fold(root: Path, sid: str) -> None:
    """Fold the session's journal (format v2): its blobs become files, its manifest whole."""
    FileSystemSessionStore(root, durable=False).checkpoint(sid)


def _blobs(root: Path, sid: str) -> list[Path]:
    _fold(root, sid)
    return sorted((_sdir(root, sid) / "loops").glob("*.zst"))


def _manifest(root: Path, sid: str, *, fold: bool = True) -> dict[str, Any]:
    if fold:
        _fold(root, sid)
    doc: dict[str, Any] = json.loads((_sdir(root, sid) / "manifest.json").read_bytes())
    return doc


def _blob_of(root: Path, sid: str, loop_id: str) -> Path:
    for e in _manifest(root, sid)["loops"]:
        if e["loop_id"] == loop_id:
            return _sdir(root, sid) / "loops" / f"{e['blob']}.zst"
    raise AssertionError(loop_id)


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    for j in range(i, min(i + 8, len(data))):
        data[j] ^= 0xFF
    path.write_bytes(bytes(data))


def _rfold(make_store: StoreFactory, sid: str) -> None:
    """`_fold` on either backend (by another store object, as `_fold`)."""
    make_store(durable=False).checkpoint(sid)


def _rblobs(make_store: StoreFactory, raw: RawStore, sid: str) -> list[str]:
    """`_blobs` on either backend: the keys of the session's blobs, once folded."""
    _rfold(make_store, sid)
    return raw.ls(f"sessions/{sid}/loops/")


def _rmanifest(
    make_store: StoreFactory, raw: RawStore, sid: str, *, fold: bool = True
) -> dict[str, Any]:
    if fold:
        _rfold(make_store, sid)
    doc: dict[str, Any] = json.loads(raw.read(manifest_key(sid)))
    return doc


def _rblob_of(make_store: StoreFactory, raw: RawStore, sid: str, loop_id: str) -> str:
    for e in _rmanifest(make_store, raw, sid)["loops"]:
        if e["loop_id"] == loop_id:
            return blob_key(sid, e["blob"])
    raise AssertionError(loop_id)


def _kind(k: str) -> str:
    return k.lower().replace("_", " ").replace("-", " ")


def _dump(s: Session | LoopRecord) -> Any:
    return s.model_dump(mode="json")


def _tree(path: Path) -> list[tuple[str, int]]:
    out = []
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out.append((str(p.relative_to(path)), st.st_mtime_ns))
    return out


# ------------------------------------------------------------------ API surface and basics


def test_public_api_and_error_classes() -> None:
    assert issubclass(SessionLocked, SessionError) and issubclass(SessionLocked, TimeoutError)
    assert issubclass(InvalidSessionId, SessionError) and issubclass(InvalidSessionId, ValueError)
    assert issubclass(SessionNotFound, SessionError) and issubclass(CorruptSession, SessionError)
    sync_methods = [
        "save", "load", "exists", "list_ids", "list_for_agent", "delete", "append_loop",
        "update", "load_loop", "verify", "gc",
    ]  # fmt: skip
    for name in [*sync_methods, "lock"]:
        assert callable(getattr(FileSystemSessionStore, name))
    for name in sync_methods:
        assert inspect.iscoroutinefunction(getattr(AsyncFileSystemSessionStore, name)), name
    sig = inspect.signature(FileSystemSessionStore)
    for opt, default in [
        ("lock_timeout", 5.0),
        ("lock_poll_interval", 0.05),
        ("durable", True),
        ("compression_level", 3),
    ]:
        assert sig.parameters[opt].default == default
        assert sig.parameters[opt].kind is inspect.Parameter.KEYWORD_ONLY


def test_roundtrip_layout_and_not_found(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    s = make_session("s1", 3)
    st.save(s)
    assert st.exists("s1") and not st.exists("nope")
    assert _dump(st.load("s1")) == _dump(s)
    # layout of section 3 (an object store holds the same marker, manifests and blobs;
    # tmp/ and locks/ are a directory store's)
    marker = json.loads(raw.read("loopstore.json"))
    assert marker["version"] == 2
    if not make_store.is_s3:
        root = Path(make_store.location())
        assert (root / "tmp").is_dir() and (root / "locks").is_dir()
        assert (root / "locks" / "s1.lock").exists()
    m = _rmanifest(make_store, raw, "s1")
    assert [e["loop_id"] for e in m["loops"]] == [lp.loop_id for lp in s.loops]
    assert "generation" in m
    for e, lp in zip(m["loops"], s.loops, strict=True):
        data = raw.read(blob_key("s1", e["blob"]))
        assert zstandard.frame_content_size(data) > 0
        raw_json = zstandard.ZstdDecompressor().decompress(data)
        assert xxhash.xxh3_128_hexdigest(raw_json) == e["blob"]
        assert _dump(LoopRecord.model_validate_json(raw_json)) == _dump(lp)
    for call in (
        lambda: st.load("nope"),
        lambda: st.delete("nope"),
        lambda: st.load_loop("nope", "x"),
        lambda: st.update("nope", lambda s: None),
    ):
        with pytest.raises(SessionNotFound) as ei:
            call()
        assert ei.value.session_id == "nope"
    with pytest.raises(SessionError) as ei2:
        st.load_loop("s1", "no-such-loop")
    assert ei2.value.session_id == "s1"
    st.delete("s1")
    assert not st.exists("s1") and st.list_ids() == []
    with pytest.raises(SessionNotFound):
        st.load("s1")
    # a re-created session after delete works
    st.save(s)
    assert len(st.load("s1").loops) == 3


def test_save_writes_only_new_blobs_and_shares_identical(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()

    def identity(key: str) -> object:
        """The file's inode; an object's bytes (object stores have no inode)."""
        if make_store.is_s3:
            return raw.read(key)
        return (Path(make_store.location()) / key).stat().st_ino

    s = make_session("s", 3)
    st.save(s)
    before = {k: identity(k) for k in _rblobs(make_store, raw, "s")}
    s2 = s.model_copy(deep=True)
    s2.loops.append(make_loop("s", 3))
    st.save(s2)
    after = {k: identity(k) for k in _rblobs(make_store, raw, "s")}
    assert len(after) == 4
    assert all(after[k] == ino for k, ino in before.items())  # not rewritten
    gen = _rmanifest(make_store, raw, "s")["generation"]
    st.save(s2)
    assert _rmanifest(make_store, raw, "s")["generation"] >= gen


def test_list_ids_most_recently_active_first(make_store: StoreFactory) -> None:
    st = make_store(durable=False)
    # make_session timestamps grow with loop index: more loops = later activity
    st.save(make_session("old", 1))
    st.save(make_session("mid", 3))
    st.save(make_session("new", 5))
    assert st.list_ids() == ["new", "mid", "old"]
    st.append_loop("old", make_loop("old", 20))
    assert st.list_ids()[0] == "old"


def test_append_loop_new_session_replace_in_place(make_store: StoreFactory) -> None:
    st = make_store(durable=False)
    header = make_session("a", 0, agent_id="agent-x")
    st.append_loop("a", make_loop("a", 0, agent_id="agent-x"), session=header)
    st.append_loop("a", make_loop("a", 1, agent_id="agent-x"))
    st.append_loop("a", make_loop("a", 2, agent_id="agent-x"))
    s = st.load("a")
    assert s.agent_id == "agent-x" and len(s.loops) == 3
    replacement = make_loop("a", 1, agent_id="agent-x", text_bytes=5000, status="Failed")
    assert replacement.loop_id == s.loops[1].loop_id
    st.append_loop("a", replacement)
    s2 = st.load("a")
    assert [lp.loop_id for lp in s2.loops] == [lp.loop_id for lp in s.loops]
    assert _dump(s2.loops[1]) == _dump(replacement)
    assert _dump(st.load_loop("a", replacement.loop_id)) == _dump(replacement)
    # session= is ignored once the session exists
    other = make_session("a", 0, agent_id="someone-else")
    st.append_loop("a", make_loop("a", 3, agent_id="agent-x"), session=other)
    assert st.load("a").agent_id == "agent-x"
    st.append_loop("a", make_loop("a", 4, agent_id="agent-x"), session=make_session("zz", 0))
    assert len(st.load("a").loops) == 5 and not st.exists("zz")
    # no header given: a session still comes into being
    st.append_loop("b", make_loop("b", 0))
    assert [lp.loop_id for lp in st.load("b").loops] == [make_loop("b", 0).loop_id]


def test_update_none_vs_new_session(make_store: StoreFactory) -> None:
    st = make_store(durable=False)
    st.save(make_session("u", 1))

    def mutate(s: Session) -> None:
        s.loops.append(make_loop("u", 1))

    r1 = st.update("u", mutate)
    assert isinstance(r1, Session) and len(r1.loops) == 2
    assert len(st.load("u").loops) == 2

    def replace(s: Session) -> Session:
        n = s.model_copy(deep=True)
        n.loops = n.loops[:1]
        return n

    r2 = st.update("u", replace)
    assert len(r2.loops) == 1 and len(st.load("u").loops) == 1
    # fn raising leaves the stored session as it was
    with pytest.raises(RuntimeError):
        st.update("u", lambda s: (_ for _ in ()).throw(RuntimeError("boom")))
    assert len(st.load("u").loops) == 1


def test_threads_update_no_lost_updates_and_thread_exclusion(make_store: StoreFactory) -> None:
    st = make_store(durable=False, lock_timeout=30)
    st.save(make_session("t", 0))
    other = make_store(durable=False, lock_timeout=30)

    def work(k: int) -> None:
        s_ = st if k % 2 else other
        for i in range(5):
            s_.update("t", lambda s, k=k, i=i: s.loops.append(make_loop("t", 100 * k + i)))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ids = [lp.loop_id for lp in st.load("t").loops]
    assert len(ids) == 20 == len(set(ids))
    # a thread of the same process is excluded by lock()
    short = make_store(durable=False, lock_timeout=0.2, lock_poll_interval=0.02)
    res: list[BaseException | None] = []
    with st.lock("t"):

        def contender() -> None:
            try:
                short.append_loop("t", make_loop("t", 999))
                res.append(None)
            except BaseException as exc:
                res.append(exc)

        th = threading.Thread(target=contender)
        th.start()
        th.join()
        # the holder itself may write (re-entrant)
        st.append_loop("t", make_loop("t", 998))
    assert isinstance(res[0], SessionLocked) and res[0].session_id == "t"
    short.append_loop("t", make_loop("t", 999))
    assert len(st.load("t").loops) == 22


def test_durable_false_and_compression_level(make_store: StoreFactory) -> None:
    s = make_session("c", 2)
    for level in (1, 19):
        st = make_store(f"l{level}", durable=False, compression_level=level)
        st.save(s)
        assert _dump(make_store(f"l{level}").load("c")) == _dump(s)
    st = make_store("d", durable=True)
    st.save(s)
    assert st.verify().ok


def test_newer_store_marker_refused(make_store: StoreFactory) -> None:
    raw = make_store.raw()
    make_store(durable=False).save(make_session("s", 1))
    doc = json.loads(raw.read("loopstore.json"))
    doc["version"] = 99
    raw.write("loopstore.json", json.dumps(doc).encode())
    if not make_store.is_s3:
        shutil.rmtree(Path(make_store.location()) / "tmp")
    keys = raw.ls()
    with pytest.raises(SessionError) as ei:
        st = make_store()
        st.load("s")
    assert "version" in str(ei.value).lower()
    # nothing written into a store it cannot read
    assert raw.ls() == keys
    if not make_store.is_s3:
        assert not (Path(make_store.location()) / "tmp").exists()
    assert _rmanifest(make_store, raw, "s", fold=False)["version"] == 2


# ------------------------------------------------------------------ agents, corruption, verify


def test_list_for_agent_skips_other_agents_blobs(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    st.save(make_session("a1", 2, agent_id="alice"))
    st.save(make_session("a2", 3, agent_id="alice"))
    st.save(make_session("b1", 2, agent_id="bob"))
    for k in _rblobs(make_store, raw, "b1"):
        raw.flip(k, width=8)
    got = st.list_for_agent("alice")
    assert [s.session_id for s in got] == ["a2", "a1"]
    assert all(isinstance(s, Session) and len(s.loops) >= 2 for s in got)
    assert st.list_for_agent("nobody") == []
    with pytest.raises(CorruptSession) as ei:
        st.list_for_agent("bob")
    assert ei.value.session_id == "b1"


def test_load_loop_with_other_blobs_damaged(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    s = make_session("s", 3)
    st.save(s)
    raw.flip(_rblob_of(make_store, raw, "s", s.loops[0].loop_id), width=8)
    raw.delete(_rblob_of(make_store, raw, "s", s.loops[1].loop_id))
    assert _dump(st.load_loop("s", s.loops[2].loop_id)) == _dump(s.loops[2])
    for call in (lambda: st.load("s"), lambda: st.load_loop("s", s.loops[0].loop_id)):
        with pytest.raises(CorruptSession) as ei:
            call()
        assert ei.value.session_id == "s"
    with pytest.raises(CorruptSession):
        st.load_loop("s", s.loops[1].loop_id)


def test_garbled_manifest(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    st.save(make_session("good", 1))
    st.save(make_session("bad", 1, agent_id="bob"))
    st.save(make_session("gone", 1, agent_id="carol"))
    mp = manifest_key("bad")
    raw.write(mp, raw.read(mp)[:-40] + b"garbage")
    with pytest.raises(CorruptSession) as ei:
        st.load("bad")
    assert ei.value.session_id == "bad"
    ids = st.list_ids()
    assert "good" in ids
    # another agent's damaged manifest does not break this agent's listing
    assert [s.session_id for s in st.list_for_agent("agent-test")] == ["good"]
    with pytest.raises(CorruptSession):
        st.list_for_agent("bob")
    raw.write(manifest_key("gone"), b"\x00garbage")
    if make_store.is_s3:
        # No listing catalog on S3 (FORMAT.md 7): listings read the manifests, so, like a
        # rebuilt catalog below, nothing says whose an unreadable manifest was.
        for agent in ("agent-test", "carol"):
            with pytest.raises(CorruptSession):
                st.list_for_agent(agent)
        return
    # damage so deep the manifest no longer names its owner: the listing catalog still
    # knows it (carol's), so agent-test's listing is unaffected and carol's reports it
    assert [s.session_id for s in st.list_for_agent("agent-test")] == ["good"]
    with pytest.raises(CorruptSession):
        st.list_for_agent("carol")
    # a fresh catalog (rebuilt from the sessions) cannot tell: then it is reported
    st.reindex()
    with pytest.raises(CorruptSession):
        st.list_for_agent("agent-test")


def test_verify_report_kinds(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    fs = not make_store.is_s3
    for sid in ("flip", "trunc", "gone", "garble", "orph", "fine"):
        st.save(make_session(sid, 2))
    assert st.verify().ok
    raw.flip(_rblobs(make_store, raw, "flip")[0], width=8)
    tb = _rblobs(make_store, raw, "trunc")[0]
    raw.write(tb, raw.read(tb)[:10])
    gone = _rblobs(make_store, raw, "gone")[0]
    raw.delete(gone)
    raw.write(manifest_key("garble"), b'{"not": "a manifest')
    # orphan: replace a loop in place, the old blob is no longer named
    before = set(_rblobs(make_store, raw, "orph"))
    s = st.load("orph")
    st.append_loop("orph", make_loop("orph", 1, text_bytes=4321))
    orphan = (before - set(_rblobs(make_store, raw, "orph"))) or before
    assert s.loops[1].loop_id == make_loop("orph", 1).loop_id
    if fs:  # object stores have no tmp/
        stale = Path(make_store.location()) / "tmp" / "stale-leftover.tmp"
        stale.write_bytes(b"x" * 10)
        old = time.time() - 3600
        os.utime(stale, (old, old))

    rep = st.verify()
    assert not rep.ok
    by_sid: dict[str, list[Any]] = {}
    for p in rep.problems:
        by_sid.setdefault(p.session_id, []).append(p)
    assert set(by_sid) == {"flip", "trunc", "gone", "garble"}
    assert _kind(by_sid["flip"][0].kind) in ("hash mismatch", "undecodable")
    assert _kind(by_sid["trunc"][0].kind) in ("undecodable", "hash mismatch")
    assert _kind(by_sid["gone"][0].kind) == "missing blob"
    assert Path(by_sid["gone"][0].path).name == Path(gone).name
    assert _kind(by_sid["garble"][0].kind) == "bad manifest"
    assert str(by_sid["flip"][0].path).startswith(f"{st.location}/sessions/flip/")
    orphan_paths = {Path(o.path).name for o in rep.orphans}
    if fs:
        assert stale.name in orphan_paths
    assert {Path(k).name for k in orphan} & orphan_paths
    # one session at a time
    assert st.verify("fine").ok and not st.verify("flip").ok
    # orphans alone leave ok True
    st2 = make_store("clean", durable=False)
    st2.save(make_session("o", 2))
    st2.checkpoint("o")
    st2.append_loop("o", make_loop("o", 0, text_bytes=999))
    st2.checkpoint("o")  # the replaced loop's blob file is named no more
    rep2 = st2.verify()
    assert rep2.ok and rep2.problems == []
    # (on S3 the record the checkpoint folded is listed too until gc: FORMAT.md 7)
    kinds = sorted(o.kind for o in rep2.orphans)
    assert kinds == (["orphan_blob"] if fs else ["orphan_blob", "stale_journal"])


def test_gc_counts_and_grace(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    fs = not make_store.is_s3
    st.save(make_session("g", 2))
    st.checkpoint("g")
    st.append_loop("g", make_loop("g", 0, text_bytes=777))  # old blob orphaned
    if fs:  # object stores have no tmp/
        fresh = Path(make_store.location()) / "tmp" / "fresh.tmp"
        fresh.write_bytes(b"f")
        stale = Path(make_store.location()) / "tmp" / "stale.tmp"
        stale.write_bytes(b"s")
        old = time.time() - 3600
        os.utime(stale, (old, old))
    assert len(_rblobs(make_store, raw, "g")) == 3
    r = st.gc()  # default grace (15 min): the fresh orphan blob stays
    assert len(_rblobs(make_store, raw, "g")) == 3
    if fs:
        assert not stale.exists() and fresh.exists()
    assert r.tmp_removed == (1 if fs else 0) and r.blobs_removed == 0
    r2 = st.gc(grace=timedelta(0))
    assert r2.blobs_removed == 1 and len(_rblobs(make_store, raw, "g")) == 2
    if fs:
        assert not fresh.exists()
    rep = st.verify()
    assert rep.ok and rep.orphans == []
    assert len(st.load("g").loops) == 2


# ------------------------------------------------------------------ hostile ids and symlinks

BAD_IDS = ["", ".", "..", "a/b", "a\\b", "a\0b", "../escape", "/abs", "é" * 100 + "x"]
GOOD_IDS = ["a.b", "...", " spaced id ", "ünïcødé-😀", ".hidden", "x" * 200, "é" * 100]


def test_hostile_ids_refused_nothing_outside(tmp_path: Path, make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    root = Path(make_store.location())  # a directory store's root (not used on S3)
    st.save(make_session("ok", 1))
    snapshot = sorted(str(p) for p in tmp_path.rglob("*") if root not in p.parents)
    keys = raw.ls()
    assert len(("é" * 100 + "x").encode()) == 201
    for bad in BAD_IDS:
        calls = [
            lambda b=bad: st.load(b),
            lambda b=bad: st.exists(b),
            lambda b=bad: st.delete(b),
            lambda b=bad: st.append_loop(b, make_loop("ok", 5)),
            lambda b=bad: st.update(b, lambda s: None),
            lambda b=bad: st.load_loop(b, "x"),
            lambda b=bad: st.verify(b),
            lambda b=bad: st.export_legacy(b, tmp_path / "exp"),
            lambda b=bad: st.save(make_session("ok", 1).model_copy(update={"session_id": b})),
        ]
        for call in calls:
            with pytest.raises(InvalidSessionId) as ei:
                call()
            assert isinstance(ei.value, ValueError)
        with pytest.raises(InvalidSessionId), st.lock(bad):
            pass
    after = sorted(str(p) for p in tmp_path.rglob("*") if root not in p.parents)
    assert after == snapshot
    assert raw.ls() == keys  # nothing written inside the store either
    assert st.list_ids() == ["ok"]


def test_odd_but_valid_ids(make_store: StoreFactory) -> None:
    st, raw = make_store(durable=False), make_store.raw()
    for sid in GOOD_IDS:
        s = make_session(sid, 1)
        st.save(s)
        assert _dump(st.load(sid)) == _dump(s)
        assert raw.exists(manifest_key(sid))
    assert sorted(st.list_ids()) == sorted(GOOD_IDS)
    for sid in GOOD_IDS:
        st.delete(sid)
    assert st.list_ids() == []


def test_symlinks_inside_store_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    st = _store(root)
    st.save(make_session("real", 2))
    # a copy of a real session outside, then a session dir symlinked to it
    shutil.copytree(_sdir(root, "real"), outside / "sess")
    (outside / "secret.txt").write_text("keep me")
    os.symlink(outside / "sess", _sdir(root, "evil"))
    before = _tree(outside)
    try:
        s = st.load("evil")
    except SessionError:
        pass
    else:
        raise AssertionError(f"followed a symlink out of the store: {s.session_id}")
    for call in (
        lambda: st.save(make_session("evil", 3)),
        lambda: st.append_loop("evil", make_loop("evil", 9)),
        lambda: st.delete("evil"),
        lambda: st.gc(grace=0),
        lambda: st.verify(),
    ):
        with contextlib.suppress(SessionError):
            call()
    assert _tree(outside) == before
    # a blob symlinked out of the store is not read or written through
    blob = _blobs(root, "real")[0]
    target = outside / "blob.zst"
    shutil.copy(blob, target)
    blob.unlink()
    os.symlink(target, blob)
    before = _tree(outside)
    with pytest.raises(SessionError):
        st.load("real")
    st.save(make_session("real", 3))
    assert _tree(outside) == before
    # a lock file symlinked out of the store
    lock_target = outside / "lockfile"
    lock_target.write_text("")
    os.symlink(lock_target, root / "locks" / "lk.lock")
    before = _tree(outside)
    with contextlib.suppress(SessionError):
        st.save(make_session("lk", 1))
    assert _tree(outside) == before


def test_no_bare_oserror(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SessionError):
        FileSystemSessionStore(f)
    st = _store(tmp_path / "s")
    (tmp_path / "s" / "sessions" / "plainfile").write_text("x")
    with pytest.raises(SessionError):
        st.append_loop("plainfile", make_loop("plainfile", 0))
    with pytest.raises(SessionError):
        st.load("plainfile")


# ------------------------------------------------------------------ processes


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"worker never wrote {path}"
        time.sleep(0.01)


def test_lock_excludes_other_process_and_retry_budget(tmp_path: Path) -> None:
    root = tmp_path / "s"
    st = _store(root, lock_timeout=0.5, lock_poll_interval=0.05)
    st.save(make_session("L", 1))
    # parent holds lock(): a child process cannot write
    with SPAWN.Pool(1) as pool:
        with st.lock("L"):
            assert pool.apply(workers.try_append, (str(root), "L", 50, 0.3)) == "locked"
        assert pool.apply(workers.try_append, (str(root), "L", 51, 0.3)) == "ok"
    # a child holds it longer than the budget: SessionLocked no sooner than the budget
    ready = tmp_path / "ready1"
    p = SPAWN.Process(target=workers.hold_lock, args=(str(root), "L", str(ready), 3.0))
    p.start()
    try:
        _wait_for(ready)
        t0 = time.monotonic()
        with pytest.raises(SessionLocked) as ei:
            st.append_loop("L", make_loop("L", 60))
        took = time.monotonic() - t0
        assert isinstance(ei.value, TimeoutError) and ei.value.session_id == "L"
        assert 0.5 <= took < 0.5 + 0.5
        zero = _store(root, lock_timeout=0)
        t0 = time.monotonic()
        with pytest.raises(SessionLocked):
            zero.append_loop("L", make_loop("L", 61))
        assert time.monotonic() - t0 < 0.5
        # shorter holds: all succeed
        patient = _store(root, lock_timeout=10)
        patient.append_loop("L", make_loop("L", 62))
        assert time.monotonic() - t0 < 10
    finally:
        p.join(10)
    assert p.exitcode == 0
    assert [lp.loop_id for lp in st.load("L").loops][-1] == make_loop("L", 62).loop_id


def test_sigkilled_lock_holder_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "s"
    st = _store(root, lock_timeout=3)
    st.save(make_session("K", 1))
    ready = tmp_path / "ready"
    p = SPAWN.Process(target=workers.hold_lock, args=(str(root), "K", str(ready), 120.0))
    p.start()
    _wait_for(ready)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    st.append_loop("K", make_loop("K", 1))
    with st.lock("K"):
        pass
    assert len(st.load("K").loops) == 2
    assert (root / "locks" / "K.lock").exists()


def test_processes_and_threads_append_one_session(make_store: StoreFactory) -> None:
    spec = make_store.spec()
    st = make_store()
    st.save(make_session("shared", 0))
    stop = threading.Event()
    reader_errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                s = st.load("shared")
                assert len({lp.loop_id for lp in s.loops}) == len(s.loops)
            except BaseException as exc:
                reader_errors.append(exc)
                return

    rt = threading.Thread(target=reader)
    rt.start()
    try:
        with SPAWN.Pool(4) as pool:
            results = pool.starmap(
                workers.append_many, [(spec, "shared", p, 2, 6) for p in range(4)]
            )
    finally:
        stop.set()
        rt.join()
    assert reader_errors == []
    acked = [x for r in results for x in r]
    ids = [lp.loop_id for lp in st.load("shared").loops]
    assert len(acked) == 48
    assert len(ids) == len(set(ids)) == len(acked)
    assert set(ids) == set(acked)
    assert st.verify().ok


def test_sigkilled_writers_lose_no_acknowledged_write(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    spec = make_store.spec()
    st = make_store()
    st.save(make_session("W", 0))
    logs = []
    for round_ in range(2):
        log = tmp_path / f"acked{round_}.log"
        logs.append(log)
        procs = [
            SPAWN.Process(
                target=workers.append_forever,
                args=(spec, "W", str(log), 1000 * (10 * round_ + k)),
            )
            for k in range(2)
        ]
        for p in procs:
            p.start()
        _wait_for(log)
        time.sleep(0.3 + 0.2 * round_)
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(10)
    acked = [x for log in logs for x in log.read_text().split()]
    assert acked
    ids = [lp.loop_id for lp in st.load("W").loops]
    assert len(ids) == len(set(ids))
    assert set(acked) <= set(ids)
    assert st.verify().ok
    st.append_loop("W", make_loop("W", 99_999))  # cuts any torn tail a killed writer left
    st.gc(grace=0)
    rep = st.verify()
    assert rep.ok and rep.orphans == []


# ------------------------------------------------------------------ legacy


def test_import_export_phi_core_fixtures(tmp_path: Path, make_store: StoreFactory) -> None:
    src = tmp_path / "legacy"
    src.mkdir()
    paths = fixture_paths()
    assert paths
    for p in paths:
        shutil.copy(p, src / p.name)
    (src / "broken.json").write_text('{"session_id": "broken", ')
    (src / "notes.txt").write_text("not a session")
    st, raw = make_store(durable=False), make_store.raw()
    rep = st.import_legacy(src)
    failed = {Path(f.path).name: f.reason for f in rep.failed}
    assert set(failed) == {"broken.json"} and failed["broken.json"]
    ids = {p.stem for p in paths}
    assert set(st.list_ids()) == ids
    gens = {sid: _rmanifest(make_store, raw, sid)["generation"] for sid in ids}
    rep2 = st.import_legacy(src)  # idempotent
    assert set(st.list_ids()) == ids
    assert {sid: _rmanifest(make_store, raw, sid)["generation"] for sid in ids} == gens
    assert {Path(f.path).name for f in rep2.failed} == {"broken.json"}
    out = tmp_path / "out"
    for p in paths:
        sid = p.stem
        assert _dump(st.load(sid)) == _dump(Session.model_validate_json(p.read_bytes()))
        written = st.export_legacy(sid, out)
        assert Path(written) == out / p.name
        assert Path(written).read_bytes() == p.read_bytes()
        for lp in st.load(sid).loops:
            assert st.load_loop(sid, lp.loop_id).loop_id == lp.loop_id
    assert st.verify().ok


def test_legacy_module_storage_rs_semantics(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    paths = fixture_paths()
    sessions = [Session.model_validate_json(p.read_bytes()) for p in paths]
    for i, (p, s) in enumerate(zip(paths, sessions, strict=True)):
        written = legacy.save_session(s, d)
        assert Path(written) == d / p.name
        assert Path(written).read_bytes() == p.read_bytes()
        t = 1_700_000_000 + 100 * (len(paths) - i)  # first fixture newest
        os.utime(written, (t, t))
    assert legacy.list_session_ids(d) == [p.stem for p in paths]
    for s in sessions:
        assert _dump(legacy.load_session(s.session_id, d)) == _dump(s)
    agent = sessions[0].agent_id
    got = legacy.load_sessions_for_agent(agent, d)
    assert {s.session_id for s in got} == {s.session_id for s in sessions if s.agent_id == agent}
    with pytest.raises(SessionNotFound):
        legacy.load_session("missing", d)
    with pytest.raises(SessionNotFound):
        legacy.delete_session("missing", d)
    legacy.delete_session(sessions[0].session_id, d)
    assert sessions[0].session_id not in legacy.list_session_ids(d)
    assert legacy.list_session_ids(tmp_path / "nope") == []
    with pytest.raises(InvalidSessionId):
        legacy.load_session("../x", d)
    with pytest.raises(InvalidSessionId):
        legacy.save_session(sessions[0].model_copy(update={"session_id": "../x"}), d)
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------ asyncio


def test_async_store_every_method(make_store: StoreFactory) -> None:
    async def main() -> None:
        st = open_async_store(
            make_store.location(), **make_store.options, durable=False, lock_timeout=2.0
        )
        s = make_session("as", 2, agent_id="ag")
        await st.save(s)
        assert await st.exists("as")
        assert _dump(await st.load("as")) == _dump(s)
        assert await st.list_ids() == ["as"]
        assert [x.session_id for x in await st.list_for_agent("ag")] == ["as"]
        await st.append_loop("as", make_loop("as", 2, agent_id="ag"))
        r = await st.update("as", lambda x: x.loops.append(make_loop("as", 3, agent_id="ag")))
        assert len(r.loops) == 4
        lp = await st.load_loop("as", s.loops[0].loop_id)
        assert _dump(lp) == _dump(s.loops[0])
        assert (await st.verify()).ok
        await st.gc()
        await asyncio.gather(
            *(st.append_loop("as", make_loop("as", 10 + i, agent_id="ag")) for i in range(6))
        )
        assert len((await st.load("as")).loops) == 10
        async with st.lock("as"):
            await st.append_loop("as", make_loop("as", 50, agent_id="ag"))
        await st.delete("as")
        with pytest.raises(SessionNotFound):
            await st.load("as")
        with pytest.raises(InvalidSessionId):
            await st.load("..")
        st.close()

    asyncio.run(main())


def test_gc_and_delete_never_break_concurrent_writers_and_readers(
    make_store: StoreFactory,
) -> None:
    """An eager gc (grace 0) and deletes race writers (append + replace) and readers."""
    st = make_store(durable=False, lock_timeout=30)
    st2 = make_store(durable=False, lock_timeout=30)
    st.save(make_session("s", 3))
    st.save(make_session("d", 1))
    stop = threading.Event()
    errors: list[str] = []
    done = {"w": 0, "r": 0}

    def writer(k: int) -> None:
        i = 0
        s_ = st if k % 2 else st2
        while not stop.is_set():
            try:
                s_.append_loop("s", make_loop("s", i % 3, text_bytes=300 + (i * k) % 700))
                s_.append_loop("s", make_loop("s", 100 * k + i, text_bytes=200))
                s_.append_loop("d", make_loop("d", 100 * k + i, text_bytes=200))
                done["w"] += 1
            except Exception as exc:
                errors.append(f"write: {exc!r}")
            i += 1

    def collector() -> None:
        while not stop.is_set():
            try:
                st.gc(grace=0)
                st2.delete("d")
            except SessionNotFound:
                pass
            except Exception as exc:
                errors.append(f"gc/delete: {exc!r}")
            time.sleep(0.005)

    def reader() -> None:
        while not stop.is_set():
            try:
                s = st.load("s")
                st.load_loop("s", s.loops[0].loop_id)
                rep = st.verify("s")
                if not rep.ok:
                    errors.append(f"verify: {rep.problems}")
                st.list_ids()
                st.list_for_agent("agent-test")
                done["r"] += 1
            except Exception as exc:
                errors.append(f"read: {exc!r}")
            with contextlib.suppress(SessionNotFound):
                st.load("d")

    threads = [threading.Thread(target=writer, args=(k,)) for k in (1, 2)]
    threads += [threading.Thread(target=collector), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert done["w"] > 0 and done["r"] > 0
    assert st.verify().ok


def test_save_again_restores_missing_or_truncated_blobs(make_store: StoreFactory) -> None:
    """save() replaces the stored session: afterwards load() returns exactly it."""
    st, raw = make_store(durable=False), make_store.raw()
    s = make_session("r", 3)
    st.save(s)
    raw.delete(_rblob_of(make_store, raw, "r", s.loops[0].loop_id))
    tb = _rblob_of(make_store, raw, "r", s.loops[2].loop_id)
    raw.write(tb, raw.read(tb)[:20])
    assert not st.verify().ok
    st.save(s)
    assert _dump(st.load("r")) == _dump(s)
    assert st.verify().ok


def test_readers_never_see_a_half_new_session(make_store: StoreFactory) -> None:
    """Whole-session rewrites plus eager gc: every load is exactly one saved version."""
    st = make_store(durable=False, lock_timeout=30)
    versions = {v: [make_loop("s", i, text_bytes=500 + 10 * v) for i in range(4)] for v in range(8)}
    version_of = {lp.model_dump_json(): v for v, lps in versions.items() for lp in lps}
    assert len(version_of) == 32
    base = make_session("s", 0)
    st.save(base.model_copy(update={"loops": versions[0]}))
    stop = threading.Event()
    torn: list[set[int]] = []
    errors: list[str] = []

    def writer() -> None:
        v = 0
        while not stop.is_set():
            v += 1
            st.save(base.model_copy(update={"loops": versions[v % 8]}))
            if v % 4 == 0:
                st.gc(grace=0)

    def reader() -> None:
        while not stop.is_set():
            try:
                seen = {version_of[lp.model_dump_json()] for lp in st.load("s").loops}
            except Exception as exc:
                errors.append(repr(exc))
                return
            if len(seen) != 1:
                torn.append(seen)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in "ab"]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and torn == []
