"""S3SessionStore on a real SeaweedFS: the public API end to end, races between real
processes, writers killed mid-commit, the server stopped mid-run, unknown outcomes
settled by reading back, and the start-up probe refusing a server that ignores
conditional writes.

Workers run in spawned processes (they import this module by name).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import pickle
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from helpers import FIXTURES_DIR, loop_blob, make_loop, make_session
from loopstore import locations, ondisk, s3backend
from loopstore.errors import (
    CorruptSession,
    LoopNotFound,
    SessionLocked,
    SessionNotFound,
    StorageError,
    UnsupportedFormat,
)
from loopstore.models import Session
from loopstore.s3store import AsyncS3SessionStore, S3SessionStore, s3_store_exists
from loopstore.store import FileSystemSessionStore

if TYPE_CHECKING:
    from s3server import ConditionIgnoringS3Server, SeaweedFSServer

CTX = mp.get_context("spawn")


# --------------------------------------------------------------------------- helpers


def _opts(server: Any) -> dict[str, str]:
    return {
        "endpoint_url": server.endpoint_url,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "region": server.region,
    }


def _url(server: Any, prefix: str) -> str:
    return f"s3://{server.bucket}/{prefix}"


@pytest.fixture
def s3(seaweedfs: SeaweedFSServer, s3_prefix: str) -> Iterator[S3SessionStore]:
    store = S3SessionStore(_url(seaweedfs, s3_prefix), lock_timeout=10, **_opts(seaweedfs))
    yield store
    store.close()


def _keys(server: Any, prefix: str) -> list[str]:
    client = server.boto3_client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=server.bucket, Prefix=prefix
    ):
        out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    return sorted(out)


def _get(server: Any, key: str) -> bytes:
    got = server.boto3_client().get_object(Bucket=server.bucket, Key=key)
    return got["Body"].read()  # type: ignore[no-any-return]


def _dump(obj: Any) -> str:
    return obj.model_dump_json()  # type: ignore[no-any-return]


def _records(server: Any, prefix: str, sid: str) -> list[str]:
    return [k for k in _keys(server, f"{prefix}sessions/{sid}/") if k.startswith("log/")]


# --------------------------------------------------------------------------- layout, API


def test_layout_marker_and_objects_hold_the_filesystem_bytes(
    seaweedfs: SeaweedFSServer, s3_prefix: str, tmp_path: Path
) -> None:
    store = S3SessionStore(_url(seaweedfs, s3_prefix), **_opts(seaweedfs))
    assert store.location == _url(seaweedfs, s3_prefix).rstrip("/")
    assert _get(seaweedfs, s3_prefix + "loopstore.json") == ondisk.marker_bytes()
    s = make_session("s1", 3)
    store.save(s)
    # A new session is one checkpoint (generation 1) with its blobs: no record yet.
    names = _keys(seaweedfs, f"{s3_prefix}sessions/s1/")
    assert names == [*sorted("loops/" + loop_blob(lp).name for lp in s.loops), "manifest.json"]
    for lp in s.loops:
        blob = loop_blob(lp)
        assert _get(seaweedfs, f"{s3_prefix}sessions/s1/loops/{blob.name}") == blob.data
    store.append_loop("s1", make_loop("s1", 3))
    store.append_loop("s1", make_loop("s1", 4))
    assert _records(seaweedfs, s3_prefix, "s1") == [
        ondisk.record_name(2),
        ondisk.record_name(3),
    ]
    # A record object is exactly one journal frame.
    from loopstore import journal

    body = _get(seaweedfs, f"{s3_prefix}sessions/s1/{ondisk.record_name(3)}")
    frames, end = journal.scan(body)
    assert len(frames) == 1 and end == len(body) and frames[0].meta["seq"] == 3
    # A checkpoint here and a backup on a filesystem are byte for byte the same.
    assert store.checkpoint("s1")
    fs = FileSystemSessionStore(tmp_path / "fs")
    store.backup(fs)
    manifest = _get(seaweedfs, f"{s3_prefix}sessions/s1/manifest.json")
    assert (fs.root / "sessions" / "s1" / "manifest.json").read_bytes() == manifest
    for p in (fs.root / "sessions" / "s1" / "loops").iterdir():
        assert _get(seaweedfs, f"{s3_prefix}sessions/s1/loops/{p.name}") == p.read_bytes()
    assert fs.load_json("s1") == store.load_json("s1")


def test_public_api_end_to_end(s3: S3SessionStore) -> None:
    s = make_session("s1", 3, agent_id="a1")
    s3.save(s)
    assert _dump(s3.load("s1")) == _dump(s)
    assert s3.exists("s1") and not s3.exists("nope")
    with pytest.raises(SessionNotFound):
        s3.load("nope")

    s3.append_loop("s1", make_loop("s1", 3, agent_id="a1"))
    replaced = make_loop("s1", 1, agent_id="a1", text_bytes=500)
    s3.append_loop("s1", replaced)  # same loop_id: replaced in place
    got = s3.load("s1")
    assert [lp.loop_id for lp in got.loops] == [f"s1.test.{i}" for i in (1, 2, 3, 4)]
    assert _dump(got.loops[1]) == _dump(replaced)
    assert _dump(s3.load_loop("s1", replaced.loop_id)) == _dump(replaced)
    with pytest.raises(LoopNotFound):
        s3.load_loop("s1", "missing")
    assert json.loads(s3.load_json("s1")) == json.loads(got.model_dump_json())
    assert b"".join(s3.iter_loop_json("s1")).count(b'"loop_id"') >= 4
    assert s3.session_info("s1").loop_count == 4

    def drop_last(sess: Session) -> Session:
        sess.loops = sess.loops[:-1]
        return sess

    assert len(s3.update("s1", drop_last).loops) == 3
    assert len(s3.load("s1").loops) == 3
    with pytest.raises(SessionNotFound):
        s3.update("nope", drop_last)

    s3.append_loop("s2", make_loop("s2", 0, agent_id="a2"))  # a new session from a loop
    s3.save(make_session("s3", 1, agent_id="a1"))
    assert sorted(s3.list_ids()) == ["s1", "s2", "s3"]
    assert sorted(x.session_id for x in s3.list_for_agent("a1")) == ["s1", "s3"]
    s3.delete("s3")
    assert not s3.exists("s3")
    with pytest.raises(SessionNotFound):
        s3.delete("s3")
    assert sorted(s3.list_ids()) == ["s1", "s2"]
    assert s3.verify().ok


def test_same_bytes_as_a_filesystem_store_for_the_same_calls(
    s3: S3SessionStore, tmp_path: Path
) -> None:
    fs = FileSystemSessionStore(tmp_path / "fs", durable=False)
    for store in (fs, s3):
        store.save(make_session("x", 2))
        store.append_loop("x", make_loop("x", 2))
        store.append_loop("x", make_loop("x", 0, text_bytes=300))
        store.update("x", lambda sess: None)

        def writes_itself(sess: Session, store: Any = store) -> Session:
            # fn may write the session itself (the lock is re-entrant): its result wins
            store.append_loop("x", make_loop("x", 7))
            sess.loops.append(make_loop("x", 8))
            return sess

        store.update("x", writes_itself)
    assert s3.load_json("x") == fs.load_json("x")
    assert [lp.loop_id for lp in s3.load("x").loops] == [lp.loop_id for lp in fs.load("x").loops]


def test_odd_session_ids_round_trip(s3: S3SessionStore) -> None:
    ids = ["a b+c%d?é#x", "x&y<z>'\"", "tab\there", "ünï", "..x", " lead"]
    for sid in ids:
        s3.append_loop(sid, make_loop(sid, 0))
    assert sorted(s3.list_ids()) == sorted(ids)
    for sid in ids:
        assert s3.load(sid).loops[0].session_id == sid


def test_folds_keep_state_and_delete_then_create_continues_the_sequence(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore
) -> None:
    for i in range(5):
        s3.append_loop("f", make_loop("f", i))
    assert s3.session_state("f").generation == 5
    assert s3.checkpoint("f")
    assert not s3.checkpoint("f")  # nothing since
    s3.append_loop("f", make_loop("f", 5))
    assert [lp.loop_id for lp in s3.load("f").loops] == [f"f.test.{i}" for i in range(1, 7)]
    s3.delete("f")
    # What remains of a deleted session is its tombstone record: no data.
    assert _keys(seaweedfs, f"{s3_prefix}sessions/f/") == [ondisk.record_name(7)]
    assert "f" not in s3.list_ids()
    s3.append_loop("f", make_loop("f", 9))
    state = s3.session_state("f")
    assert state.generation > 7  # past every record number of the deleted session
    assert [e.loop_id for e in state.entries] == ["f.test.10"]
    assert s3.verify().ok


def test_import_export_legacy_and_backups_both_ways(
    seaweedfs: SeaweedFSServer,
    s3_prefix: str,
    s3: S3SessionStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = s3.import_legacy(FIXTURES_DIR)
    assert report.imported and not report.failed
    again = s3.import_legacy(FIXTURES_DIR)
    assert not again.imported and not again.updated and len(again.unchanged) == len(report.imported)
    sid = report.imported[0]
    out = s3.export_legacy(sid, tmp_path / "out")
    assert out.read_bytes() == (FIXTURES_DIR / f"{sid}.json").read_bytes()

    # S3 -> filesystem (a path) and back into another prefix (a URL, configured by env).
    fs_dir = tmp_path / "backup"
    r1 = s3.backup(fs_dir)
    assert r1.ok and r1.sessions == len(report.imported)
    fs = FileSystemSessionStore(fs_dir)
    for s in report.imported:
        assert fs.load_json(s) == s3.load_json(s)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    url = _url(seaweedfs, s3_prefix + "mirror/")
    r2 = fs.backup(url)
    assert r2.ok and r2.sessions_updated == len(report.imported)
    mirror = S3SessionStore(url)
    for s in report.imported:
        assert mirror.load_json(s) == s3.load_json(s)
    # Incremental: a changed session is rewritten, the others are left as they are.
    fs.append_loop(sid, make_loop(sid, 50))
    r3 = fs.backup(mirror)
    assert r3.sessions_updated == 1 and r3.sessions_unchanged == len(report.imported) - 1
    assert r3.files_copied == 1
    assert mirror.load_json(sid) == fs.load_json(sid)
    fs.delete(sid)
    r4 = fs.backup(mirror)
    assert r4.sessions_removed == 1 and not mirror.exists(sid)
    assert mirror.verify().ok


def test_verify_gc_and_stats(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore
) -> None:
    s = make_session("g", 3)
    s3.save(s)
    s3.append_loop("g", make_loop("g", 0, text_bytes=400))  # replaces loop 1: its blob
    s3.checkpoint("g")  # ... is now unreferenced
    st = s3.stats()
    assert st.sessions == 1 and st.loops == 3 and st.blobs == 3 and st.damaged == 0
    v = s3.verify()
    assert v.ok and v.blobs_checked == 3
    orphans = {(o.kind, str(o.path).rsplit("/", 1)[-1]) for o in v.orphans}
    old_blob = loop_blob(s.loops[0]).name
    assert ("orphan_blob", old_blob) in orphans
    young = s3.gc()  # default grace: everything is too young
    assert young.blobs_removed == 0
    gc = s3.gc(grace=0)
    assert gc.blobs_removed == 1 and not gc.problems
    assert old_blob not in _keys(seaweedfs, f"{s3_prefix}sessions/g/loops/")
    assert len(s3.load("g").loops) == 3
    # gc never touches a live session; it removes what a deleted one left behind.
    s3.delete("g")
    assert s3.gc(grace=0).dirs_removed == 1
    assert _keys(seaweedfs, f"{s3_prefix}sessions/") == []


def test_gc_removes_records_a_checkpoint_folded(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore
) -> None:
    for i in range(4):
        s3.append_loop("r", make_loop("r", i))
    s3.checkpoint("r")
    s3.append_loop("r", make_loop("r", 4))
    v = s3.verify()
    stale = sorted(str(o.path).rsplit("/", 2)[-1] for o in v.orphans)
    assert stale == [ondisk.record_name(n).split("/")[1] for n in (2, 3, 4)]
    assert s3.gc(grace=0).journals_removed == 3
    assert _records(seaweedfs, s3_prefix, "r") == [ondisk.record_name(5)]
    assert not s3.verify().orphans
    assert len(s3.load("r").loops) == 5


def test_backend_names_records_for_maintenance(s3: S3SessionStore) -> None:
    for i in range(3):
        s3.append_loop("m", make_loop("m", i))
    s3.checkpoint("m")
    names = [f.name for f in s3.backend.list_session_files("m")]
    assert ondisk.MANIFEST_NAME in names
    seqs = sorted(q for n in names if (q := ondisk.record_seq(n)) is not None)
    assert seqs == [2, 3]  # folded into the checkpoint (generation 3): stale for gc
    s3.backend.delete_session_file("m", ondisk.record_name(2))
    s3.backend.delete_session_file("m", ondisk.record_name(3).split("/")[1])  # bare name
    assert [ondisk.record_seq(f.name) for f in s3.backend.list_session_files("m")] == [None]
    assert len(s3.load("m").loops) == 3


def test_pickle_async_and_store_exists(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.save(make_session("p", 2))
    clone = pickle.loads(pickle.dumps(s3))
    assert isinstance(clone, S3SessionStore) and clone.location == s3.location
    assert clone.lock_timeout == s3.lock_timeout
    assert _dump(clone.load("p")) == _dump(s3.load("p"))

    async def run() -> list[str]:
        a = AsyncS3SessionStore(s3.location, **_opts(seaweedfs))
        await a.append_loop("p", make_loop("p", 2))
        async with a.lock("p"):  # in-process lock, re-entrant for calls made inside
            await a.append_loop("p", make_loop("p", 3))
        return [lp.loop_id for lp in (await a.load("p")).loops]

    assert len(asyncio.run(run())) == 4
    assert s3_store_exists(s3.location, **_opts(seaweedfs))
    assert not s3_store_exists(_url(seaweedfs, s3_prefix + "other/"), **_opts(seaweedfs))
    assert _keys(seaweedfs, s3_prefix + "other/") == []  # nothing was created
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    assert locations.store_exists(s3.location)
    assert isinstance(locations.open_store(s3.location), S3SessionStore)


def test_lock_excludes_threads_of_this_process(s3: S3SessionStore) -> None:
    s3.save(make_session("l", 1))
    inside = threading.Event()
    order: list[str] = []

    def other() -> None:
        inside.wait(5)
        s3.append_loop("l", make_loop("l", 5))  # waits for the lock
        order.append("appended")

    t = threading.Thread(target=other)
    t.start()
    with s3.lock("l"):
        inside.set()
        time.sleep(0.3)
        s3.append_loop("l", make_loop("l", 4))  # re-entrant for the holder
        order.append("held")
    t.join(10)
    assert order == ["held", "appended"]


# --------------------------------------------------------------------------- refusals, errors


def test_probe_refuses_a_server_that_ignores_conditions(
    condition_ignoring_s3: ConditionIgnoringS3Server,
) -> None:
    fake = condition_ignoring_s3
    url = f"s3://{fake.bucket}/store"
    with pytest.raises(StorageError) as err:
        S3SessionStore(url, **_opts(fake))
    text = str(err.value)
    assert fake.endpoint_url in text and "ConditionIgnoringS3" in text
    assert "If-Match" in text and "If-None-Match" in text
    assert fake.ignored_conditions.get("If-None-Match") and fake.ignored_conditions.get("If-Match")
    assert [k for k in fake.buckets[fake.bucket] if "probe" in k] == []  # cleaned up
    # A store that already exists there opens (reads need no conditions); its first
    # write is refused before it is sent.
    fake.buckets[fake.bucket]["store/loopstore.json"] = s3server_object(ondisk.marker_bytes())
    store = S3SessionStore(url, **_opts(fake))
    assert store.list_ids() == []
    with pytest.raises(StorageError, match="cannot host a loopstore store"):
        store.append_loop("x", make_loop("x", 0))
    assert not [k for k in fake.buckets[fake.bucket] if "/sessions/" in k]


def s3server_object(body: bytes) -> Any:
    import hashlib

    from s3server import _Object

    return _Object(body, f'"{hashlib.md5(body).hexdigest()}"', time.time(), "binary", {})


def test_clear_errors_for_a_missing_bucket_an_unreachable_endpoint_and_foreign_prefixes(
    seaweedfs: SeaweedFSServer, s3_prefix: str
) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http"):
        S3SessionStore("s3://no-such-bucket/x", **_opts(seaweedfs))
    with pytest.raises(StorageError, match="does not exist"):
        s3_store_exists("s3://no-such-bucket/x", **_opts(seaweedfs))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = {**_opts(seaweedfs), "endpoint_url": f"http://127.0.0.1:{port}"}
    with pytest.raises(StorageError) as err:
        S3SessionStore(f"s3://{seaweedfs.bucket}/x", **closed)
    assert f"cannot reach the object store at http://127.0.0.1:{port}: connection refused" in str(
        err.value
    )
    assert f"s3://{seaweedfs.bucket}/x/loopstore.json" in str(err.value)
    client = seaweedfs.boto3_client()
    client.put_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}photo.jpg", Body=b"x")
    with pytest.raises(UnsupportedFormat, match=r"not a loopstore store.*photo\.jpg"):
        S3SessionStore(_url(seaweedfs, s3_prefix), **_opts(seaweedfs))
    newer = json.dumps({"format": "loopstore", "version": 99, "hash": "xxh3_128", "codec": "zstd"})
    client.put_object(
        Bucket=seaweedfs.bucket, Key=f"{s3_prefix}v/loopstore.json", Body=newer.encode()
    )
    with pytest.raises(UnsupportedFormat, match="newer"):
        S3SessionStore(_url(seaweedfs, s3_prefix + "v/"), **_opts(seaweedfs))
    with pytest.raises(ValueError):
        S3SessionStore("s3:///x", **_opts(seaweedfs))


def test_an_unknown_outcome_is_settled_by_reading_back_not_retried_into_a_duplicate(
    s3: S3SessionStore,
) -> None:
    """The PUT of a record succeeds, then the client sees a timeout: the call reads the
    key back, finds its own bytes and reports success, exactly once."""
    from botocore.exceptions import ReadTimeoutError

    s3.save(make_session("c", 1))

    def bump(sess: Session) -> Session:
        meta = sess.loops[0].metadata
        assert isinstance(meta, dict)
        meta["n"] = int(meta.get("n", 0)) + 1
        return sess

    puts: list[str] = []
    fail_next = [True]

    def after_call(model: Any, **kw: Any) -> None:
        if fail_next and model.name == "PutObject":
            fail_next.clear()  # once: the PUT landed, its answer is "lost"
            raise ReadTimeoutError(endpoint_url="http://test/after-the-put")

    def before_send(request: Any, **kw: Any) -> None:
        puts.append(request.url)

    once = s3.backend.once  # type: ignore[attr-defined]
    once.meta.events.register("after-call.s3.PutObject", after_call)
    once.meta.events.register("before-send.s3.PutObject", before_send)
    try:
        s3.update("c", bump)
    finally:
        once.meta.events.unregister("after-call.s3.PutObject", after_call)
        once.meta.events.unregister("before-send.s3.PutObject", before_send)
    assert len(puts) == 1  # never sent again: the read-back showed our record there
    meta = s3.load("c").loops[0].metadata
    assert isinstance(meta, dict) and meta["n"] == 1
    assert s3.session_state("c").generation == 2  # one record, no duplicate


def test_a_conflicting_response_for_our_own_landed_write_is_settled(s3: S3SessionStore) -> None:
    """A create-only PUT whose first attempt landed and whose answer was lost is sent
    again and refused (412): the read-back shows our bytes, so it is committed."""
    from botocore.exceptions import ConnectionClosedError

    s3.save(make_session("d", 1))
    sent: list[int] = []

    outage: list[str] = []

    def after_call(model: Any, **kw: Any) -> None:
        sent.append(1)
        if len(sent) == 1:
            outage.append("the read-back fails once too")
            raise ConnectionClosedError(endpoint_url="http://test/dropped")

    once = s3.backend.once  # type: ignore[attr-defined]
    original_get = s3.backend.get  # type: ignore[attr-defined]

    def unreachable_once(*args: Any, **kwargs: Any) -> Any:
        if outage:
            outage.clear()
            raise StorageError("d", "cannot read: simulated outage")
        return original_get(*args, **kwargs)

    once.meta.events.register("after-call.s3.PutObject", after_call)
    s3.backend.get = unreachable_once  # type: ignore[attr-defined,method-assign]
    try:
        s3.append_loop("d", make_loop("d", 1))
    finally:
        once.meta.events.unregister("after-call.s3.PutObject", after_call)
        del s3.backend.get  # type: ignore[attr-defined]
    assert len(sent) == 2  # sent again while the outcome was unknown: 412, read back
    assert [lp.loop_id for lp in s3.load("d").loops] == ["d.test.1", "d.test.2"]
    assert s3.session_state("d").generation == 2


# --------------------------------------------------------------------------- processes


def _store_in_worker(url: str, opts: dict[str, str], lock_timeout: float) -> S3SessionStore:
    import loopstore.store

    loopstore.store.FOLD_MIN_RECORDS = 24  # type: ignore[misc]  # folds race too
    return S3SessionStore(url, lock_timeout=lock_timeout, **opts)


def _append_worker(args: tuple[str, dict[str, str], str, int, int, int]) -> list[list[str]]:
    """`threads` threads each append `count` loops; returns each thread's acked ids."""
    url, opts, sid, proc, threads, count = args
    store = _store_in_worker(url, opts, 60.0)

    def run(t: int) -> list[str]:
        acked = []
        for i in range(count):
            loop = make_loop(sid, proc * 10_000 + t * 100 + i, text_bytes=300)
            store.append_loop(sid, loop)
            acked.append(loop.loop_id)
        return acked

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


