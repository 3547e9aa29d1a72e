"""The `loopstore` command line, driven in-process (`main(argv)`) and as a real subprocess.

Tests taking `any_root` (or `make_store`) run on both backends: ``--root`` is a
directory, or an s3:// URL on the test SeaweedFS (AWS_* in the environment, as a user
would configure the command line)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import loopstore
from helpers import (
    FIXTURES_DIR,
    FsRaw,
    RawStore,
    S3Raw,
    StoreFactory,
    blob_key,
    fixture_paths,
    make_loop,
    make_session,
    manifest_key,
)
from loopstore import atomic, cli, ondisk
from loopstore.errors import (
    CorruptSession,
    InvalidSessionId,
    SessionError,
    SessionLocked,
    SessionNotFound,
    StorageError,
)
from loopstore.models import ContinuationKind, ParallelGroupRecord, Session, Usage
from loopstore.ondisk import Layout
from loopstore.store import FileSystemSessionStore, SessionStore

PARENT = "0b6f1d3e-0005-4a7c-9e21-5c3a7f9b1d05"
CHILD = "0b6f1d3e-0006-4a7c-9e21-5c3a7f9b1d06"
THINKING = "0b6f1d3e-0002-4a7c-9e21-5c3a7f9b1d02"
TREE = "tree-session"
SCRIPT = Path(sys.executable).with_name("loopstore")
ANSI_ESCAPE = "\x1b["


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def tree_session() -> Session:
    """Continuation, rerun, branch and a three-way parallel group (winner: #6)."""
    loops = [make_loop(TREE, 0)]

    def add(index: int, parent: int, kind: ContinuationKind) -> None:
        parent_loop = loops[parent - 1]
        loop = make_loop(TREE, index, parent_loop_id=parent_loop.loop_id)
        loop.continuation_kind = kind
        parent_loop.children_loop_ids.append(loop.loop_id)
        loops.append(loop)

    add(1, 1, ContinuationKind.default())  # 2 continues 1
    add(2, 2, ContinuationKind.rerun("retry"))  # 3 reruns 2
    add(3, 1, ContinuationKind.branch("alt"))  # 4 branches off 1
    for i in (4, 5, 6):  # 5, 6, 7: parallel continuations of 3
        add(i, 3, ContinuationKind.default())
    group_ids = [lp.loop_id for lp in loops[4:7]]
    for lp in loops[4:7]:
        lp.parallel_group = ParallelGroupRecord(
            all_loop_ids=group_ids,
            selected_loop_id=group_ids[1],
            selected_config_index=1,
            evaluation_usage=Usage.zero(),
            is_selected=lp.loop_id == group_ids[1],
        )
    session = make_session(TREE, 1)
    session.loops = loops
    session.last_active_at = loops[-1].started_at
    return session


def save_all(path: Path | SessionStore, *, at_rest: bool) -> SessionStore:
    """The three phi-core fixtures and the tree session; `at_rest`: journals folded, so
    every blob is a file in loops/ (as after `loopstore checkpoint --all`). `path` is a
    directory, or a store on either backend."""
    store = path if isinstance(path, SessionStore) else FileSystemSessionStore(path, durable=False)
    for session in [
        *(Session.model_validate_json(f.read_bytes()) for f in fixture_paths()),
        tree_session(),
    ]:
        store.save(session)
        if at_rest:
            store.checkpoint(session.session_id)
    return store


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A store holding the three phi-core fixtures and the tree session, at rest."""
    path = tmp_path / "store"
    save_all(path, at_rest=True).close()
    return path


@pytest.fixture
def stores(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> StoreFactory:
    """This test's stores on either backend, with the AWS_* variables pointing the
    command line at the test server when that is S3 (as a user would configure it)."""
    for name, value in make_store.env.items():
        monkeypatch.setenv(name, value)
    return make_store


@pytest.fixture
def any_root(stores: StoreFactory) -> str:
    """`root` on either backend, as --root takes it: a directory or an s3:// URL."""
    save_all(stores(durable=False), at_rest=True).close()
    return stores.location()


@pytest.fixture
def journaled(tmp_path: Path) -> Path:
    """The same sessions, as writers leave them: their last commits in journals."""
    path = tmp_path / "journaled"
    save_all(path, at_rest=False).close()
    return path


@pytest.fixture
def missing(tmp_path: Path) -> Path:
    return tmp_path / "no-store-here"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(extra)
    return env


# --- formatting -----------------------------------------------------------------------------


def test_sizes_are_binary_units() -> None:
    assert cli.format_size(0) == "0 B"
    assert cli.format_size(1023) == "1023 B"
    assert cli.format_size(1536) == "1.5 KiB"
    assert cli.format_size(5 * 1024 * 1024) == "5.0 MiB"
    assert cli.format_size(3 * 1024**3) == "3.0 GiB"


def test_relative_times() -> None:
    now = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
    assert cli.format_relative(now - timedelta(seconds=3), now) == "just now"
    assert cli.format_relative(now - timedelta(seconds=42), now) == "42 s ago"
    assert cli.format_relative(now - timedelta(minutes=5), now) == "5 min ago"
    assert cli.format_relative(now - timedelta(hours=3), now) == "3 h ago"
    assert cli.format_relative(now - timedelta(days=2), now) == "2 d ago"
    assert cli.format_relative(now + timedelta(minutes=5), now) == "in 5 min"
    assert cli.format_relative(now - timedelta(days=400), now) == "2024-12-06 12:00"
    assert cli.format_relative(None, now) == "-"


def test_nanosecond_timestamps_parse() -> None:
    parsed = cli.parse_timestamp("2025-06-01T10:15:30.250192131Z")
    assert parsed == datetime(2025, 6, 1, 10, 15, 30, 250192, tzinfo=timezone.utc)
    assert cli.parse_timestamp("garbage") is None


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (SessionNotFound("s"), 3),
        (SessionLocked("s", "locked"), 4),
        (InvalidSessionId("a/b", "contains a path separator"), 2),
        (CorruptSession("s", "hash mismatch"), 1),
        (StorageError("s", "disk full"), 1),
        (SessionError("s", "other"), 1),
    ],
)
def test_error_classes_map_to_exit_codes(err: SessionError, code: int) -> None:
    assert cli.exit_code_for(err) == code


