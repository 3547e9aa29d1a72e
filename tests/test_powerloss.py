"""Power-loss replay (stress/powerloss.py), short mode: every crash state a POSIX-ish model
allows after each traced store call must hold every acknowledged write.

* unit tests of the model on hand-written strace traces (no strace needed);
* each scenario of `stress.powerloss_writers.catalog` traced and checked with a fixed seed;
* the kill-restart-power-loss sequences of issue 10 (format v1 fails them: that is the bug);
* mutation proofs: the store run with one fsync switched off (LOOPSTORE_SKIP_FSYNC) must be
  caught by at least one scenario (takes effect once the store consults loopstore.faults);
* a negative control that works on any format: a store opened with durable=False is caught.

strace is required: without it these tests fail with a message saying so (CI installs it).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `stress` lives at the repo root, beside src/
    sys.path.insert(0, str(REPO))

from stress.powerloss import (  # noqa: E402
    Budget,
    CrashEnumerator,
    ExpectationTracker,
    Marker,
    Options,
    ScenarioReport,
    SessionState,
    StraceMissing,
    Trace,
    TraceModel,
    count_syncs,
    parse_strace,
    read_trace,
    run_scenario,
    run_traced,
    strace_binary,
)
from stress.powerloss_writers import BUG_SCENARIOS, SHORT, catalog  # noqa: E402

SEED = 0
MUTATION_BUDGET = Budget(max_points=4, max_states_per_point=2)
"""Mutation tests stop at the first violation; this bounds them when there is none."""
MUTATIONS = {
    # sync point -> scenarios that exercise it, the likeliest catcher first (format v2
    # fsyncs loops/ and a session directory only when a journal fold writes a checkpoint)
    "journal": ("appends", "interleaved"),
    "session-dir": ("appends-checkpoint", "save", "update"),
    "loops-dir": ("appends-checkpoint", "save"),
    "blob": ("appends-checkpoint", "save"),
    "manifest": ("appends-checkpoint", "save"),
    # a new session: its staging directory, sessions/ once it is renamed in, and the
    # store's root as the first writer creates the store
    "staging": ("first-append", "save"),
    "sessions-dir": ("first-append", "save"),
    "store-dir": ("first-append", "save"),
}
CLEAN_SCENARIOS = [name for name in catalog(SHORT) if name not in BUG_SCENARIOS]


@pytest.fixture(scope="module")
def strace() -> str:
    try:
        return strace_binary()
    except StraceMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def _run(name: str, tmp_path: Path, **options: object) -> ScenarioReport:
    scenario = catalog(SHORT)[name]
    opts = dataclasses.replace(Options(seed=SEED), **options)  # type: ignore[arg-type]
    return run_scenario(scenario, tmp_path / name, opts)


# --------------------------------------------------------------------------- hand-written traces


def _hex(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return '"' + "".join(f"\\x{b:02x}" for b in data) + '"'


def _model(root: Path, lines: list[str], rule: str = "either") -> Trace:
    """Feed strace lines (``PID`` prefix added) to a model of `root`."""
    model = TraceModel(root, rename_rule=rule)  # type: ignore[arg-type]
    model.feed(parse_strace(f"100 {line}\n" for line in lines), "T", cwd=str(root.parent))
    return model.finish()


def _trees(trace: Trace, point: int | None = None) -> list[dict[str, bytes | None]]:
    enum = CrashEnumerator(trace)
    at = len(trace.events) if point is None else point
    return [dict(enum.build(s).tree) for s in enum.states(at, Budget.long(), random.Random(SEED))]


def _write_tmp_then_rename(root: Path, *, dir_fsync: bool) -> list[str]:
    lines = [
        f"openat(AT_FDCWD, {_hex(str(root / 'a.tmp'))}, O_WRONLY|O_CREAT|O_EXCL, 0666) = 3",
        f"write(3, {_hex('hello')}, 5) = 5",
        "fsync(3) = 0",
        "close(3) = 0",
        f"openat(AT_FDCWD, {_hex(str(root))}, O_RDONLY|O_DIRECTORY|O_CLOEXEC) = 4",
        f"renameat(4, {_hex('a.tmp')}, 4, {_hex('a')}) = 0",
    ]
    if dir_fsync:
        lines.append("fsync(4)                          = 0")
    return lines


def test_rename_without_directory_fsync_is_lost_in_some_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    trees = _trees(_model(root, _write_tmp_then_rename(root, dir_fsync=False)))
    assert any("a" not in t for t in trees), "a rename never fsynced must be losable"
    assert any(t.get("a") == b"hello" for t in trees)
    # Atomic: never both names, never a torn file under the new name.
    assert all(not ("a" in t and "a.tmp" in t) for t in trees)
    assert all(t.get("a") in (None, b"hello") for t in trees)


def test_rename_with_directory_fsync_survives_every_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    trees = _trees(_model(root, _write_tmp_then_rename(root, dir_fsync=True)))
    assert trees and all(t.get("a") == b"hello" and "a.tmp" not in t for t in trees)


def test_rename_rules_differ_on_a_source_only_fsync(tmp_path: Path) -> None:
    """Renamed out of src/ into dst/, only src/ fsynced: durable under 'either' only."""
    root = tmp_path / "root"
    (root / "src").mkdir(parents=True)
    (root / "dst").mkdir()
    (root / "src" / "f").write_bytes(b"x")
    lines = [
        f"openat(AT_FDCWD, {_hex(str(root / 'src'))}, O_RDONLY|O_DIRECTORY) = 3",
        f"openat(AT_FDCWD, {_hex(str(root / 'dst'))}, O_RDONLY|O_DIRECTORY) = 4",
        f"renameat2(3, {_hex('f')}, 4, {_hex('g')}, RENAME_NOREPLACE) = 0",
        "fsync(3) = 0",
    ]
    either = _trees(_model(root, lines, "either"))
    assert all("dst/g" in t and "src/f" not in t for t in either)
    for rule in ("both", "destination"):
        trees = _trees(_model(root, lines, rule))
        assert any("src/f" in t and "dst/g" not in t for t in trees), rule
        assert all(("src/f" in t) != ("dst/g" in t) for t in trees), f"{rule}: not atomic"


def test_fsynced_data_survives_and_unsynced_data_may_tear(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"old")
    path = _hex(str(root / "f"))
    synced = [
        f"openat(AT_FDCWD, {path}, O_WRONLY|O_TRUNC|O_CLOEXEC) = 3",
        f"write(3, {_hex('new data')}, 8) = 8",
        "fdatasync(3) = 0",
    ]
    assert all(t["f"] == b"new data" for t in _trees(_model(root, synced)))
    contents = {t["f"] for t in _trees(_model(root, synced[:2]))}
    # O_TRUNC is pending too: old, truncated, written, torn in half, zeros.
    assert contents == {b"old", b"", b"new data", b"new ", b"\0" * 8}


def test_descriptors_offsets_and_directory_fds(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    lines = [
        f"openat(AT_FDCWD, {_hex(str(root))}, O_RDONLY|O_DIRECTORY) = 3",
        f"mkdirat(3, {_hex('d')}, 0777) = 0",
        f"openat(3, {_hex('d')}, O_RDONLY|O_DIRECTORY) = 4",
        f"openat(4, {_hex('x')}, O_RDWR|O_CREAT|O_CLOEXEC, 0666) = 5",
        f"write(5, {_hex('ab')}, 2) = 2",
        "dup(5) = 6",
        f"write(6, {_hex('cd')}, 2) = 2",
        "lseek(5, 1, SEEK_SET) = 1",
        "read(0x6, 0x7ffc00000000, 0x1) = 0x1",
        f"write(5, {_hex('Z')}, 1) = 1",
        f"pwrite64(5, {_hex('!')}, 1, 0) = 1",
        f"writev(5, [{{iov_base={_hex('e')}, iov_len=1}}, "
        f"{{iov_base={_hex('f')}, iov_len=1}}], 2) = 2",
        "fcntl(5, F_DUPFD_CLOEXEC, 10) = 10",
        "close(5) = 0",
        "close(6) = 0",
        "ftruncate(10, 6) = 0",
        f"openat(4, {_hex('y')}, O_WRONLY|O_CREAT|O_APPEND, 0666) = 7",
        f"write(7, {_hex('1')}, 1) = 1",
        "lseek(7, 0, SEEK_SET) = 0",
        f"write(7, {_hex('2')}, 1) = 1",
        f"linkat(4, {_hex('y')}, 3, {_hex('y2')}, 0) = 0",
        f"unlinkat(4, {_hex('y')}, 0) = 0",
        f"mkdirat(3, {_hex('e')}, 0777) = 0",
        f"unlinkat(3, {_hex('e')}, AT_REMOVEDIR) = 0",
        f"openat(AT_FDCWD, {_hex('/elsewhere/z')}, O_WRONLY|O_CREAT, 0666) = 8",
        f"write(8, {_hex('ignored')}, 7) = 7",
        f"openat(4, {_hex('missing')}, O_RDONLY) = -1 ENOENT (No such file or directory)",
        "fsync(10) = 0",
        "fsync(4) = 0",
        "fsync(3) = 0",
        "sync() = 0",
    ]
    trace = _model(root, lines)
    final = _trees(trace)
    # 'ab' 'cd' -> offset 4; lseek 1 + read 1 -> 2: 'abZd'; pwrite at 0: '!bZd';
    # writev at 3 (offset after Z): '!bZef'; ftruncate 6 -> '!bZef\0'.
    assert all(t["d/x"] == b"!bZef\0" for t in final)
    assert all(t["y2"] == b"12" and "d/y" not in t and "e" not in t for t in final)
    assert not any("elsewhere" in p for t in final for p in t)


def test_unfinished_and_resumed_halves_are_joined_and_a_killed_call_never_ran(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    text = [
        f"100 openat(AT_FDCWD, {_hex(str(root / 'f'))}, O_WRONLY|O_CREAT, 0666) = 3\n",
        f"100 write(3, {_hex('abc')}, 3 <unfinished ...>\n",
        "101 +++ exited with 0 +++\n",
        "100 <... write resumed>)                = 3\n",
        "100 fsync(3)                          = ?\n",
        "100 +++ killed by SIGKILL +++\n",
    ]
    model = TraceModel(root)
    info = model.feed(parse_strace(text), "A", cwd=str(tmp_path))
    trace = model.finish()
    assert info.killed
    assert info.sync_calls == {"fsync": 1}  # counted for strace's when=, but it never ran
    assert {t.get("f") for t in _trees(trace)} >= {None, b"", b"abc"}


def test_acknowledgements_follow_markers_and_a_killed_call_stays_in_flight() -> None:
    def st(n: int) -> SessionState:
        return SessionState(f"d{n}", n, (), "h")

    def m(i: int, kind: str, run: str, **p: object) -> Marker:
        return Marker(i, kind, {"w": run, **p}, run, 1)

    tracker = ExpectationTracker({"s": st(1)})
    tracker.feed(m(0, "BEGIN", "A", n=1, sid="s", after=st(2).to_json()))
    assert tracker.expectation().allowed_for("s") == (st(1), st(2))
    # A is killed; B starts from what it saw and acknowledges on top of it.
    tracker.feed(m(1, "BEGIN", "B", n=1, sid="s", after=st(3).to_json()))
    assert tracker.expectation().allowed_for("s") == (st(1), st(2), st(3))
    tracker.feed(m(2, "ACK", "B", n=1))
    assert tracker.expectation().allowed_for("s") == (st(3),)
    assert tracker.expectation().acked == 1
    assert tracker.expectation().allowed_for("other") == (None,)


def test_sync_counting_starts_at_the_first_begin() -> None:
    text = [
        "7 fsync(3) = 0\n",
        f"7 write(1, {_hex('BEGIN {}' + chr(10))}, 9) = 9\n",
        "7 fdatasync(4) = 0\n",
        "8 fsync(5) = -1 EIO (Input/output error)\n",
        f"7 write(1, {_hex('ACK {}' + chr(10))}, 7) = 7\n",
        f"8 write(1, {_hex('ACK {}' + chr(10))}, 7) = 7\n",
    ]
    count = count_syncs(parse_strace(text))
    assert count.by_name == {"fdatasync": 1, "fsync": 1}
    assert (count.acks, count.begins, count.writers, count.per_ack) == (2, 1, 1, 1.0)


# --------------------------------------------------------------------------- real traces


def test_model_matches_the_disk_after_a_real_traced_program(strace: str, tmp_path: Path) -> None:
    """The parser and model against real strace output of a small program."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "old").write_bytes(b"0123456789")
    program = (
        "import os, sys\n"
        "r = sys.argv[1]\n"
        "d = os.open(r, os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.mkdir('sub', dir_fd=d)\n"
        "fd = os.open('sub/f', os.O_RDWR | os.O_CREAT, dir_fd=d)\n"
        "os.write(fd, b'x' * 100000)\n"
        "os.lseek(fd, 10, 0); os.read(fd, 5); os.write(fd, b'Y')\n"
        "os.fsync(fd); os.close(fd)\n"
        "with open(os.path.join(r, 'old'), 'r+b') as f:\n"
        "    f.seek(3); f.write(b'abc')\n"
        "os.replace('sub/f', 'g', src_dir_fd=d, dst_dir_fd=d)\n"
        "os.fsync(d)\n"
        'os.write(1, b\'ACK {"w": "T", "n": 1}\\n\')\n'
    )
    model = TraceModel(root)
    run = run_traced(
        [sys.executable, "-c", program, str(root)], trace_path=tmp_path / "t.strace", label="T"
    )
    assert run.returncode == 0, run.stderr
    model.feed(read_trace(run.trace_path), "T")
    assert model.compare_with_disk() == []
    trace = model.finish()
    assert [e.kind for e in trace.markers()] == ["ACK"]
    trees = _trees(trace)
    assert all(t["g"] == b"x" * 15 + b"Y" + b"x" * 99984 for t in trees)
    assert {t["old"] for t in trees} >= {b"0123456789", b"012abc6789"}