def _update_worker(args: tuple[str, dict[str, str], str, int, int]) -> int:
    url, opts, sid, threads, count = args
    store = _store_in_worker(url, opts, 60.0)

    def bump(sess: Session) -> Session:
        meta = sess.loops[0].metadata
        assert isinstance(meta, dict)
        meta["n"] = int(meta.get("n", 0)) + 1
        return sess

    def run(_t: int) -> int:
        for _ in range(count):
            store.update(sid, bump)
        return count

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(run, range(threads)))


def _killable_writer(url: str, opts: dict[str, str], sid: str, base: int, ack_path: str) -> None:
    """Append until killed; each acknowledged loop id is written (flushed) to ack_path."""
    store = _store_in_worker(url, opts, 60.0)
    with open(ack_path, "a", encoding="utf-8") as acks:
        i = 0
        while True:
            loop = make_loop(sid, base + i, text_bytes=300)
            store.append_loop(sid, loop)
            acks.write(loop.loop_id + "\n")
            acks.flush()
            i += 1


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    with CTX.Pool(8) as p:
        yield p


def test_eight_processes_of_four_threads_append_to_one_session(
    seaweedfs: SeaweedFSServer, s3_prefix: str, pool: Any
) -> None:
    url, opts = _url(seaweedfs, s3_prefix), _opts(seaweedfs)
    store = S3SessionStore(url, **opts)
    store.save(make_session("hot", 1))
    jobs = [(url, opts, "hot", p, 4, 4) for p in range(8)]
    acked = [ids for per_proc in pool.map(_append_worker, jobs) for ids in per_proc]
    loops = [lp.loop_id for lp in store.load("hot").loops]
    assert len(loops) == len(set(loops))  # no duplicates
    assert set(loops) == {"hot.test.1"} | {i for ids in acked for i in ids}
    position = {lid: n for n, lid in enumerate(loops)}
    for ids in acked:  # each thread's appends in the order they were acknowledged
        assert [position[i] for i in ids] == sorted(position[i] for i in ids)
    report = store.verify()
    assert report.ok, report.problems