# --- usage, root resolution, missing stores --------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, f"loopstore {loopstore.__version__}")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["ls", "--bogus"],
        ["ls", "--limit", "-1"],
        ["gc", "--grace", "soon"],
        ["show"],
        ["export-legacy", "only-a-dir"],
        ["export-legacy", "--all", "a", "b"],
        ["checkpoint"],
        ["checkpoint", "--all", PARENT],
        ["ls", "--sort", "bogus"],
        ["migrate", "extra"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], root: Path, argv: list[str]
) -> None:
    code, out, err = run(capsys, "--root", str(root), *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("loopstore: error: ")


def test_read_commands_do_not_create_a_store(
    capsys: pytest.CaptureFixture[str], stores: StoreFactory, tmp_path: Path
) -> None:
    missing = stores.location("no-store-here")
    code, out, err = run(capsys, "--root", missing, "ls")
    assert (code, out) == (0, "")
    assert "no store at" in err
    assert run_json(capsys, "--root", missing, "ls") == {
        "root": missing,
        "exists": False,
        "sessions": [],
        "damaged": [],
    }
    assert run_json(capsys, "--root", missing, "stats")["sessions"] == 0
    for argv in (
        ["show", PARENT],
        ["tree", PARENT],
        ["cat", PARENT],
        ["verify"],
        ["gc"],
        ["checkpoint", "--all"],
        ["migrate"],
        ["reindex"],
        ["export-legacy", "--all", str(tmp_path / "out")],
        ["backup", str(tmp_path / "backup")],
    ):
        code, out, err = run(capsys, "--root", missing, *argv)
        assert code == 3, argv
        assert err.count("\n") == 1 and "no loopstore store at" in err
    assert stores.raw("no-store-here").ls() == []
    assert not Path(missing).exists()


def test_a_plain_directory_is_not_turned_into_a_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, _ = run(capsys, "--root", str(tmp_path), "verify")
    assert code == 3
    assert list(tmp_path.iterdir()) == []


def test_a_directory_of_other_files_is_not_an_empty_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ls` and `stats` show a missing or empty root as an empty store (exit 0), but a
    directory holding other files is a mistyped --root: exit 3, and nothing is written."""
    (tmp_path / "notes.txt").write_text("mine")
    for argv in (["ls"], ["stats"], ["ls", "--json"], ["verify"]):
        code, out, err = run(capsys, "--root", str(tmp_path), *argv)
        assert (code, out) == (3, ""), argv
        assert err.count("\n") == 1 and "no loopstore store at" in err and "other files" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_store_from_a_newer_loopstore_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory
) -> None:
    raw = stores.raw()
    doc = json.loads(raw.read("loopstore.json"))
    raw.write("loopstore.json", json.dumps({**doc, "version": 99}).encode())
    for argv in (["ls"], ["verify"], ["import-legacy", str(FIXTURES_DIR)]):
        code, out, err = run(capsys, "--root", any_root, *argv)
        assert (code, out) == (2, ""), argv
        assert err.count("\n") == 1 and "newer than this loopstore supports" in err
    assert json.loads(raw.read("loopstore.json"))["version"] == 99


def test_import_into_a_directory_that_is_not_a_store_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, out, err = run(capsys, "--root", str(foreign), "import-legacy", str(FIXTURES_DIR))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("loopstore: error: store: not a loopstore store")
    assert "refusing to make it a store" in err and str(foreign) in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "argv", [["ls"], ["stats"], ["show", PARENT], ["verify"], ["import-legacy", "."], ["demo"]]
)
def test_a_root_that_is_a_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    not_a_dir = tmp_path / "store.txt"
    not_a_dir.write_text("not a store")
    for root in (not_a_dir, not_a_dir / "below"):
        code, out, err = run(capsys, "--root", str(root), *argv)
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and err.startswith("loopstore: error: store root ")
        assert str(not_a_dir) in err and "not a directory" in err
    assert sorted(tmp_path.iterdir()) == [not_a_dir]
    assert not_a_dir.read_text() == "not a store"


@pytest.mark.parametrize(
    "argv",
    [["export-legacy", PARENT, "{dir}"], ["export-legacy", "--all", "{dir}"], ["backup", "{dir}"]],
)
def test_a_directory_argument_that_is_a_file_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path, argv: list[str]
) -> None:
    not_a_dir = tmp_path / "out.txt"
    not_a_dir.write_text("keep")
    for where in (not_a_dir, not_a_dir / "below"):
        args = [a.replace("{dir}", str(where)) for a in argv]
        code, out, err = run(capsys, "--root", str(root), *args)
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and str(not_a_dir) in err and "not a directory" in err
    assert not_a_dir.read_text() == "keep"


def test_an_empty_root_is_a_usage_error_not_the_default(
    capsys: pytest.CaptureFixture[str], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root.parent)
    shutil.move(root, root.parent / ".loopstore")
    code, out, err = run(capsys, "--root", "", "ls")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "--root" in err
    monkeypatch.setenv("LOOPSTORE_ROOT", "")  # an empty variable counts as unset
    assert len(run_json(capsys, "ls")["sessions"]) == 4


def test_root_from_env_then_default(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOPSTORE_ROOT", str(root))
    assert len(run_json(capsys, "ls")["sessions"]) == 4
    other = tmp_path / "other"
    assert run_json(capsys, "--root", str(other), "ls")["exists"] is False
    monkeypatch.delenv("LOOPSTORE_ROOT")
    monkeypatch.chdir(root.parent)
    shutil.move(root, root.parent / ".loopstore")
    listing = run_json(capsys, "ls")
    assert listing["root"] == ".loopstore" and len(listing["sessions"]) == 4


# --- reading ----------------------------------------------------------------------------------


def test_ls_json_lists_every_session(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    listing = run_json(capsys, "--root", any_root, "ls")
    rows = {r["session_id"]: r for r in listing["sessions"]}
    assert set(rows) == {PARENT, CHILD, THINKING, TREE}
    assert rows[CHILD]["agent_id"] == "sub-agent-research"
    assert rows[CHILD]["parent_session_id"] == PARENT
    assert rows[TREE]["loops"] == 7
    assert rows[PARENT]["last_active_at"] == "2025-06-04T16:45:10.001Z"
    for r in rows.values():
        assert 0 < r["stored_bytes"] < r["raw_bytes"]
        assert list(r) == list(cli.SessionRow.__dataclass_fields__)
    # most recently active first by default
    order = [r["session_id"] for r in listing["sessions"]]
    assert order == [CHILD, PARENT, TREE, THINKING]
    # --json is accepted before the command too
    code, out, _ = run(capsys, "--root", any_root, "--json", "ls")
    assert code == 0 and json.loads(out) == listing


def test_ls_filters_sorts_and_limits(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    base = ("--root", any_root, "ls")
    agent = "agent-7f3c9a2e-5b1d-4c8e-9a6f-2d4b8e1c0a93"
    only = run_json(capsys, *base, "--agent", agent)["sessions"]
    assert {r["session_id"] for r in only} == {PARENT, THINKING}
    by_id = run_json(capsys, *base, "--sort", "id")["sessions"]
    assert [r["session_id"] for r in by_id] == sorted([PARENT, CHILD, THINKING, TREE])
    by_loops = run_json(capsys, *base, "--sort", "loops", "--limit", "1")["sessions"]
    assert [r["session_id"] for r in by_loops] == [TREE]
    oldest = run_json(capsys, *base, "--reverse", "--limit", "1")["sessions"]
    assert [r["session_id"] for r in oldest] == [THINKING]
    assert run_json(capsys, *base, "--agent", "nobody")["sessions"] == []


def test_ls_human_is_an_aligned_table(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    code, out, _ = run(capsys, "--root", any_root, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SESSION", "AGENT", "LOOPS", "LAST", "ACTIVE", "SIZE"]
    assert len(lines) == 5
    assert ANSI_ESCAPE not in out
    # right-aligned SIZE column: every line ends at the same width
    assert len({len(line) for line in lines}) == 1
    assert any(line.endswith("KiB") for line in lines[1:])
    assert any("2025-06-04" in line for line in lines)


@pytest.mark.parametrize(
    "cells",
    [["plain", "宽字符", "e\u0301", "🎉 [bold]x[/]"], ["tab\there", "cr\rbell\x07", "new\nline"]],
    ids=["printable", "control"],
)
def test_tables_print_as_rich_prints_them(
    capsys: pytest.CaptureFixture[str], cells: list[str]
) -> None:
    """Off a terminal a table of printable text skips rich; the bytes are rich's."""
    columns = [cli.Column("NAME", style="bold cyan"), cli.Column("SAME", right=True)]
    rows = [[c, c] for c in cells]
    ctx = cli.Ctx(location="unused", local_root=None, json=False, stderr_tty=False)
    ctx.print_table(columns, rows)
    direct = capsys.readouterr().out
    for line in cli.table_lines(columns, rows):
        ctx.print(cli._rich_line(line))
    assert direct == capsys.readouterr().out
    assert direct.startswith("NAME ")


def test_show_header_loops_and_usage(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    fixture = json.loads((FIXTURES_DIR / f"{THINKING}.json").read_text())
    shown = run_json(capsys, "--root", any_root, "show", THINKING)
    assert list(shown) == [
        "session",
        "loops",
        "usage",
        "raw_bytes",
        "stored_bytes",
        "generation",
        "journal_records",
    ]
    assert shown["journal_records"] == 0 and shown["generation"] >= 1
    assert shown["session"]["formation"] == fixture["formation"]
    assert shown["session"]["created_at"] == "2025-06-01T10:15:30.250192131Z"
    (loop,) = shown["loops"]
    assert loop["loop_id"] == fixture["loops"][0]["loop_id"]
    assert loop["turns"] == 3 and loop["status"] == "Completed"
    assert loop["usage"] == fixture["loops"][0]["usage"]
    assert shown["usage"] == fixture["loops"][0]["usage"]
    assert loop["model"] == "claude-sonnet-4-5"

    code, out, _ = run(capsys, "--root", any_root, "show", TREE)
    assert code == 0
    assert f"session:     {TREE}" in out
    assert "rerun (retry)" in out and "branch (alt)" in out
    tree = run_json(capsys, "--root", any_root, "show", TREE)
    total = sum(lp["usage"]["total_tokens"] for lp in tree["loops"])
    assert f"total tokens {total:,}" in out


def test_show_links_the_parent_of_a_sub_agent(
    capsys: pytest.CaptureFixture[str], any_root: str
) -> None:
    code, out, _ = run(capsys, "--root", any_root, "show", CHILD)
    assert code == 0
    assert f"spawned by:  session {PARENT}" in out


def test_tree_marks_kinds_parallel_winner_and_sub_agents(
    capsys: pytest.CaptureFixture[str], any_root: str
) -> None:
    tree = run_json(capsys, "--root", any_root, "tree", TREE)
    loops = {n["index"]: n for n in tree["loops"]}
    ids = {i: n["loop_id"] for i, n in loops.items()}
    assert tree["roots"] == [ids[1]]
    assert loops[1]["children"] == [ids[2], ids[4]]
    assert loops[4]["continuation_kind"] == {"Branch": {"tag": "alt"}}
    assert loops[2]["children"] == [ids[3]]
    assert loops[3]["continuation_kind"] == {"Rerun": {"tag": "retry"}}
    assert loops[3]["children"] == [ids[5], ids[6], ids[7]]
    assert [loops[i]["selected"] for i in (5, 6, 7)] == [False, True, False]
    assert loops[1]["selected"] is None

    code, out, _ = run(capsys, "--root", any_root, "tree", TREE)
    assert code == 0
    assert out.splitlines()[1:] == [
        "└── #1 test.1  initial  Completed  1 turn",
        "    ├── #2 test.2  continue  Completed  1 turn",
        "    │   #3 test.3  rerun (retry)  Completed  1 turn",  # only child: no connector
        "    │   ├── #5 test.5  continue  Completed  1 turn  [parallel 1/3]",
        "    │   ├── #6 test.6  continue  Completed  1 turn  [parallel 2/3] ★ winner",
        "    │   └── #7 test.7  continue  Completed  1 turn  [parallel 3/3]",
        "    └── #4 test.4  branch (alt)  Completed  1 turn",
    ]

    parent = run_json(capsys, "--root", any_root, "tree", PARENT)
    (sub,) = parent["loops"][0]["sub_agents"]
    assert sub["child_session_id"] == CHILD and sub["in_store"] is True
    child = run_json(capsys, "--root", any_root, "tree", CHILD)
    assert child["parent_spawn_ref"]["parent_session_id"] == PARENT
    assert child["parent_spawn_ref"]["in_store"] is True
    code, out, _ = run(capsys, "--root", any_root, "tree", PARENT)
    assert f"⇢ sub-agent session {CHILD}" in out and "via research_agent" in out
    code, out, _ = run(capsys, "--root", any_root, "tree", CHILD)
    assert f"↖ spawned by session {PARENT}" in out


def test_tree_of_a_long_chain_and_a_parent_cycle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Thousands of continuations neither recurse nor indent; a cycle is still shown."""
    n = 1100  # past the default recursion limit
    loops = [make_loop("long", 0, text_bytes=40)]
    for i in range(1, n):
        loops.append(make_loop("long", i, parent_loop_id=loops[-1].loop_id, text_bytes=40))
        loops[-2].children_loop_ids.append(loops[-1].loop_id)
    cyclic = [make_loop("cyclic", i, text_bytes=40) for i in range(2)]
    cyclic[0].parent_loop_id, cyclic[1].parent_loop_id = cyclic[1].loop_id, cyclic[0].loop_id
    store = FileSystemSessionStore(tmp_path, durable=False)
    for sid, chain in (("long", loops), ("cyclic", cyclic)):
        session = make_session(sid, 1)
        session.loops = chain
        store.save(session)
    code, out, _ = run(capsys, "--root", str(tmp_path), "tree", "long")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == n + 1 and lines[-1].startswith(f"    #{n} test.{n}  continue")
    assert len(run_json(capsys, "--root", str(tmp_path), "tree", "long")["loops"]) == n
    code, out, _ = run(capsys, "--root", str(tmp_path), "tree", "cyclic")
    assert code == 0 and "#1 test.1" in out and "#2 test.2" in out


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.stem[-4:])
def test_cat_is_byte_identical_to_phi_core(
    capsysbinary: pytest.CaptureFixture[bytes], any_root: str, path: Path
) -> None:
    code = cli.main(["--root", any_root, "cat", path.stem])
    assert code == 0
    assert capsysbinary.readouterr().out == path.read_bytes()


def test_cat_one_loop_by_id_index_or_suffix(
    capsys: pytest.CaptureFixture[str], any_root: str
) -> None:
    fixture = json.loads((FIXTURES_DIR / f"{PARENT}.json").read_text())
    loop = fixture["loops"][0]
    for wanted in (loop["loop_id"], "1", "-1", "anthropic.claude-sonnet-4-5.1"):
        code, out, _ = run(capsys, "--root", any_root, "cat", PARENT, wanted)
        assert code == 0
        assert json.loads(out) == loop
        assert out.startswith('{\n  "loop_id": ')
    code, _, err = run(capsys, "--root", any_root, "cat", PARENT, "9")
    assert code == 3 and PARENT in err and "no loop '9'" in err
    code, _, err = run(capsys, "--root", any_root, "cat", TREE, "test")  # no dotted suffix
    assert code == 3
    code, _, err = run(capsys, "--root", any_root, "cat", TREE, "7")
    assert code == 0


def test_an_ambiguous_loop_suffix_lists_the_matching_loops(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    session = make_session("amb", 3)
    renamed = ["amb.w0.test.1", "amb.w1.test.1", "amb.w1.test.2"]
    for lp, new_id in zip(session.loops, renamed, strict=True):
        lp.loop_id = new_id
    for lp, child in zip(session.loops, session.loops[1:], strict=False):
        child.parent_loop_id = lp.loop_id
        lp.children_loop_ids = [child.loop_id]
    FileSystemSessionStore(tmp_path, durable=False).save(session)
    code, out, err = run(capsys, "--root", str(tmp_path), "cat", "amb", "test.1")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "'test.1' is ambiguous" in err and "amb.w0.test.1" in err and "amb.w1.test.1" in err
    assert "amb.w1.test.2" not in err
    code, out, _ = run(capsys, "--root", str(tmp_path), "cat", "amb", "w1.test.1")
    assert code == 0 and json.loads(out)["loop_id"] == "amb.w1.test.1"


def test_stats(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    stats = run_json(capsys, "--root", any_root, "stats")
    assert (stats["sessions"], stats["loops"], stats["orphans"]) == (4, 10, 0)
    # the tree session's seven loops are distinct, so every loop has its own blob
    assert stats["blobs"] == 10
    assert stats["ratio"] == round(stats["raw_bytes"] / stats["stored_bytes"], 3) > 1
    code, out, _ = run(capsys, "--root", any_root, "stats")
    assert code == 0 and "ratio:" in out and "x" in out and "damaged" not in out


def test_stats_counts_a_damaged_manifest_and_exits_1(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory
) -> None:
    stores.raw().write(manifest_key(TREE), b'{"format": "loopstore.manifest", "gar')
    code, out, _ = run(capsys, "--root", any_root, "stats", "--json")
    stats = json.loads(out)
    assert code == 1
    assert (stats["sessions"], stats["damaged"]) == (3, 1)
    assert [p["session_id"] for p in stats["problems"]] == [TREE]
    code, out, _ = run(capsys, "--root", any_root, "stats")
    assert code == 1
    assert "sessions: 4  (3 readable, 1 damaged" in out
    assert f"PROBLEM session {TREE!r}: bad_manifest: " in out


def test_not_found_and_invalid_ids(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    for command in ("show", "tree", "cat", "verify", "rm"):
        code, _, err = run(capsys, "--root", any_root, command, "nope")
        assert code == 3, command
        assert err.count("\n") == 1 and "'nope'" in err and "not found" in err
    code, _, err = run(capsys, "--root", any_root, "show", "../etc")
    assert code == 2 and err.count("\n") == 1 and "'../etc'" in err


# --- verify and gc ----------------------------------------------------------------------------


def a_blob(root: Path, session_id: str) -> Path:
    return sorted(Layout(root).loops_dir(session_id).iterdir())[0]


def _raw(root: Path | RawStore) -> RawStore:
    return FsRaw(root) if isinstance(root, Path) else root


def test_verify_clean(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    report = run_json(capsys, "--root", any_root, "verify")
    assert report["ok"] is True and report["problems"] == []
    assert report["sessions_checked"] == 4 and report["blobs_checked"] == 10
    code, out, _ = run(capsys, "--root", any_root, "verify", PARENT)
    assert code == 0 and out == "ok: 1 session, 1 blob checked, 0 problems, 0 orphans\n"


def corrupt_flip(root: Path | RawStore) -> str:
    raw = _raw(root)
    raw.flip(raw.ls(f"sessions/{PARENT}/loops/")[0])
    return PARENT


def corrupt_delete(root: Path | RawStore) -> str:
    raw = _raw(root)
    raw.delete(raw.ls(f"sessions/{CHILD}/loops/")[0])
    return CHILD


def corrupt_manifest(root: Path | RawStore) -> str:
    _raw(root).write(manifest_key(THINKING), b'{"format": 1, "session_id": ')
    return THINKING


@pytest.mark.parametrize("damage", [corrupt_flip, corrupt_delete, corrupt_manifest])
def test_verify_finds_damage(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory, damage: Any
) -> None:
    damaged = damage(stores.raw())
    code, out, err = run(capsys, "--root", any_root, "verify", "--json")
    assert code == 1, err
    report = json.loads(out)
    assert report["ok"] is False
    assert {p["session_id"] for p in report["problems"]} == {damaged}
    assert all(p["kind"] and p["detail"] for p in report["problems"])
    code, out, _ = run(capsys, "--root", any_root, "verify")
    assert code == 1
    assert f"PROBLEM session {damaged!r}" in out and out.splitlines()[-1].startswith("DAMAGED")
    code, _, _ = run(capsys, "--root", any_root, "verify", TREE)
    assert code == 0
    code, _, err = run(capsys, "--root", any_root, "cat", damaged)
    assert code == 1 and damaged in err and err.count("\n") == 1


def test_verify_lists_a_torn_tail_and_says_the_next_write_cuts_it(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory
) -> None:
    store = stores()
    store.append_loop(PARENT, make_loop(PARENT, 7))  # a journal record (or record object)
    raw = stores.raw()
    if stores.is_s3:  # an empty record object after the last (an upload cut off)
        last = max(
            ondisk.record_seq(k.split("/", 2)[2]) or 0 for k in raw.ls(f"sessions/{PARENT}/log/")
        )
        raw.write(f"sessions/{PARENT}/{ondisk.record_name(last + 1)}", b"")
    else:  # a frame cut inside its header at the journal's end (a write cut off)
        [key] = [
            k
            for k in raw.ls(f"sessions/{PARENT}/")
            if ondisk.journal_generation(k.rsplit("/", 1)[1]) is not None
        ]
        raw.write(key, raw.read(key) + b"LSJ1R")
    code, out, _ = run(capsys, "--root", any_root, "verify")
    assert code == 0, out
    assert out.splitlines()[-1].endswith(
        "1 orphan (a torn tail is cut by its session's next write)"
    )
    report = run_json(capsys, "--root", any_root, "verify")
    [orphan] = report["orphans"]
    assert orphan["kind"] == "torn_tail" and orphan["session_id"] == PARENT
    stores().append_loop(PARENT, make_loop(PARENT, 8))
    assert run_json(capsys, "--root", any_root, "verify")["orphans"] == []


def test_ls_lists_the_healthy_and_flags_a_damaged_manifest(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory
) -> None:
    corrupt_manifest(stores.raw())
    code, out, err = run(capsys, "--root", any_root, "ls", "--json")
    assert code == 1
    listing = json.loads(out)
    assert {r["session_id"] for r in listing["sessions"]} == {PARENT, CHILD, TREE}
    assert [d["session_id"] for d in listing["damaged"]] == [THINKING]
    assert err.startswith(f"loopstore: warning: session {THINKING!r}: ") and err.count("\n") == 1


def test_gc_removes_orphans_after_grace(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory
) -> None:
    raw, orphan = stores.raw(), blob_key(PARENT, "0" * 32)
    raw.write(orphan, b"not referenced")
    report = run_json(capsys, "--root", any_root, "verify")
    assert report["ok"] is True and len(report["orphans"]) == 1
    kept = run_json(capsys, "--root", any_root, "gc")  # default grace: too young to remove
    assert raw.exists(orphan) and kept["dry_run"] is False
    assert (kept["kept_young"], kept["blobs_removed"], kept["ok"]) == (1, 0, True)
    code, out, _ = run(capsys, "--root", any_root, "gc")
    assert code == 0 and out.startswith("gc removed: nothing (4 sessions scanned; grace 900 s)")
    assert "kept 1 unreferenced file younger than the grace period (900 s)" in out
    dry = run_json(capsys, "--root", any_root, "gc", "--grace", "0", "--dry-run")
    assert dry["dry_run"] is True and raw.exists(orphan)
    done = run_json(capsys, "--root", any_root, "gc", "--grace", "0")
    assert not raw.exists(orphan)
    assert (done["blobs_removed"], done["kept_young"]) == (1, 0)
    assert run_json(capsys, "--root", any_root, "verify")["orphans"] == []
    code, out, _ = run(capsys, "--root", any_root, "gc", "--grace", "0")
    assert code == 0 and out.startswith("gc removed:")


# --- import, export, rm, lock ---------------------------------------------------------------


def test_import_then_export_is_byte_identical(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stores: StoreFactory
) -> None:
    store = stores.location("fresh")
    report = run_json(capsys, "--root", store, "import-legacy", str(FIXTURES_DIR))
    assert report  # the store's ImportReport, as JSON
    listing = run_json(capsys, "--root", store, "ls")
    assert {r["session_id"] for r in listing["sessions"]} == {p.stem for p in fixture_paths()}

    out_all = tmp_path / "all"
    exported = run_json(capsys, "--root", store, "export-legacy", "--all", str(out_all))
    assert len(exported["exported"]) == 3
    for path in fixture_paths():
        assert (out_all / path.name).read_bytes() == path.read_bytes()

    out_two = tmp_path / "two"
    code, out, _ = run(capsys, "--root", store, "export-legacy", PARENT, CHILD, str(out_two))
    assert code == 0 and len(out.splitlines()) == 2
    assert sorted(p.name for p in out_two.iterdir()) == [f"{PARENT}.json", f"{CHILD}.json"]
    assert (out_two / f"{CHILD}.json").read_bytes() == (FIXTURES_DIR / f"{CHILD}.json").read_bytes()


def test_import_missing_dir_is_not_found(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "--root", str(tmp_path / "s"), "import-legacy", str(tmp_path / "x"))
    assert code == 3 and "no such directory" in err
    assert not (tmp_path / "s").exists()


def test_rm(capsys: pytest.CaptureFixture[str], any_root: str) -> None:
    code, out, _ = run(capsys, "--root", any_root, "rm", CHILD)
    assert (code, out) == (0, f"removed {CHILD}\n")
    assert run(capsys, "--root", any_root, "show", CHILD)[0] == 3
    # the parent still links to it, marked as missing
    code, out, _ = run(capsys, "--root", any_root, "tree", PARENT)
    assert "(not in this store)" in out
    code, out, err = run(capsys, "--root", any_root, "rm", CHILD, THINKING)
    assert code == 3 and f"removed {THINKING}" in out and CHILD in err


@pytest.fixture
def lock_holder(root: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding PARENT's session lock until its stdin closes."""
    code = (
        "import sys\n"
        "from loopstore.store import FileSystemSessionStore\n"
        "store = FileSystemSessionStore(sys.argv[1])\n"
        "with store.lock(sys.argv[2]):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root), PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


# Filesystem only: on S3 `lock()` excludes the threads of one process (FORMAT.md 7).
def test_locked_session_exits_4(
    capsys: pytest.CaptureFixture[str], root: Path, lock_holder: subprocess.Popen[str]
) -> None:
    code, _, err = run(capsys, "--root", str(root), "--lock-timeout", "0.2", "rm", PARENT)
    assert code == 4
    assert err.count("\n") == 1 and PARENT in err
    # readers take no lock
    assert run(capsys, "--root", str(root), "show", PARENT)[0] == 0


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(
            "locks-not-writable",
            marks=pytest.mark.skipif(
                os.geteuid() == 0,
                reason="root ignores permission bits; the 'lock-is-a-directory' case runs "
                "the same path",
            ),
        ),
        "lock-is-a-directory",
    ],
)
def test_a_lock_file_that_cannot_be_opened_is_one_clean_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, how: str
) -> None:
    """The store raises StorageError from its lock layer: exit 1 (documented), one line
    with the session and the lock file's path, the OS error as plain text."""
    root = tmp_path / "store"
    # Saved by another process: this one keeps the lock files it used open (an LRU),
    # so breaking a lock file it has used would not be seen here, as in a fresh `loopstore`.
    save = (
        "import sys\n"
        "from helpers import make_session\n"
        "from loopstore.store import FileSystemSessionStore\n"
        "FileSystemSessionStore(sys.argv[1], durable=False).save(make_session('s-locked', 1))\n"
    )
    subprocess.run(
        [sys.executable, "-c", save, str(root)],
        check=True,
        cwd=Path(__file__).parent,
        env=subprocess_env(PYTHONPATH=str(Path(__file__).parent)),
    )
    store = FileSystemSessionStore(root, durable=False)
    locks = Layout(root).locks_dir
    lock_path = locks / "s-locked.lock"
    lock_path.unlink(missing_ok=True)
    if how == "locks-not-writable":
        locks.chmod(0o555)
        reason = "Permission denied"
    else:
        lock_path.mkdir()
        reason = "Is a directory"
    try:
        code, out, err = run(capsys, "--root", str(root), "rm", "s-locked")
    finally:
        locks.chmod(0o755)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("loopstore: error: session 's-locked': ")
    assert reason in err and err.rstrip().endswith(f"({lock_path})")
    assert "b'" not in err and "Errno" not in err
    assert store.exists("s-locked")


# --- demo and backup ---------------------------------------------------------------------------


def test_demo_passes_options_through(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = pytest.importorskip("loopstore.demo")
    calls: list[tuple[Path, dict[str, Any]]] = []

    def fake_run_demo(root: Path, **kwargs: Any) -> None:
        calls.append((root, kwargs))

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setenv("LOOPSTORE_ROOT", str(tmp_path / "env-root"))
    code, _, _ = run(
        capsys,
        "demo",
        "--workers",
        "3",
        "--sessions",
        "5",
        "--loops",
        "2",
        "--seed",
        "7",
        "--fresh",
    )
    assert code == 0
    ((where, kwargs),) = calls
    assert where == tmp_path / "env-root"
    assert {k: v for k, v in kwargs.items() if k != "console"} == {
        "workers": 3,
        "sessions": 5,
        "loops": 2,
        "seed": 7,
        "fresh": True,
    }
    assert run(capsys, "demo", "--workers", "0")[0] == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--workers", "100000", "--sessions", "99999999999999999999"],
        ["--sessions", "99999999999999999999"],
        ["--workers", "0"],
        ["--workers", "33", "--sessions", "100"],
        ["--loops", "101"],
        ["--sessions", "1000", "--loops", "11"],  # 11,000 loops in all
        ["--sessions", "2", "--workers", "3"],  # a worker without a session
        ["--seed", "-1"],
        ["--seed", "nine"],
    ],
)
def test_demo_options_are_bounded(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    store = tmp_path / "demo"
    code, out, err = run(capsys, "--root", str(store), "demo", *argv)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("loopstore: error: ")
    assert not store.exists()


def test_demo_adds_to_a_store_it_did_not_create_only_when_told(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    pytest.importorskip("loopstore.demo")
    code, out, err = run(capsys, "--root", str(root), "demo", "--sessions", "1", "--loops", "1")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "refusing to add demo data" in err and "--add-to-existing" in err
    assert len(run_json(capsys, "--root", str(root), "ls")["sessions"]) == 4
    code, out, _ = run(
        capsys,
        "--root",
        str(root),
        "demo",
        "--sessions",
        "1",
        "--loops",
        "1",
        "--add-to-existing",
    )
    assert code == 0 and "rm -rf" not in out and "--fresh" not in out
    assert len(run_json(capsys, "--root", str(root), "ls")["sessions"]) > 4
    assert not (root / "loopstore-demo.txt").exists()  # still not the demo's


def test_demo_for_real(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("loopstore.demo")
    store = tmp_path / "demo"
    code, out, _ = run(
        capsys, "--root", str(store), "demo", "--workers", "2", "--sessions", "2", "--loops", "1"
    )
    assert code == 0 and "verify" in out
    assert len(run_json(capsys, "--root", str(store), "ls")["sessions"]) >= 2
    assert run_json(capsys, "--root", str(store), "verify")["ok"] is True


def test_demo_fresh_refuses_to_empty_a_real_store(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    pytest.importorskip("loopstore.demo")
    code, _, err = run(capsys, "--root", str(root), "demo", "--fresh", "--sessions", "1")
    assert code == 2 and err.count("\n") == 1 and "refusing to empty" in err
    assert len(run_json(capsys, "--root", str(root), "ls")["sessions"]) == 4


def test_backup_then_verify(capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path) -> None:
    pytest.importorskip("loopstore.backup")
    dest = tmp_path / "backup"
    result = run_json(capsys, "--root", str(root), "backup", str(dest), "--verify")
    assert result["backup"]["ok"] is True and result["verify"]["in_sync"] is True
    assert result["backup"]["dest"] == str(dest)
    assert result["backup"]["sessions"] == 4
    copy = run_json(capsys, "--root", str(dest), "ls")
    assert len(copy["sessions"]) == 4
    assert run(capsys, "--root", str(dest), "verify")[0] == 0

    # incremental; deleted sessions are kept only on request
    assert run(capsys, "--root", str(root), "rm", CHILD)[0] == 0
    kept = run_json(capsys, "--root", str(root), "backup", str(dest), "--keep-deleted")
    assert kept["backup"]["sessions_removed"] == 0 and kept["backup"]["files_copied"] == 0
    assert len(run_json(capsys, "--root", str(dest), "ls")["sessions"]) == 4
    code, out, _ = run(capsys, "--root", str(root), "backup", str(dest), "--verify")
    assert code == 0 and out.startswith(f"backup to {dest}: 3 sessions")
    assert "1 removed" in out and "verify: in sync" in out

    # a blob the backup lost is copied again; same-size damage is caught by --verify
    blob = a_blob(dest, PARENT)
    data = blob.read_bytes()
    blob.unlink()  # a new inode: the backup's blobs are hard links to the source's
    blob.write_bytes(data[:-3])
    code, out, _ = run(capsys, "--root", str(root), "backup", str(dest), "--verify")
    assert code == 0 and "1 updated" in out and "1 linked" in out and "verify: in sync" in out
    blob.unlink()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0x5A]))
    code, out, _ = run(capsys, "--root", str(root), "backup", str(dest), "--verify")
    assert code == 1 and f"PROBLEM session {PARENT!r}" in out and "verify: DAMAGED" in out
    assert run(capsys, "--root", str(root), "verify")[0] == 0


# --- listings come from the catalog; raw JSON without models ----------------------------------


def test_sort_orders_are_the_catalogs() -> None:
    from loopstore.catalog import ORDERS

    assert sorted(cli.SORT_ORDERS) == sorted(ORDERS)


def test_ls_reads_no_session_file_once_the_catalog_is_built(
    capsys: pytest.CaptureFixture[str], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ls` answers from the catalog: at 100,000 sessions it must not read each one."""
    assert len(run_json(capsys, "--root", str(root), "ls")["sessions"]) == 4  # builds it
    real_read_file = atomic.read_file

    def read_file(dir_fd: int | None, name: str | Path) -> bytes:
        if os.path.basename(os.fspath(name)) != Layout(root).marker.name:
            raise AssertionError(f"ls read {name}")
        return real_read_file(dir_fd, name)

    real_open_file = atomic.open_file

    def open_file(name: str, dir_fd: int, *, write: bool = False, create: bool = False) -> int:
        if not write:  # manifests' tails and journals are opened this way
            raise AssertionError(f"ls opened {name}")
        return real_open_file(name, dir_fd, write=write, create=create)

    monkeypatch.setattr(atomic, "read_file", read_file)
    monkeypatch.setattr(atomic, "open_file", open_file)
    first = run_json(capsys, "--root", str(root), "ls", "--limit", "1")["sessions"]
    assert [r["session_id"] for r in first] == [CHILD]
    agent = "agent-7f3c9a2e-5b1d-4c8e-9a6f-2d4b8e1c0a93"
    mine = run_json(capsys, "--root", str(root), "ls", "--agent", agent, "--sort", "id")
    assert [r["session_id"] for r in mine["sessions"]] == sorted([PARENT, THINKING])
    code, out, _ = run(capsys, "--root", str(root), "ls", "--sort", "size", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 3


MODELS = ("pydantic", "pydantic_core", "loopstore.models")
PIPED_LS = (*MODELS, "rich.console", "rich.text", "loopstore.demo", "concurrent.futures")


@pytest.mark.parametrize(
    ("command", "heavy"),
    [
        (["ls", "--limit", "20"], PIPED_LS),
        (
            ["ls", "--agent", "agent-7f3c9a2e-5b1d-4c8e-9a6f-2d4b8e1c0a93", "--limit", "20"],
            PIPED_LS,
        ),
        (["stats"], MODELS),
        (["verify"], MODELS),
    ],
    ids=["ls", "ls-agent", "stats", "verify"],
)
def test_listings_import_no_model(root: Path, command: list[str], heavy: tuple[str, ...]) -> None:
    """A fresh process lists without importing pydantic or the models: building the model
    classes took more than half of `ls`'s start-up; `ls` into a pipe also does without
    rich's console and text, the demo's options and thread pools (together a quarter of
    what was left). A guard against imports creeping back onto this path, not a timing."""
    probe = (
        "import sys\n"
        "from loopstore.cli import main\n"
        "code = main(sys.argv[2:])\n"
        "print(code, *sorted(set(sys.argv[1].split(',')) & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, ",".join(heavy), "--root", str(root), *command],
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
    )
    assert done.stdout.splitlines()[-1] == "0"


def test_reindex_rebuilds_the_catalog_and_names_damaged_sessions(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    done = run_json(capsys, "--root", str(root), "reindex")
    assert done == {"root": str(root), "ok": True, "sessions": 4, "damaged": []}
    Layout(root).catalog.unlink()  # a cache: listings rebuild it when it is gone
    assert len(run_json(capsys, "--root", str(root), "ls")["sessions"]) == 4
    corrupt_manifest(root)  # after the catalog was built: reindex sees it
    code, out, err = run(capsys, "--root", str(root), "reindex", "--json")
    assert code == 1
    doc = json.loads(out)
    assert (doc["ok"], doc["sessions"]) == (False, 3)
    assert [d["session_id"] for d in doc["damaged"]] == [THINKING]
    assert err.startswith(f"loopstore: warning: session {THINKING!r}: ") and err.count("\n") == 1
    code, out, err = run(capsys, "--root", str(root), "reindex")
    assert (code, out) == (1, "reindex: 3 sessions listed, 1 damaged\n") and THINKING in err
    code, out, _ = run(capsys, "--root", str(root), "ls", "--json")
    assert code == 1 and THINKING not in {r["session_id"] for r in json.loads(out)["sessions"]}


def test_cat_builds_no_model(
    capsysbinary: pytest.CaptureFixture[bytes], any_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cat` prints the stored bytes: no pydantic model is built on the way."""
    from loopstore.models import LoopRecord

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("cat built a model")

    for cls in (Session, LoopRecord):
        for name in ("model_validate", "model_validate_json"):
            monkeypatch.setattr(cls, name, no_model)
    monkeypatch.setattr(SessionStore, "load", no_model)
    monkeypatch.setattr(SessionStore, "load_loop", no_model)
    fixture = FIXTURES_DIR / f"{PARENT}.json"
    assert cli.main(["--root", any_root, "cat", PARENT]) == 0
    assert capsysbinary.readouterr().out == fixture.read_bytes()
    assert cli.main(["--root", any_root, "cat", PARENT, "-1"]) == 0
    loop = json.loads(capsysbinary.readouterr().out)
    assert loop == json.loads(fixture.read_bytes())["loops"][-1]


# --- journals: show, checkpoint; migrate -----------------------------------------------------


# Filesystem only: on S3 a new session's first commit is folded at once (FORMAT.md 7),
# so these sessions have no journal to show or fold (the S3 test below runs checkpoint).
def test_checkpoint_folds_journals_so_blobs_are_files(
    capsys: pytest.CaptureFixture[str], journaled: Path
) -> None:
    shown = run_json(capsys, "--root", str(journaled), "show", PARENT)
    assert shown["journal_records"] >= 1
    code, out, _ = run(capsys, "--root", str(journaled), "show", PARENT)
    assert code == 0 and "journal record" in out and "not yet folded" in out
    loops_dir = Layout(journaled).loops_dir(PARENT)
    assert not loops_dir.exists() or not any(loops_dir.iterdir())

    code, out, _ = run(capsys, "--root", str(journaled), "checkpoint", PARENT)
    assert (code, out) == (
        0,
        f"checkpointed {PARENT}\ncheckpoint: 1 session folded, 0 already at rest, 0 failed\n",
    )
    assert run_json(capsys, "--root", str(journaled), "show", PARENT)["journal_records"] == 0
    assert len(list(loops_dir.iterdir())) == 1
    code, out, _ = run(capsys, "--root", str(journaled), "show", PARENT)
    assert "storage:     generation" in out and "at rest" in out

    # named sessions: each is tried, the first failure's code is the exit code
    code, out, err = run(capsys, "--root", str(journaled), "checkpoint", "nope", PARENT)
    assert code == 3 and f"at rest {PARENT}" in out
    assert err.count("\n") == 1 and "session 'nope': not found" in err

    everything = run_json(capsys, "--root", str(journaled), "checkpoint", "--all")
    assert sorted(everything["checkpointed"]) == sorted([CHILD, THINKING, TREE])
    assert (everything["at_rest"], everything["failed"], everything["ok"]) == ([PARENT], [], True)
    assert run_json(capsys, "--root", str(journaled), "stats")["journal_records"] == 0
    assert run_json(capsys, "--root", str(journaled), "verify")["ok"] is True


V1_STORE = FIXTURES_DIR.parent / "v1-store"


def test_migrate_upgrades_a_v1_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "v1"
    shutil.copytree(V1_STORE, root)
    first = run_json(capsys, "--root", str(root), "migrate")
    assert (first["sessions"], first["upgraded"], first["current"]) == (4, 4, 0)
    assert (first["ok"], first["problems"], first["format_version"]) == (True, [], 2)
    code, out, _ = run(capsys, "--root", str(root), "migrate")
    assert (code, out) == (
        0,
        "migrate: 4 sessions: 0 upgraded to format v2, 4 already v2, 0 problems\n",
    )
    for path in fixture_paths():
        assert run(capsys, "--root", str(root), "verify", path.stem)[0] == 0


# --- stats and verify agree; gc, import, backup report what they left -------------------------


def test_stats_and_verify_agree(
    capsys: pytest.CaptureFixture[str], any_root: str, stores: StoreFactory
) -> None:
    stores.raw().write(blob_key(PARENT, "0" * 32), b"not referenced")
    stats = run_json(capsys, "--root", any_root, "stats")
    report = run_json(capsys, "--root", any_root, "verify")
    assert stats["sessions"] + stats["damaged"] == report["sessions_checked"] == 4
    assert stats["blobs"] == report["blobs_checked"] == 10
    assert stats["orphans"] == len(report["orphans"]) == 1
    corrupt_manifest(stores.raw())
    code, out, _ = run(capsys, "--root", any_root, "stats", "--json")
    stats = json.loads(out)
    code, out, _ = run(capsys, "--root", any_root, "verify", "--json")
    report = json.loads(out)
    assert stats["sessions"] + stats["damaged"] == report["sessions_checked"] == 4
    assert stats["orphans"] == len(report["orphans"]) == 1
    assert stats["damaged"] == report["damaged_sessions"] == 1
    # ... and people see the same numbers
    code, out, _ = run(capsys, "--root", any_root, "stats")
    assert code == 1 and "sessions: 4  (3 readable, 1 damaged" in out and "orphans:  1  " in out
    code, out, _ = run(capsys, "--root", any_root, "verify")
    assert code == 1 and out.splitlines()[-1].startswith("DAMAGED: 4 sessions (1 damaged), ")
    assert out.splitlines()[-1].endswith(", 1 problem, 1 orphan")


def test_import_conflicts_keep_the_store_unless_overwrite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stores: StoreFactory
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(FIXTURES_DIR / f"{PARENT}.json", files)
    store_dir = stores.location("store")
    assert run_json(capsys, "--root", store_dir, "import-legacy", str(files))["imported"] == [
        PARENT
    ]
    store = stores("store", durable=False)
    store.append_loop(PARENT, make_loop(PARENT, 5, agent_id=store.load(PARENT).agent_id))
    code, out, _ = run(capsys, "--root", store_dir, "import-legacy", str(files), "--json")
    doc = json.loads(out)
    assert code == 1 and (doc["ok"], doc["conflicts"], doc["updated"]) == (False, [PARENT], [])
    assert len(store.load(PARENT).loops) == 2  # the store's extra loop is kept
    code, out, _ = run(capsys, "--root", store_dir, "import-legacy", str(files))
    assert code == 1 and f"CONFLICT session {PARENT!r}: " in out and "--overwrite" in out
    assert out.splitlines()[-1].endswith("1 conflict, 0 failed")
    forced = run_json(capsys, "--root", store_dir, "import-legacy", str(files), "--overwrite")
    assert (forced["ok"], forced["updated"], forced["conflicts"]) == (True, [PARENT], [])
    assert store.load_json(PARENT) == (files / f"{PARENT}.json").read_bytes()


def test_reimporting_the_same_files_changes_nothing(
    capsys: pytest.CaptureFixture[str], stores: StoreFactory
) -> None:
    store_dir = stores.location("store")
    first = run_json(capsys, "--root", store_dir, "import-legacy", str(FIXTURES_DIR))
    again = run_json(capsys, "--root", store_dir, "import-legacy", str(FIXTURES_DIR))
    assert sorted(again["unchanged"]) == sorted(first["imported"]) and again["ok"] is True


def test_backup_fails_a_damaged_source_session_and_keeps_its_copy(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "backup"
    assert run(capsys, "--root", str(root), "backup", str(dest))[0] == 0
    good = (FIXTURES_DIR / f"{THINKING}.json").read_bytes()
    store = FileSystemSessionStore(root, durable=False)  # a new loop: THINKING must be copied
    store.append_loop(THINKING, make_loop(THINKING, 3, agent_id=store.load(THINKING).agent_id))
    blob = a_blob(root, THINKING)  # ... and its old loop's blob is damaged
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.unlink()  # a new inode: the backup's copy is a hard link to the old one
    blob.write_bytes(bytes(data))
    code, out, _ = run(capsys, "--root", str(root), "backup", str(dest), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["backup"]["ok"] is False
    assert [f["session_id"] for f in doc["backup"]["failed"]] == [THINKING]
    assert doc["backup"]["sessions"] == 3
    code, out, _ = run(capsys, "--root", str(root), "backup", str(dest))
    assert code == 1 and f"FAILED session {THINKING!r}: " in out and "not backed up" in out
    assert run(capsys, "--root", str(dest), "verify")[0] == 0
    assert FileSystemSessionStore(dest).load_json(THINKING) == good


def test_backup_refuses_a_dest_that_is_not_a_store(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "photos"
    dest.mkdir()
    (dest / "cat.jpg").write_bytes(b"meow")
    code, out, err = run(capsys, "--root", str(root), "backup", str(dest))
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "not a loopstore store" in err and "cat.jpg" in err
    assert [p.name for p in dest.iterdir()] == ["cat.jpg"]


# --- one broken session does not blind store-wide commands -----------------------------------

VICTIM = THINKING


def break_by_permission(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The victim's files cannot be read (EACCES). Root ignores permission bits, so this
    goes through `loopstore.atomic.read_file`, the documented seam for reads."""
    real = atomic.read_file
    victim_dir = str(Layout(root).session_dir(VICTIM).resolve())

    def read_file(dir_fd: int | None, name: str | Path) -> bytes:
        where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        full = os.path.join(where, os.fspath(name))
        if full == victim_dir or full.startswith(victim_dir + os.sep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(name))
        return real(dir_fd, name)

    monkeypatch.setattr(atomic, "read_file", read_file)
    return "Permission denied"


def break_by_symlink(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The victim's loops/ is a symlink out of the store, and its last commit is still in
    its journal (so folding it must write through loops/)."""
    store = FileSystemSessionStore(root, durable=False)
    agent = store.session_info(VICTIM).agent_id or "agent-test"
    store.append_loop(VICTIM, make_loop(VICTIM, 7, agent_id=agent))
    store.close()
    loops = Layout(root).loops_dir(VICTIM)
    outside = root.parent / "outside"
    shutil.move(loops, outside)
    loops.symlink_to(outside, target_is_directory=True)
    return "symlink"


def others_in(doc: dict[str, Any], *keys: str) -> set[str]:
    rows: Any = doc
    for key in keys:
        rows = rows[key]
    return {r if isinstance(r, str) else r["session_id"] for r in rows}


OTHERS = {PARENT, CHILD, TREE}


def verify_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert doc["sessions_checked"] == 4 and others_in(doc, "problems") == {VICTIM}


def stats_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert (doc["sessions"], doc["damaged"]) == (3, 1)
    assert others_in(doc, "problems") == {VICTIM}


def gc_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert doc["sessions_scanned"] == 4 and others_in(doc, "problems") == {VICTIM}


def backup_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert doc["backup"]["sessions"] == 3 and others_in(doc, "backup", "failed") == {VICTIM}
    assert set(FileSystemSessionStore(tmp / "backup").list_ids()) == OTHERS


def export_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert others_in(doc, "exported") == OTHERS and others_in(doc, "failed") == {VICTIM}
    assert {p.stem for p in (tmp / "out").iterdir()} == OTHERS


def checkpoint_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert set(doc["checkpointed"]) | set(doc["at_rest"]) == OTHERS
    assert others_in(doc, "failed") == {VICTIM}


def migrate_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert (doc["sessions"], doc["current"]) == (4, 3)
    assert others_in(doc, "problems") == {VICTIM}


def ls_went_on(doc: dict[str, Any], tmp: Path) -> None:
    assert others_in(doc, "sessions") == OTHERS and others_in(doc, "damaged") == {VICTIM}


STORE_WIDE: dict[str, tuple[list[str], Callable[[dict[str, Any], Path], None]]] = {
    "verify": (["verify"], verify_went_on),
    "stats": (["stats"], stats_went_on),
    "gc": (["gc", "--grace", "0"], gc_went_on),
    "backup": (["backup", "{tmp}/backup"], backup_went_on),
    "export-legacy --all": (["export-legacy", "--all", "{tmp}/out"], export_went_on),
    "checkpoint --all": (["checkpoint", "--all"], checkpoint_went_on),
    "migrate": (["migrate"], migrate_went_on),
    "ls": (["ls"], ls_went_on),
}

# `ls` and `migrate` read sessions' indexes only (the catalog; the checkpoint's version),
# which a symlinked loops/ leaves readable: there is nothing for them to report.
CASES = [(name, break_by_permission) for name in STORE_WIDE] + [
    (name, break_by_symlink) for name in STORE_WIDE if name not in ("ls", "migrate")
]


@pytest.mark.parametrize(
    ("command", "breakage"), CASES, ids=[f"{c}-{b.__name__[9:]}" for c, b in CASES]
)
def test_a_broken_session_does_not_blind_store_wide_commands(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    breakage: Callable[[Path, pytest.MonkeyPatch], str],
) -> None:
    """The broken session is reported with its cause, the others are done, --json prints
    its whole document, and the exit code says something was wrong."""
    cause = breakage(root, monkeypatch)
    argv, carried_on = STORE_WIDE[command]
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run(capsys, "--root", str(root), *args, "--json")
    assert code == 1, err
    doc = json.loads(out)  # the whole document, damage included
    assert VICTIM in out and cause in out
    carried_on(doc, tmp_path)
    code, out, err = run(capsys, "--root", str(root), *args)
    assert code == 1
    said = [line for line in (out + err).splitlines() if VICTIM in line]
    assert said and any(cause in line for line in said), out + err


# --- object-store locations --------------------------------------------------------------------

URL = "s3://bucket/team/store"


@pytest.fixture
def s3_routes(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, dict[str, Any]]]:
    """s3:// locations served by local stores through `loopstore.locations` (the one
    door the CLI opens stores by): URL is the `root` store, other prefixes are new."""
    from loopstore import locations

    places = {URL: root}
    opened: list[tuple[str, dict[str, Any]]] = []

    def open_store(location: str, **options: Any) -> FileSystemSessionStore:
        opened.append((location, options))
        assert location.startswith("s3://"), location
        path = places.setdefault(location, tmp_path / location.removeprefix("s3://"))
        return FileSystemSessionStore(path, **options)

    def store_exists(location: str) -> bool:
        return location in places and Layout(places[location]).marker.is_file()

    monkeypatch.setattr(locations, "open_store", open_store)
    monkeypatch.setattr(locations, "store_exists", store_exists, raising=False)
    return opened


def test_an_s3_root_goes_through_open_store(
    capsys: pytest.CaptureFixture[str],
    s3_routes: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listing = run_json(capsys, "--root", URL, "ls")
    assert listing["root"] == URL and len(listing["sessions"]) == 4
    assert run(capsys, "--root", URL, "verify")[0] == 0
    assert run(capsys, "--root", URL, "--lock-timeout", "0.5", "rm", CHILD)[0] == 0
    assert s3_routes[-1] == (URL, {"lock_timeout": 0.5})
    monkeypatch.setenv("LOOPSTORE_ROOT", URL)
    assert run_json(capsys, "stats")["root"] == URL
    backup = run_json(capsys, "backup", "s3://bucket/backups/nightly", "--verify")
    assert backup["backup"]["dest"] and backup["verify"]["in_sync"] is True
    assert ("s3://bucket/backups/nightly", {"lock_timeout": 60.0}) in s3_routes
    # a prefix without a store: reading commands say so and create nothing
    code, out, err = run(capsys, "--root", "s3://bucket/typo", "show", PARENT)
    assert (code, out) == (3, "") and "no loopstore store at s3://bucket/typo" in err
    assert run_json(capsys, "--root", "s3://bucket/typo", "ls")["exists"] is False
    assert not [loc for loc, _ in s3_routes if loc == "s3://bucket/typo"]
    code, _, err = run(capsys, "--root", URL, "demo", "--fresh")
    assert code == 2 and err.count("\n") == 1 and "directory store" in err


def test_an_s3_root_on_a_real_server(
    capsys: pytest.CaptureFixture[str],
    seaweedfs: Any,
    s3_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the test above checks through the routing fake, on a real SeaweedFS: --root
    and LOOPSTORE_ROOT as s3:// URLs (endpoint and credentials from AWS_*), backups both
    ways, checkpoint and gc on the bucket, and a prefix without a store left empty."""
    from loopstore.locations import open_store

    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    base = f"s3://{seaweedfs.bucket}/{s3_prefix}"
    url = base + "team/store"
    save_all(open_store(url), at_rest=True).close()
    listing = run_json(capsys, "--root", url, "ls")
    assert listing["root"] == url and len(listing["sessions"]) == 4
    assert run(capsys, "--root", url, "verify")[0] == 0
    assert run(capsys, "--root", url, "--lock-timeout", "0.5", "rm", CHILD)[0] == 0
    monkeypatch.setenv("LOOPSTORE_ROOT", url)
    assert run_json(capsys, "stats")["root"] == url
    nightly = base + "backups/nightly"
    backup = run_json(capsys, "backup", nightly, "--verify")
    assert backup["backup"]["dest"] == nightly and backup["verify"]["in_sync"] is True
    restored = tmp_path / "restored"  # and back out of the bucket, into a directory
    back = run_json(capsys, "--root", nightly, "backup", str(restored), "--verify")
    assert back["backup"]["sessions"] == 3 and back["verify"]["in_sync"] is True
    copy = run_json(capsys, "--root", str(restored), "ls")["sessions"]
    assert {r["session_id"] for r in copy} == {PARENT, THINKING, TREE}
    assert run_json(capsys, "checkpoint", "--all")["failed"] == []
    assert run_json(capsys, "gc", "--grace", "0")["ok"] is True  # (CHILD's tombstone)
    assert run_json(capsys, "verify")["orphans"] == []
    # a prefix without a store: reading commands say so and create nothing
    typo = base + "typo"
    code, out, err = run(capsys, "--root", typo, "show", PARENT)
    assert (code, out) == (3, "") and f"no loopstore store at {typo}" in err
    assert run_json(capsys, "--root", typo, "ls")["exists"] is False
    assert S3Raw(seaweedfs.client_kwargs(), seaweedfs.bucket, s3_prefix + "typo/").ls() == []
    code, _, err = run(capsys, "--root", url, "demo", "--fresh")
    assert code == 2 and err.count("\n") == 1 and "directory store" in err


def test_an_unknown_url_scheme_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--root", "ftp://host/store", "ls")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "ftp://host/store" in err and "scheme" in err


# --- the real console script --------------------------------------------------------------------


def test_console_script_end_to_end(any_root: str, stores: StoreFactory) -> None:
    env = subprocess_env(LOOPSTORE_ROOT=any_root, **stores.env)
    version = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, env=env)
    assert (version.returncode, version.stdout) == (0, f"loopstore {loopstore.__version__}\n")

    listing = subprocess.run([SCRIPT, "ls", "--json"], capture_output=True, env=env, check=True)
    assert len(json.loads(listing.stdout)["sessions"]) == 4

    cat = subprocess.run([SCRIPT, "cat", PARENT], capture_output=True, env=env, check=True)
    assert cat.stdout == (FIXTURES_DIR / f"{PARENT}.json").read_bytes()

    shown = subprocess.run([SCRIPT, "tree", TREE], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and ANSI_ESCAPE not in shown.stdout and "winner" in shown.stdout

    missing = subprocess.run([SCRIPT, "show", "nope"], capture_output=True, text=True, env=env)
    assert missing.returncode == 3 and missing.stdout == ""
    assert missing.stderr.startswith("loopstore: error: session 'nope': not found")
    assert missing.stderr.count("\n") == 1


def test_console_script_verify_damage_and_usage(root: Path) -> None:
    corrupt_delete(root)
    env = subprocess_env()
    verify = subprocess.run(
        [SCRIPT, "--root", str(root), "verify", "--json"], capture_output=True, env=env
    )
    assert verify.returncode == 1
    assert json.loads(verify.stdout)["problems"][0]["session_id"] == CHILD
    usage = subprocess.run([SCRIPT, "lss"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["ls"],
        ["ls", "--json"],
        ["tree", TREE],
        ["cat", PARENT],
        ["show", PARENT],
        ["stats"],
        ["verify", "--json"],
        ["--help"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_closed_stdout_ends_quietly_with_0(root: Path, argv: list[str]) -> None:
    """`loopstore ls | head -1`: the reader is gone before the first write (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [SCRIPT, "--root", str(root), *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


def run_on_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Run the script with stdout and stderr on a pseudo-terminal; returns what it drew."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, timeout=60
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert proc.returncode == 0
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(root: Path) -> None:
    argv = [str(SCRIPT), "--root", str(root), "tree", TREE]
    drawn = run_on_terminal(argv, subprocess_env(TERM="xterm-256color"))
    assert ANSI_ESCAPE in drawn and "winner" in drawn
    plain_text = run_on_terminal(argv, subprocess_env(TERM="xterm-256color", NO_COLOR="1"))
    assert ANSI_ESCAPE not in plain_text and "winner" in plain_text


def test_progress_on_a_terminal_leaves_the_report_readable(journaled: Path) -> None:
    """Store-wide commands draw progress on a terminal (stderr); the report still reads."""
    env = subprocess_env(TERM="xterm-256color", NO_COLOR="1")
    drawn = run_on_terminal([str(SCRIPT), "--root", str(journaled), "checkpoint", "--all"], env)
    assert "checkpoint: 4 sessions folded, 0 already at rest, 0 failed" in drawn
    drawn = run_on_terminal([str(SCRIPT), "--root", str(journaled), "reindex"], env)
    assert "reindex: 4 sessions listed, 0 damaged" in drawn
    drawn = run_on_terminal([str(SCRIPT), "--root", str(journaled), "verify"], env)
    assert "ok: 4 sessions, 10 blobs checked, 0 problems, 0 orphans" in drawn
