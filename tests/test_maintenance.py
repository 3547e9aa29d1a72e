"""Store-wide maintenance: format v1 stores read, upgraded per session or all at once
(migrate), and every store-wide operation carrying on past a session it cannot read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import FIXTURES_DIR, StoreFactory, fixture_paths, load_fixture, make_loop, manifest_key
from loopstore import faults, legacy
from loopstore.errors import CorruptSession
from loopstore.store import FileSystemSessionStore

V1_STORE = FIXTURES_DIR.parent / "v1-store"
"""A store written by loopstore 0.1 (format v1): the 3 phi-core fixtures and a session
with appends and a loop replaced in place (so one orphan blob)."""


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    root = tmp_path / "v1"
    shutil.copytree(V1_STORE, root)
    return root


def _manifest_version(root: Path, sid: str) -> int:
    version = json.loads((root / "sessions" / sid / "manifest.json").read_bytes())["version"]
    assert isinstance(version, int)
    return version


def test_a_v1_store_reads_unchanged(v1_root: Path) -> None:
    store = FileSystemSessionStore(v1_root, durable=False)
    marker = json.loads((v1_root / "loopstore.json").read_text())
    # Opening upgrades the marker: a v1-only loopstore now refuses the store (it checks
    # the marker's version) instead of misreading sessions that have a journal.
    assert marker["version"] == 2
    for path in fixture_paths():
        sid = path.stem
        assert store.load_json(sid) == path.read_bytes()
        assert store.load(sid).model_dump_json() == load_fixture(path).model_dump_json()
        assert _manifest_version(v1_root, sid) == 1  # reading rewrote nothing
    s = store.load("v1-appended")
    assert [lp.loop_id for lp in s.loops] == [f"v1-appended.test.{i}" for i in range(1, 6)]
    assert s.loops[1].status == "Failed"
    report = store.verify()
    assert report.ok
    assert [o.kind for o in report.orphans] == ["orphan_blob"]
    assert store.list_ids()[0] == "0b6f1d3e-0006-4a7c-9e21-5c3a7f9b1d06"


def test_a_v1_session_is_upgraded_on_its_first_write(v1_root: Path) -> None:
    store = FileSystemSessionStore(v1_root, durable=True)
    before = store.load("v1-appended")
    store.append_loop("v1-appended", make_loop("v1-appended", 5))
    assert _manifest_version(v1_root, "v1-appended") == 2
    after = store.load("v1-appended")
    assert [lp.loop_id for lp in after.loops[:-1]] == [lp.loop_id for lp in before.loops]
    assert after.loops[-1].loop_id == "v1-appended.test.6"
    # The other sessions stay v1 until written.
    assert _manifest_version(v1_root, "0b6f1d3e-0002-4a7c-9e21-5c3a7f9b1d02") == 1
    assert store.verify().ok
    fresh = FileSystemSessionStore(v1_root, durable=False)
    assert fresh.load("v1-appended").model_dump_json() == after.model_dump_json()


def test_migrate_upgrades_every_session_and_reports_a_broken_one(v1_root: Path) -> None:
    broken = v1_root / "sessions" / "0b6f1d3e-0005-4a7c-9e21-5c3a7f9b1d05" / "manifest.json"
    broken.write_bytes(broken.read_bytes()[:-20])
    store = FileSystemSessionStore(v1_root, durable=False)
    seen: list[tuple[int, int]] = []
    report = store.migrate(progress=lambda d, t: seen.append((d, t)))
    assert (report.sessions, report.upgraded, report.current) == (4, 3, 0)
    assert [p.session_id for p in report.problems] == ["0b6f1d3e-0005-4a7c-9e21-5c3a7f9b1d05"]
    assert not report.ok
    assert seen[-1] == (4, 4)
    for sid in ("0b6f1d3e-0002-4a7c-9e21-5c3a7f9b1d02", "v1-appended"):
        assert _manifest_version(v1_root, sid) == 2
    again = store.migrate()
    assert (again.upgraded, again.current) == (0, 3)
    path = FIXTURES_DIR / "0b6f1d3e-0002-4a7c-9e21-5c3a7f9b1d02.json"
    assert store.load_json(path.stem) == path.read_bytes()


def test_store_wide_operations_carry_on_past_an_unreadable_session(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store = make_store(durable=False)
    for path in fixture_paths():
        store.save(load_fixture(path))
        store.checkpoint(path.stem)
    victim = "0b6f1d3e-0005-4a7c-9e21-5c3a7f9b1d05"
    if make_store.is_s3:
        # An object store has no symlinks or permissions: its victim's checkpoint is garbage.
        make_store.raw().write(manifest_key(victim), b'{"format": "loopstore.manifest", "gar')
        cause = "manifest"
    else:
        loops = Path(make_store.location()) / "sessions" / victim / "loops"
        outside = tmp_path / "outside"
        shutil.move(loops, outside)
        loops.symlink_to(outside, target_is_directory=True)
        cause = "symlink"
    others = sorted(p.stem for p in fixture_paths() if p.stem != victim)

    report = store.verify()
    assert [p.session_id for p in report.problems] == [victim]
    assert cause in report.problems[0].detail
    assert report.sessions_checked == 3

    stats = store.stats()
    assert stats.damaged == 1 and stats.sessions == 2
    assert [p.session_id for p in stats.problems] == [victim]

    gc = store.gc(grace=0)
    assert [p.session_id for p in gc.problems] == [victim]
    assert gc.sessions_scanned == 3

    out = tmp_path / "export"
    exported = []
    for sid in sorted(p.stem for p in fixture_paths()):
        try:
            exported.append(store.export_legacy(sid, out).stem)
        except CorruptSession:
            pass
        except Exception as exc:
            assert "symlink" in str(exc)
    assert exported == others
    assert sorted(legacy.list_session_ids(out)) == others

    backup = store.backup(tmp_path / "backup")
    assert [f.session_id for f in backup.failed] == [victim]
    assert backup.sessions == 2
    assert sorted(FileSystemSessionStore(tmp_path / "backup").list_ids()) == others


_MEASURE = """
import resource, sys
from pathlib import Path
from loopstore import FileSystemSessionStore
store = FileSystemSessionStore(sys.argv[1], durable=False)
out = Path(sys.argv[2])
peaks = []
def peak():
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
store.list_ids(); peak()
assert store.stats().sessions > 0; peak()
assert store.verify().ok; peak()
store.gc(grace=0, dry_run=True); peak()
assert store.backup(out / "backup").ok; peak()
for sid in store.list_ids():
    store.export_legacy(sid, out / "export")
