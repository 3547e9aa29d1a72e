"""`run_demo` end to end with small sizes: real worker processes, one shared store."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rich.console import Console

from loopstore.demo import (
    DEMO_MARKER,
    MAX_LOOPS,
    MAX_SESSIONS,
    MAX_TOTAL_LOOPS,
    MAX_WORKERS,
    DemoUsageError,
    _plan,
    check_options,
    run_demo,
)

if TYPE_CHECKING:
    from s3server import SeaweedFSServer

SCRIPT = Path(sys.executable).with_name("loopstore")
WAIT_S = 120.0
"""Upper bound for waiting on a subprocess (a hang guard, never a timing assertion)."""


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_plan_shares_some_sessions_between_workers() -> None:
    per_worker, ids, total = _plan(3, 6, 4, seed=1)
    assert len(ids) == len(set(ids)) == 6 and total == 24
    owners: dict[str, set[int]] = {}
    for w, jobs in enumerate(per_worker):
        for job in jobs:
            owners.setdefault(job.session_id, set()).add(w)
            assert job.loop_tag == f"w{w}."
    assert any(len(ws) == 2 for ws in owners.values())
    assert sum(j.loops for jobs in per_worker for j in jobs) == total


def test_run_demo_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    root = tmp_path / "demo"
    result = run_demo(
        root, workers=2, sessions=3, loops=3, seed=4, loop_bytes=20_000, console=console
    )
    text = out.getvalue()
    assert result.verify_ok and result.problems == []
    assert result.loops_recorded == 9 and result.persist_errors == 0
    assert result.sessions >= 3 and result.loops >= 9
    assert 0 < result.stored_bytes < result.raw_bytes and result.ratio > 1
    assert "verify: OK" in text and "compression" in text and "session " in text

    from loopstore.store import FileSystemSessionStore

    store = FileSystemSessionStore(root)
    assert store.stats().loops == result.loops
    shared = store.load(result.tree_session_id or "")
    assert {lp.loop_id.split(".")[1] for lp in shared.loops} == {"w0", "w1"}

    # Running again adds to the store; --fresh starts over.
    again = run_demo(
        root, workers=2, sessions=3, loops=3, seed=5, loop_bytes=20_000, console=console
    )
    assert again.verify_ok and again.loops > result.loops
    fresh = run_demo(
        root, workers=2, sessions=3, loops=3, seed=4, loop_bytes=20_000, fresh=True, console=console
    )
    assert fresh.verify_ok and fresh.loops == result.loops


def test_run_demo_on_a_bucket(
    seaweedfs: SeaweedFSServer, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers open s3:// through the standard AWS configuration (the environment)."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{seaweedfs.bucket}/{s3_prefix}"
    out = io.StringIO()
    result = run_demo(
        url,
        workers=2,
        sessions=3,
        loops=2,
        seed=4,
        loop_bytes=20_000,
        console=Console(file=out, width=120),
    )
    assert result.verify_ok and result.owned and result.loops_recorded == 6
    assert "verify: OK" in out.getvalue() and f"created by the demo at {url}" in out.getvalue()
    from loopstore.locations import open_store

    with open_store(url) as store:
        assert store.stats().loops == result.loops
        shared = store.load(result.tree_session_id or "")
        assert {lp.loop_id.split(".")[1] for lp in shared.loops} == {"w0", "w1"}
    with pytest.raises(DemoUsageError, match="holds a store"):
        run_demo(url, workers=1, sessions=1, loops=1, console=quiet())
    with pytest.raises(DemoUsageError, match="directory store"):
        run_demo(url, workers=1, sessions=1, loops=1, fresh=True, console=quiet())
    more = run_demo(
        url,
        workers=1,
        sessions=1,
        loops=1,
        seed=9,
        loop_bytes=20_000,
        add_to_existing=True,
        console=quiet(),
    )
    assert more.verify_ok and not more.owned and more.loops > result.loops


def test_fresh_refuses_to_empty_what_the_demo_did_not_create(tmp_path: Path) -> None:
    from loopstore.store import FileSystemSessionStore
    from loopstore.synth import generate_session

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        run_demo(tmp_path, fresh=True, console=Console(file=io.StringIO()))
    assert (tmp_path / "precious.txt").exists()
    real = tmp_path / "real-store"
    FileSystemSessionStore(real, durable=False).save(generate_session(1, loops=1, loop_bytes=5_000))
    with pytest.raises(ValueError, match="refusing"):
        run_demo(real, fresh=True, console=Console(file=io.StringIO()))
    assert FileSystemSessionStore(real).stats().sessions == 1


def test_options_are_bounded_and_workers_fit_the_sessions() -> None:
    assert check_options(None, 16, 8) == 4
    assert check_options(None, 2, 8) == 2  # the default is lowered, never refused
    assert check_options(3, 3, 1) == 3
    too_much = [
        dict(workers=100_000, sessions=99999999999999999999, loops=8),
        dict(workers=MAX_WORKERS + 1, sessions=MAX_SESSIONS, loops=1),
        dict(workers=None, sessions=MAX_SESSIONS + 1, loops=1),
        dict(workers=None, sessions=1, loops=MAX_LOOPS + 1),
        dict(workers=None, sessions=MAX_SESSIONS, loops=MAX_TOTAL_LOOPS // MAX_SESSIONS + 1),
        dict(workers=3, sessions=2, loops=1),
        dict(workers=0, sessions=2, loops=1),
        dict(workers=None, sessions=2, loops=1, seed=-1),
        dict(workers=None, sessions=2, loops=1, loop_bytes=10**9),
    ]
    for options in too_much:
        with pytest.raises(DemoUsageError):
            check_options(**options)


def test_run_demo_refuses_before_touching_anything(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    with pytest.raises(DemoUsageError, match="must be between"):
        run_demo(root, workers=100_000, sessions=99999999999999999999, console=quiet())
    assert not root.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DemoUsageError, match="not a directory"):
        run_demo(a_file, sessions=1, loops=1, console=quiet())
    assert a_file.read_text() == "x"


def test_demo_never_writes_into_what_it_did_not_create(tmp_path: Path) -> None:
    from loopstore.store import FileSystemSessionStore
    from loopstore.synth import generate_session

    (tmp_path / "precious.txt").write_text("keep me")
    for add in (False, True):  # not a store: refused even when told to add
        with pytest.raises(DemoUsageError, match="not empty and not a loopstore store"):
            run_demo(tmp_path, sessions=1, loops=1, add_to_existing=add, console=quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]

    real = tmp_path / "real-store"
    FileSystemSessionStore(real, durable=False).save(generate_session(1, loops=1, loop_bytes=5_000))
    with pytest.raises(DemoUsageError, match="--add-to-existing"):
        run_demo(real, sessions=1, loops=1, console=quiet())
    assert FileSystemSessionStore(real).stats().sessions == 1
    with pytest.raises(DemoUsageError, match="refusing to empty"):
        run_demo(real, sessions=1, loops=1, fresh=True, add_to_existing=True, console=quiet())
    assert FileSystemSessionStore(real).stats().sessions == 1

    out = io.StringIO()
    result = run_demo(
        real,
        workers=1,
        sessions=1,
        loops=1,
        loop_bytes=5_000,
        add_to_existing=True,
        console=Console(file=out, width=200),
    )
    assert result.verify_ok and not result.owned
    assert FileSystemSessionStore(real).stats().sessions > 1
    assert not (real / DEMO_MARKER).exists()  # adding did not make it the demo's
    assert "rm -rf" not in out.getvalue() and "--fresh" not in out.getvalue()


def test_a_store_the_demo_created_is_marked_and_only_fresh_is_suggested(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    out = io.StringIO()
    result = run_demo(
        root, workers=1, sessions=1, loops=1, loop_bytes=5_000, console=Console(file=out, width=200)
    )
    assert result.verify_ok and result.owned and (root / DEMO_MARKER).is_file()
    text = out.getvalue()
    assert "rm -rf" not in text and "demo --fresh" in text
    # an empty existing directory is the demo's too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_demo(empty, workers=1, sessions=1, loops=1, loop_bytes=5_000, console=quiet()).owned


def _live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (Linux /proc; [] elsewhere)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.parent.name))
    return members


def test_ctrl_c_stops_the_workers_quietly_and_exits_130(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it."""
    root = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    proc = subprocess.Popen(
        [SCRIPT, "--root", str(root), "demo", "--workers", "3", "--sessions", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        sessions = root / "sessions"
        deadline = time.monotonic() + WAIT_S
        while not (sessions.is_dir() and any(sessions.iterdir())):  # workers are writing
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the demo never started recording"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("loopstore: demo interrupted"), err
    assert "Traceback" not in out + err
    # no worker outlives the command
    deadline = time.monotonic() + WAIT_S
    while _live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_group_members(proc.pid) == []
    # what was stored is whole
    from loopstore.store import FileSystemSessionStore

    store = FileSystemSessionStore(root)
    assert store.verify().ok and store.stats().sessions >= 1