def test_update_from_many_processes_loses_no_increment(
    seaweedfs: SeaweedFSServer, s3_prefix: str, pool: Any
) -> None:
    url, opts = _url(seaweedfs, s3_prefix), _opts(seaweedfs)
    store = S3SessionStore(url, **opts)
    store.save(make_session("ctr", 1))
    done = sum(pool.map(_update_worker, [(url, opts, "ctr", 2, 3) for _ in range(8)]))
    meta = store.load("ctr").loops[0].metadata
    assert isinstance(meta, dict) and meta["n"] == done == 48


def test_writers_killed_mid_commit_lose_nothing_acknowledged(
    seaweedfs: SeaweedFSServer, s3_prefix: str, tmp_path: Path
) -> None:
    url, opts = _url(seaweedfs, s3_prefix), _opts(seaweedfs)
    store = S3SessionStore(url, **opts)
    store.save(make_session("k", 1))
    rng = random.Random(7)
    writers = []
    for rnd in range(2):
        procs = []
        for w in range(4):
            base = (rnd * 4 + w + 1) * 100_000
            writers.append(base)
            ack = tmp_path / f"{base}.acks"
            proc = CTX.Process(
                target=_killable_writer, args=(url, opts, "k", base, str(ack)), daemon=True
            )
            proc.start()
            procs.append((proc, ack))
        # Kill each once it has committed a few loops, at a random moment.
        deadline = time.monotonic() + 60
        for proc, ack in procs:
            while time.monotonic() < deadline and (
                not ack.exists() or len(ack.read_text().split()) < 3
            ):
                assert proc.is_alive()
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for proc, _ack in procs:
            proc.join(10)
            assert proc.exitcode == -signal.SIGKILL
    loops = [lp.loop_id for lp in store.load("k").loops]
    assert len(loops) == len(set(loops))
    for base in writers:
        acked = (tmp_path / f"{base}.acks").read_text().split()
        assert len(acked) >= 3
        stored = [
            lid for lid in loops if (int(lid.rsplit(".", 1)[1]) - 1) // 100_000 * 100_000 == base
        ]
        # Every acknowledged loop is there, in order; at most the one in flight more.
        assert stored[: len(acked)] == acked
        assert len(stored) - len(acked) <= 1
    report = store.verify()
    assert report.ok, report.problems


