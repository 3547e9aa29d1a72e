"""The listing catalog: exact listings without reading every session, rebuilt from the
sessions whenever it is missing, damaged, of another schema or from an earlier boot."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import _workers_store as workers
from helpers import make_loop, make_session
from loopstore import ondisk
from loopstore.catalog import PENDING_DIR
from loopstore.store import FileSystemSessionStore

CTX = mp.get_context("spawn")


def _store(root: Path) -> FileSystemSessionStore:
    return FileSystemSessionStore(root, durable=False)


def _fill(store: FileSystemSessionStore) -> None:
    store.save(make_session("old", 1, agent_id="A"))
    store.save(make_session("mid", 2, agent_id="A"))
    store.save(make_session("new", 4, agent_id="B"))


def test_listings_come_from_the_catalog_sorted_and_filtered(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _fill(store)
    assert store.list_ids() == ["new", "mid", "old"]
    rows = store.sessions()
    assert [(r.session_id, r.agent_id, r.loop_count) for r in rows] == [
        ("new", "B", 4),
        ("mid", "A", 2),
        ("old", "A", 1),
    ]
    assert [r.session_id for r in store.sessions(agent_id="A")] == ["mid", "old"]
    assert [r.session_id for r in store.sessions(order="loops", limit=2)] == ["new", "mid"]
    assert [r.session_id for r in store.sessions(order="id")] == ["mid", "new", "old"]
    assert [r.session_id for r in store.sessions(order="id", reverse=True)] == [
        "old",
        "new",
        "mid",
    ]
    info = store.session_info("mid")
    row = next(r for r in rows if r.session_id == "mid")
    assert (row.generation, row.committed_at_ns, row.stored_bytes) == (
        info.generation,
        info.committed_at_ns,
        info.stored_bytes,
    )
    assert row.header == dict(info.header)
    # A listing reads no session: once refreshed, their files can even be unreadable.
    for sid in ("old", "mid", "new"):
        (tmp_path / "s" / "sessions" / sid / "manifest.json").write_bytes(b"garbage")
    assert store.list_ids() == ["new", "mid", "old"]


def test_every_commit_is_listed_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _fill(store)
    assert store.list_ids()[0] == "new"
    store.append_loop("old", make_loop("old", 9))  # now the most recently active
    assert store.list_ids() == ["old", "new", "mid"]
    assert store.sessions(agent_id="A")[0].loop_count == 2
    store.delete("new")
    assert store.list_ids() == ["old", "mid"]
    assert sorted((tmp_path / "s" / PENDING_DIR).iterdir()) == []  # all refreshed


def test_a_commit_made_by_another_process_is_listed(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _fill(store)
    assert store.list_ids() == ["new", "mid", "old"]
    p = CTX.Process(target=workers.append_one, args=(str(store.root), "old", 9))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert store.list_ids()[0] == "old"
    assert store.sessions(agent_id="A")[0].loop_count == 2


@pytest.mark.parametrize("damage", ["deleted", "garbage", "other boot", "old schema"])
def test_the_catalog_is_rebuilt_when_unusable(tmp_path: Path, damage: str) -> None:
    store = _store(tmp_path / "s")
    _fill(store)
    assert store.list_ids() == ["new", "mid", "old"]
    catalog = tmp_path / "s" / ondisk.CATALOG_NAME
    store.close()
    if damage == "deleted":
        for f in tmp_path.glob("s/catalog.sqlite*"):
            f.unlink()
    elif damage == "garbage":
        for f in tmp_path.glob("s/catalog.sqlite-*"):
            f.unlink()
        catalog.write_bytes(b"this is not a database" * 100)
    else:
        key, value = ("boot", "an earlier boot") if damage == "other boot" else ("schema", "0")
        with sqlite3.connect(catalog) as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
            conn.execute("DELETE FROM sessions WHERE session_id = 'mid'")  # stale content
    again = _store(tmp_path / "s")
    assert again.list_ids() == ["new", "mid", "old"]
    assert [r.session_id for r in again.sessions(agent_id="A")] == ["mid", "old"]
    assert again.verify().ok


def test_verify_finds_a_wrong_catalog_and_rebuilds_it(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _fill(store)
    store.list_ids()
    with sqlite3.connect(tmp_path / "s" / ondisk.CATALOG_NAME) as conn:
        conn.execute("UPDATE sessions SET generation = 99 WHERE session_id = 'old'")
        conn.execute("DELETE FROM sessions WHERE session_id = 'mid'")
    report = store.verify()
    assert [p.kind for p in report.problems] == ["catalog"]
    assert "'mid'" in report.problems[0].detail and "'old'" in report.problems[0].detail
    assert store.verify().ok  # rebuilt
    assert store.list_ids() == ["new", "mid", "old"]


def test_reindex_lists_damaged_sessions_last(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _fill(store)
    (tmp_path / "s" / "sessions" / "mid" / "manifest.json").write_bytes(b"garbage")
    assert store.reindex() == 2
    assert store.list_ids() == ["new", "old", "mid"]
    assert [sid for sid, _cause in store.damaged_sessions()] == ["mid"]


def _listing_checker(root: str, stop_at: float, out: Any) -> None:
    """Lists continuously; returns (monotonic start, end, {sid: loops}) per listing."""
    store = FileSystemSessionStore(root, durable=False)
    seen = []
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        rows = {r.session_id: r.loop_count for r in store.sessions()}
        seen.append((t0, time.monotonic(), rows))
    out.put(seen)


def test_listings_are_exact_while_processes_create_append_and_delete(tmp_path: Path) -> None:
    """Every listing is a state that existed: it holds every commit acknowledged before it
    began and nothing acknowledged as deleted before it began."""
    store = _store(tmp_path / "s")
    root = str(store.root)
    store.list_ids()
    deadline = time.monotonic() + 4.0
    q = CTX.Queue()
    lister = CTX.Process(target=_listing_checker, args=(root, deadline, q))
    writers = [
        CTX.Process(target=workers.churn_worker, args=(root, f"w{i}", deadline, tmp_path / f"w{i}"))
        for i in range(3)
    ]
    for p in [lister, *writers]:
        p.start()
    listings = q.get(timeout=120)
    for p in [lister, *writers]:
        p.join(120)
        assert p.exitcode == 0
    acks = [op for i in range(3) for op in workers.read_acks(tmp_path / f"w{i}")]
    assert len(listings) > 5
    checked = 0
    for start, end, rows in listings:
        # The state every session had when the listing began, from acknowledged calls;
        # sessions with a call in flight during the listing may show either state.
        state: dict[str, int] = {}
        busy: set[str] = set()
        for begin, ack, op, sid, loops in sorted(acks, key=lambda a: a[1]):
            if ack < start:
                if op == "delete":
                    state.pop(sid, None)
                else:
                    state[sid] = loops
            elif begin <= end:
                busy.add(sid)
        for sid in {a[3] for a in acks} - busy:
            if sid in state:
                assert rows.get(sid) == state[sid], (
                    f"{sid}: listed {rows.get(sid)}, was {state[sid]}"
                )
            else:
                assert sid not in rows, f"{sid} listed after its acknowledged delete"
            checked += 1
    assert checked > 0
    assert store.verify().ok
