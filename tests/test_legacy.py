"""phi-core's one-file-per-session API and import/export, byte-identical on real files."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import StoreFactory, fixture_paths, load_fixture, make_session
from loopstore import legacy
from loopstore.errors import CorruptSession, InvalidSessionId, SessionNotFound


def test_fixtures_round_trip_byte_identical_through_legacy_api(tmp_path: Path) -> None:
    paths = fixture_paths()
    assert len(paths) == 3
    for src in paths:
        session = legacy.load_session(src.stem, src.parent)
        out = legacy.save_session(session, tmp_path / "out")
        assert out == tmp_path / "out" / src.name
        assert out.read_bytes() == src.read_bytes()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp." in p.name]


def test_fixtures_byte_identical_through_the_store(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store = make_store(durable=False)
    seen: list[tuple[int, int]] = []
    report = store.import_legacy(
        fixture_paths()[0].parent, progress=lambda d, t: seen.append((d, t))
    )
    assert report.ok and len(report.imported) == 3 and seen[-1] == (3, 3)
    again = store.import_legacy(fixture_paths()[0].parent)
    assert again.ok and sorted(again.unchanged) == sorted(report.imported)
    for src in fixture_paths():
        out = store.export_legacy(src.stem, tmp_path / "export")
        assert out.read_bytes() == src.read_bytes()
        assert store.load(src.stem).model_dump() == load_fixture(src).model_dump()
    assert store.verify().ok


def test_import_reports_bad_files_and_goes_on(tmp_path: Path, make_store: StoreFactory) -> None:
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    for src in fixture_paths():
        shutil.copy(src, legacy_dir / src.name)
    (legacy_dir / "broken.json").write_text("{not json")
    (legacy_dir / "wrong-shape.json").write_text('{"session_id": "x"}')
    (legacy_dir / "ignored.json.lock").write_text("")
    (legacy_dir / "notes.txt").write_text("hello")
    store = make_store(durable=False)
    report = store.import_legacy(legacy_dir)
    assert not report.ok
    assert len(report.imported) == 3
    assert sorted(f.path.name for f in report.failed) == ["broken.json", "wrong-shape.json"]
    assert all(f.reason for f in report.failed)
    # An edited file is re-imported as an update (idempotent otherwise).
    s = legacy.load_session(fixture_paths()[0].stem, legacy_dir)
    s.agent_id = "edited"
    legacy.save_session(s, legacy_dir)
    report = store.import_legacy(legacy_dir)
    assert report.updated == [s.session_id] and len(report.unchanged) == 2
    assert store.load(s.session_id).agent_id == "edited"


def test_legacy_api_semantics(tmp_path: Path) -> None:
    d = tmp_path / "sessions"
    assert legacy.list_session_ids(d) == []
    a = make_session("a", 1, agent_id="A")
    b = make_session("b", 2, agent_id="B")
    c = make_session("c", 1, agent_id="A")
    for i, s in enumerate((a, b, c)):
        path = legacy.save_session(s, d)
        stamp = time.time() - 100 + i
        os.utime(path, (stamp, stamp))
    assert legacy.list_session_ids(d) == ["c", "b", "a"]  # newest mtime first
    assert [s.session_id for s in legacy.load_sessions_for_agent("A", d)] == ["c", "a"]
    assert legacy.load_session("b", d).model_dump() == b.model_dump()
    legacy.delete_session("b", d)
    with pytest.raises(SessionNotFound):
        legacy.load_session("b", d)
    with pytest.raises(SessionNotFound):
        legacy.delete_session("b", d)
    (d / "bad.json").write_text("[]")
    with pytest.raises(CorruptSession):
        legacy.load_session("bad", d)


@pytest.mark.parametrize("bad", ["../escape", "..", "a/b", "", "x" * 201, "n\x00"])
def test_legacy_ids_cannot_escape_dir(tmp_path: Path, bad: str) -> None:
    d = tmp_path / "inner"
    s = make_session("ok", 1).model_copy(update={"session_id": bad})
    with pytest.raises(InvalidSessionId):
        legacy.save_session(s, d)
    with pytest.raises(InvalidSessionId):
        legacy.load_session(bad, d)
    with pytest.raises(InvalidSessionId):
        legacy.delete_session(bad, d)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["inner"])