def test_server_killed_and_restarted_mid_run(seaweedfs: SeaweedFSServer, s3_prefix: str) -> None:
    """Calls fail with a clear StorageError while the server is down, nothing
    acknowledged is lost, and calls work again once it is back."""
    store = S3SessionStore(_url(seaweedfs, s3_prefix), lock_timeout=2, **_opts(seaweedfs))
    store.save(make_session("srv", 1))
    acked: list[str] = []
    errors: list[StorageError] = []
    unsure: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            loop = make_loop("srv", i, text_bytes=300)
            try:
                store.append_loop("srv", loop)
                acked.append(loop.loop_id)
            except StorageError as exc:
                errors.append(exc)
                if exc.maybe_committed:
                    unsure.append(loop.loop_id)
            except SessionLocked:
                pass

    t = threading.Thread(target=writer)
    t.start()
    try:
        _wait(lambda: len(acked) >= 5)
        seaweedfs.kill()
        _wait(lambda: len(errors) >= 2)
        before_restart = len(acked)
        seaweedfs.start()
        _wait(lambda: len(acked) >= before_restart + 5)
    finally:
        stop.set()
        t.join(60)
        seaweedfs.start()
    for err in errors:
        text = str(err)
        assert err.session_id == "srv" and "session 'srv'" in text
        assert seaweedfs.endpoint_url in text and "s3://" in text
    assert any("cannot reach the object store" in str(e) for e in errors)
    loops = {lp.loop_id for lp in store.load("srv").loops}
    assert set(acked) <= loops
    assert loops - set(acked) - {"srv.test.1"} <= set(unsure)
    assert store.verify().ok