def test_strace_missing_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    import stress.powerloss as pl

    monkeypatch.setattr(pl.shutil, "which", lambda name: None)
    monkeypatch.setattr(pl.os, "access", lambda path, mode: False)
    with pytest.raises(StraceMissing, match="install it"):
        pl.strace_binary()


# --------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize("name", CLEAN_SCENARIOS)
def test_scenario_survives_every_crash_state(strace: str, tmp_path: Path, name: str) -> None:
    report = _run(name, tmp_path)
    print(report.summary())
    if not report.ok:
        pytest.fail(report.render(), pytrace=False)
    assert report.checks > 0
    assert report.acks > 0


@pytest.mark.parametrize("name", BUG_SCENARIOS)
def test_issue10_kill_restart_power_loss(strace: str, tmp_path: Path, name: str) -> None:
    """Issue 10: a restarted writer acknowledges on top of a killed writer's state that was
    never made durable. Format v1 fails both (the bug report); the fix must pass them."""
    report = _run(name, tmp_path)
    print(report.summary())
    assert report.details.get("kills"), "the first writer was not killed"
    if not report.ok:
        pytest.fail(report.render(), pytrace=False)


def test_a_store_without_fsync_is_caught(strace: str, tmp_path: Path) -> None:
    """Negative control on any format: writers opened with durable=False lose acks."""
    scenario = catalog(dataclasses.replace(SHORT, durable=False))["appends"]
    opts = Options(seed=SEED, budget=MUTATION_BUDGET, stop_at_first_violation=True)
    report = run_scenario(scenario, tmp_path / "nodurable", opts)
    assert not report.errors, report.render()
    assert report.violations, "durable=False lost nothing acknowledged?\n" + report.render()


@pytest.mark.parametrize("point", sorted(MUTATIONS))
def test_a_skipped_fsync_is_caught(strace: str, tmp_path: Path, point: str) -> None:
    """With one sync point of loopstore.faults switched off in the writers, at least one
    scenario reports a violation. (Takes effect once the store consults faults.py.)"""
    tried: list[str] = []
    for name in MUTATIONS[point]:
        report = _run(
            name,
            tmp_path / point,
            env={"LOOPSTORE_SKIP_FSYNC": point},
            budget=MUTATION_BUDGET,
            stop_at_first_violation=True,
        )
        if report.errors:
            pytest.fail(report.render(), pytrace=False)
        if report.violations:
            print(f"LOOPSTORE_SKIP_FSYNC={point} caught by {name}:\n{report.render(1)}")
            return
        tried.append(
            f"{report.summary()} (renames into session dirs: "
            f"{report.details.get('renames_into_session_dirs')})"
        )
    pytest.fail(
        f"LOOPSTORE_SKIP_FSYNC={point}: no scenario lost anything:\n  " + "\n  ".join(tried),
        pytrace=False,
    )
