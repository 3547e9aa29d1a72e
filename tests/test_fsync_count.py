"""How many durability syscalls an acknowledged append costs, counted with strace.

fsync, fdatasync, syncfs, sync_file_range and sync are counted from the first BEGIN marker
a writer prints to the end of the trace (checkpoint work and closing included), against
the ACK markers: the number of append_loop calls that returned.

* one writer, M = 300 appends to one existing session: at most 2 per append, amortized;
* 4 processes appending to one shared session at once: fewer than 1 per append (one fsync
  round serves several appends: group commit).

Format v1 pays 4 fsyncs per append (blob, loops/, manifest, session directory), so both
fail on it; format v2 (one journal fdatasync per commit round) is to pass them.
strace is required: without it these tests fail with a message saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `stress` lives at the repo root, beside src/
    sys.path.insert(0, str(REPO))

from stress.powerloss import StraceMissing, strace_binary, trace_counts, writer_env  # noqa: E402
from stress.powerloss_writers import open_store, setup_sessions  # noqa: E402

SINGLE_APPENDS = 300
MAX_SYNCS_PER_APPEND = 2.0
PROCS = 4
APPENDS_PER_PROC = 50
MAX_SHARED_SYNCS_PER_APPEND = 1.0


@pytest.fixture(scope="module")
def strace() -> str:
    try:
        return strace_binary()
    except StraceMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def _writers(program: str, root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stress.powerloss_writers", program, str(root), *args]


def _loops_in(root: Path) -> int:
    store = open_store(root)
    try:
        return len(store.load("s").loops)
    finally:
        store.close()


def test_single_writer_pays_at_most_two_syncs_per_append(strace: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    setup_sessions(("s", 1))(root)
    argv = _writers("count-appends", root, "--count", str(SINGLE_APPENDS), "--offset", "1")
    count, run = trace_counts(argv, tmp_path, env=writer_env())
    assert run.returncode == 0, run.stderr
    assert count.acks == SINGLE_APPENDS, count.summary()
    assert _loops_in(root) == 1 + SINGLE_APPENDS
    print(f"single writer: {count.summary()}")
    assert count.per_ack <= MAX_SYNCS_PER_APPEND, (
        f"single writer: {count.summary()}; want at most {MAX_SYNCS_PER_APPEND} per append"
    )


def test_concurrent_appends_share_their_syncs(strace: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    setup_sessions(("s", 1))(root)
    argv = _writers(
        "count-concurrent", root, "--procs", str(PROCS), "--count", str(APPENDS_PER_PROC)
    )
    count, run = trace_counts(argv, tmp_path, env=writer_env())
    assert run.returncode == 0, run.stderr
    assert count.acks == PROCS * APPENDS_PER_PROC, count.summary()
    assert _loops_in(root) == 1 + PROCS * APPENDS_PER_PROC
    print(f"{PROCS} processes, one session: {count.summary()}")
    assert count.per_ack < MAX_SHARED_SYNCS_PER_APPEND, (
        f"{PROCS} processes on one session: {count.summary()}; want fewer than "
        f"{MAX_SHARED_SYNCS_PER_APPEND} per append (one fsync round serving several appends)"
    )