def _wait(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_appends_racing_a_delete(seaweedfs: SeaweedFSServer, s3: S3SessionStore) -> None:
    """An append either lands before the tombstone (and is deleted with the session) or
    finds the session deleted and starts a new one; the store stays consistent."""
    s3.save(make_session("del", 1))
    calls: list[tuple[float, float, str]] = []  # (started, acknowledged, loop id)
    go = threading.Event()

    def writer(w: int) -> None:
        go.wait()
        for i in range(10):
            loop = make_loop("del", 100 * (w + 1) + i, text_bytes=200)
            started = time.monotonic()
            s3.append_loop("del", loop)
            calls.append((started, time.monotonic(), loop.loop_id))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    # The deleter is another client whose process-local locks are not the writers'
    # (another endpoint spelling): the race is decided in the bucket, as between hosts.
    other = {
        **_opts(seaweedfs),
        "endpoint_url": seaweedfs.endpoint_url.replace("127.0.0.1", "localhost"),
    }
    deleter = S3SessionStore(s3.location, **other)
    go.set()
    _wait(lambda: len(calls) >= 3)
    delete_started = time.monotonic()
    deleter.delete("del")
    delete_ended = time.monotonic()
    for t in threads:
        t.join(60)
    loops = [lp.loop_id for lp in s3.load("del").loops] if s3.exists("del") else []
    assert len(loops) == len(set(loops))
    assert set(loops) <= {lid for _s, _e, lid in calls}
    before = {lid for _s, ended, lid in calls if ended < delete_started}
    after = {lid for started, _e, lid in calls if started > delete_ended}
    assert before and not before & set(loops)  # deleted with the session
    assert after <= set(loops)  # appended to the session created again
    assert s3.verify().ok


def test_a_delete_cut_short_is_finished_by_the_next_creator(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.save(make_session("cut", 2))

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the deleter dies right after its tombstone

    monkeypatch.setattr(s3backend.S3Backend, "_finish_delete", killed)
    with pytest.raises(KeyboardInterrupt):
        s3.delete("cut")
    monkeypatch.undo()
    assert not s3.exists("cut")
    with pytest.raises(SessionNotFound):
        s3.load("cut")
    young = S3SessionStore(s3.location, lock_timeout=0.3, **_opts(seaweedfs))
    with pytest.raises(SessionLocked, match=r"s3://.*/sessions/cut/"):  # its deleter may
        young.append_loop("cut", make_loop("cut", 5))  # still be at work: wait
    monkeypatch.setattr(s3backend, "DELETE_SETTLE_S", 0.0)
    s3.append_loop("cut", make_loop("cut", 5))
    assert [lp.loop_id for lp in s3.load("cut").loops] == ["cut.test.6"]
    blobs = _keys(seaweedfs, f"{s3_prefix}sessions/cut/loops/")
    assert blobs == [loop_blob(make_loop("cut", 5)).name]  # the old session's are gone
    assert s3.verify().ok


def test_a_record_an_upload_left_short_is_a_torn_tail_the_next_commit_replaces(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore
) -> None:
    """SeaweedFS can keep an empty object when a client dies mid-PUT. No call
    acknowledged it: readers stop before it, verify calls it a torn tail, writers and a
    delete replace it (compare-and-swap on its ETag); one with records after it is damage."""
    from loopstore import journal

    client = seaweedfs.boto3_client()

    def put_record(sid: str, seq: int, body: bytes) -> None:
        key = f"{s3_prefix}sessions/{sid}/{ondisk.record_name(seq)}"
        client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=body)

    s3.save(make_session("t", 2))
    s3.append_loop("t", make_loop("t", 2))  # record 2
    whole = _get(seaweedfs, f"{s3_prefix}sessions/t/{ondisk.record_name(2)}")
    for short in (b"", whole[:10], whole[: len(whole) - 1]):
        put_record("t", 3, short)
        fresh = S3SessionStore(s3.location, **_opts(seaweedfs))
        assert len(fresh.load("t").loops) == 3
        report = fresh.verify()
        assert report.ok, report.problems
        [torn] = report.orphans
        assert torn.kind == "torn_tail" and str(torn.path).endswith(ondisk.record_name(3))
        fresh.gc(grace=0)  # a torn record is the next writer's to replace, not gc's
        assert [o.kind for o in fresh.verify().orphans] == ["torn_tail"]
    # Writers in threads race to replace it: one wins, the others commit after.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: s3.append_loop("t", make_loop("t", 10 + i)), range(4)))
    assert len(s3.load("t").loops) == 7
    report = s3.verify()
    assert report.ok and report.orphans == []
    body = _get(seaweedfs, f"{s3_prefix}sessions/t/{ondisk.record_name(3)}")
    assert journal.scan(body)[1] == len(body) > 0

    # A short record with a whole one after it was never a torn tail: damage, named.
    last = max(ondisk.record_seq(k) or 0 for k in _records(seaweedfs, s3_prefix, "t"))
    put_record("t", last + 1, b"")
    after = {"seq": last + 2, "ops": []}
    put_record("t", last + 2, journal.encode_frame(journal.KIND_RECORD, after))
    fresh = S3SessionStore(s3.location, **_opts(seaweedfs))
    with pytest.raises(CorruptSession, match=r"session 't'.*records after it.*/log/") as err:
        fresh.load("t")
    assert ondisk.record_name(last + 1) in str(err.value)
    assert not fresh.verify().ok

    # update: its view ends before the torn record, and its commit replaces it.
    def mark(sess: Session) -> Session:
        sess.loops[0].metadata = {"updated": True}
        return sess

    s3.save(make_session("u", 1))
    put_record("u", 2, b"")
    s3.update("u", mark)
    assert s3.load("u").loops[0].metadata == {"updated": True}
    assert "torn_tail" not in {o.kind for o in s3.verify("u").orphans}
    put_record("u", 3, b"")  # record 2 is update's; a fold passes over a torn record 3
    assert s3.checkpoint("u")
    s3.append_loop("u", make_loop("u", 1))
    assert len(s3.load("u").loops) == 2
    assert "torn_tail" not in {o.kind for o in s3.verify("u").orphans}

    # A delete replaces a torn record with its tombstone.
    s3.save(make_session("d", 1))
    put_record("d", 2, b"")
    s3.delete("d")
    assert not s3.exists("d")


def test_listing_pages_through_more_than_a_thousand_sessions(
    seaweedfs: SeaweedFSServer, s3_prefix: str, s3: S3SessionStore
) -> None:
    client = seaweedfs.boto3_client()
    ids = [f"s{n:04d}" for n in range(1005)]

    def put(sid: str) -> None:
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}sessions/{sid}/x", Body=b"")

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put, ids))
    assert sorted(s3.backend.list_sessions()) == ids