peak()
store.reindex(); peak()
print(" ".join(map(str, peaks)))
"""
_OPS = ("list", "stats", "verify", "gc", "backup", "export", "reindex")


def _peaks_kib(root: Path, out: Path) -> list[int]:
    import subprocess
    import sys

    out.mkdir()
    # Durability is not what this measures: the backup's and export's fsyncs are skipped.
    env = {**os.environ, faults.SKIP_FSYNC_ENV: "all"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(root), str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env=env,
    )
    return [int(x) for x in done.stdout.split()]


# Filesystem only: the subprocess measures a directory store (and its catalog) at 300 and
# 1,500 sessions; writing and reading 1,800 sessions on the test S3 server takes minutes.
def test_store_wide_work_runs_in_memory_that_does_not_grow_with_the_store(
    tmp_path: Path,
) -> None:
    """stats, verify, gc, backup, export and reindex hold one session at a time: run one
    after another over 1,500 sessions, the process's peak memory after each is within
    a few MiB of the same over 300 (a leak of 2.5 KiB per session would add 3,000)."""
    from helpers import make_session

    peaks = {}
    for n in (300, 1500):
        store = FileSystemSessionStore(tmp_path / f"s{n}", durable=False)
        for i in range(n):
            store.save(make_session(f"m{i:05d}", 1))
        store.close()
        peaks[n] = _peaks_kib(tmp_path / f"s{n}", tmp_path / f"out{n}")
    for op, small, big in zip(_OPS, peaks[300], peaks[1500], strict=True):
        assert big - small < 3_000, f"after {op}: peak RSS {small} KiB at 300, {big} KiB at 1500"


def test_verify_in_worker_processes_reports_what_one_process_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify(processes=2) (what the command line runs) checks chunks of sessions in
    spawned processes; the report is the one a single process makes, in the same order."""
    from helpers import make_session
    from loopstore import maintenance

    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    for i in range(12):
        store.save(make_session(f"s{i:02d}", 2))
    store.checkpoint("s03")
    store.checkpoint("s07")
    damaged = store.layout.blob("s03", store.session_state("s03").entries[0].blob)
    damaged.write_bytes(b"rot")
    (store.layout.loops_dir("s07") / ("0" * 32 + ".zst")).write_bytes(b"stray")
    monkeypatch.setattr(maintenance, "VERIFY_PARALLEL_MIN_SESSIONS", 4)
    monkeypatch.setattr(maintenance, "VERIFY_CHUNK", 5)
    progress: list[tuple[int, int]] = []
    one = store.verify()

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("a session was checked in the calling process")

    monkeypatch.setattr(maintenance, "_verify_session", not_here)  # the workers import theirs
    two = store.verify(processes=2, progress=lambda done, total: progress.append((done, total)))
    assert not one.ok and [p.session_id for p in one.problems] == ["s03"]
    assert two.problems == one.problems
    assert [(o.path, o.kind) for o in two.orphans] == [(o.path, o.kind) for o in one.orphans]
    assert (two.sessions_checked, two.blobs_checked) == (one.sessions_checked, 24)
    assert progress == [(5, 12), (10, 12), (12, 12)]
