"""Writer programs of the power-loss harness (`stress.powerloss`) and its scenario catalog.

Run as ``python -m stress.powerloss_writers PROGRAM ROOT [options]`` (the harness does, under
strace). A program drives the store at ROOT through its public API only. Around every call
it prints, with one ``write(2)`` on fd 1 each:

* ``BEGIN {"w", "n", "call", "sid", "after", "desc"}`` before the call starts; ``after`` is
  the session's state should the call complete (`stress.powerloss.SessionState` as JSON,
  null for "absent"), predicted from the writer's own model of the session;
* ``ACK {"w", "n"}`` right after it returned (``FAIL`` with the error if it raised);
* ``MISMATCH`` if reading the session back disagrees with the prediction.

Where these lines fall among the file-system operations of the trace orders every
acknowledgement against them. Loops are small (a few KB) so traces stay manageable.

`catalog` lists the scenarios (store to start from, writers to trace, kill points), in a
short and a long flavour (`SHORT`, `LONG`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from stress.powerloss import (
    REPO,
    Budget,
    ModelSession,
    PowerLossScenario,
    WriterRun,
    kill_before_dir_sync_after_replace_in,
    kill_before_parent_sync_of_new_entry,
    predict_append,
    state_of,
)

if TYPE_CHECKING:
    from loopstore.models import LoopRecord, Session
    from loopstore.store import FileSystemSessionStore

LOOP_BYTES: Final = 600
"""Text per synthetic loop: a loop's JSON is then about 2 KB, its blob well under 1 KB."""
RECOVERY_LOOP_INDEX: Final = 100_000


# --------------------------------------------------------------------------- builders


def _helpers() -> Any:
    """tests/helpers.py (the project's session builders), imported from the checkout."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("helpers")


def make_loop(session_id: str, index: int, *, text_bytes: int = LOOP_BYTES) -> LoopRecord:
    """A small realistic loop; loop_id ``{session_id}.test.{index + 1}``.

    The same index with another `text_bytes` gives another version of the same loop.
    """
    return cast("LoopRecord", _helpers().make_loop(session_id, index, text_bytes=text_bytes))


def make_session(session_id: str, n_loops: int) -> Session:
    return cast("Session", _helpers().make_session(session_id, n_loops))


def fresh_loop(session_id: str, salt: int) -> LoopRecord:
    """The loop the checker appends to prove a recovered store is writable (a new id,
    later than every loop a writer appends)."""
    return make_loop(session_id, RECOVERY_LOOP_INDEX + salt, text_bytes=200)


def open_store(root: Path | str, *, durable: bool = True) -> FileSystemSessionStore:
    from loopstore.store import FileSystemSessionStore

    return FileSystemSessionStore(root, durable=durable)


# --------------------------------------------------------------------------- the writer


def _emit(kind: str, **payload: Any) -> None:
    line = f"{kind} {json.dumps(payload, separators=(',', ':'), sort_keys=True)}\n"
    data = line.encode()
    while data:
        n = os.write(1, data)
        data = data[n:]


class Writer:
    """Calls the store, predicting each call's outcome and printing BEGIN/ACK around it."""

    def __init__(
        self,
        name: str,
        store: FileSystemSessionStore,
        sessions: Sequence[str],
        *,
        readback: str = "each",
    ) -> None:
        self.name = name
        self.store = store
        self.readback = readback
        self.n = 0
        self.model: dict[str, ModelSession | None] = {}
        for sid in sessions:
            session = self._load(sid)
            self.model[sid] = ModelSession.of(session) if session is not None else None
            _emit("INIT", w=name, sid=sid, state=_state_json(self.model[sid]))

    def _load(self, sid: str) -> Session | None:
        from loopstore.errors import SessionNotFound

        try:
            return self.store.load(sid)
        except SessionNotFound:
            return None

    def _call(
        self, call: str, sid: str, after: ModelSession | None, fn: Callable[[], object], desc: str
    ) -> None:
        self.n += 1
        n = self.n
        _emit("BEGIN", w=self.name, n=n, call=call, sid=sid, after=_state_json(after), desc=desc)
        try:
            fn()
        except Exception as exc:
            _emit("FAIL", w=self.name, n=n, error=f"{type(exc).__name__}: {exc}")
            raise
        _emit("ACK", w=self.name, n=n)
        self.model[sid] = after
        if self.readback == "each":
            self.check(sid)

    def check(self, sid: str) -> None:
        """Read the session back; print MISMATCH if it is not what was predicted."""
        want = self.model.get(sid)
        got = state_of(self._load(sid))
        exp = want.state() if want is not None else None
        if got != exp:
            _emit(
                "MISMATCH",
                w=self.name,
                sid=sid,
                got=None if got is None else got.to_json(),
                want=None if exp is None else exp.to_json(),
            )

    def check_all(self) -> None:
        for sid in sorted(self.model):
            self.check(sid)

    # -- calls -----------------------------------------------------------------------

    def append_loop(self, sid: str, loop: LoopRecord, *, session: Session | None = None) -> None:
        after = predict_append(self.model.get(sid), sid, loop, session)
        self._call(
            "append_loop",
            sid,
            after,
            lambda: self.store.append_loop(sid, loop, session=session),
            loop.loop_id,
        )

    def save(self, session: Session) -> None:
        after = ModelSession.of(session)
        self._call("save", session.session_id, after, lambda: self.store.save(session), "")

    def update(self, sid: str, fn: Callable[[Session], Session | None], desc: str) -> None:
        current = self._load(sid)
        if current is None:
            raise RuntimeError(f"update of missing session {sid!r}")
        result = fn(current)
        after = ModelSession.of(result if result is not None else current)
        self._call("update", sid, after, lambda: self.store.update(sid, fn), desc)

    def delete(self, sid: str) -> None:
        self._call("delete", sid, None, lambda: self.store.delete(sid), "")


def _state_json(m: ModelSession | None) -> dict[str, Any] | None:
    return None if m is None else m.state().to_json()


# --------------------------------------------------------------------------- programs


def _promote_and_append(s: Session) -> None:
    from loopstore.models import SessionScope

    s.scope = SessionScope.PERSISTENT
    s.loops.append(make_loop(s.session_id, 50))


def _drop_first_loop(s: Session) -> None:
    s.loops.pop(0)


def prog_first_append(w: Writer, ns: argparse.Namespace) -> None:
    """A new session from its first loop; another one with an explicit header."""
    w.append_loop("s1", make_loop("s1", 0))
    w.append_loop("s2", make_loop("s2", 0), session=make_session("s2", 0))


def prog_appends(w: Writer, ns: argparse.Namespace) -> None:
    """`count` appends to an existing session (loops from index `offset` on)."""
    for i in range(ns.count):
        w.append_loop("s", make_loop("s", ns.offset + i))


def prog_replace(w: Writer, ns: argparse.Namespace) -> None:
    """append_loop with existing loop ids: two real replaces, then an identical one."""
    w.append_loop("s", make_loop("s", 1, text_bytes=LOOP_BYTES + 177))
    w.append_loop("s", make_loop("s", 0, text_bytes=LOOP_BYTES + 55))
    w.append_loop("s", make_loop("s", 0, text_bytes=LOOP_BYTES + 55))


def prog_save(w: Writer, ns: argparse.Namespace) -> None:
    """save() of a grown session, the same again (unchanged), a shrunk one, a new one."""
    w.save(make_session("s", 4))
    w.save(make_session("s", 4))
    w.save(make_session("s", 3))
    w.save(make_session("t", 2))


def prog_save_unchanged(w: Writer, ns: argparse.Namespace) -> None:
    """save(load(s)) twice: nothing to write."""
    for _ in range(2):
        w.save(w.store.load("s"))


def prog_update(w: Writer, ns: argparse.Namespace) -> None:
    """update(): promote and append inside fn; then drop the first loop."""
    w.update("s", _promote_and_append, "promote + append")
    w.update("s", _drop_first_loop, "drop first loop")


def prog_delete(w: Writer, ns: argparse.Namespace) -> None:
    """delete(), then a new session under the same id (nothing of the old may return)."""
    w.delete("s")
    w.append_loop("s", make_loop("s", 7))


def prog_interleaved(w: Writer, ns: argparse.Namespace) -> None:
    """Appends alternating between two sessions."""
    for i in range(ns.count):
        w.append_loop("a", make_loop("a", 2 + i))
        w.append_loop("b", make_loop("b", 2 + i))


def prog_kill_new_session_a(w: Writer, ns: argparse.Namespace) -> None:
    """Issue 10 (1), writer A: the first append_loop of session s (killed inside)."""
    w.append_loop("s", make_loop("s", 0))


def prog_kill_new_session_b(w: Writer, ns: argparse.Namespace) -> None:
    """Issue 10 (1), writer B: the restarted worker does its append again."""
    w.append_loop("s", make_loop("s", 0))


def prog_kill_manifest_a(w: Writer, ns: argparse.Namespace) -> None:
    """Issue 10 (2), writer A: an append to s (killed after the manifest was replaced)."""
    w.append_loop("s", make_loop("s", 2))


def prog_kill_manifest_b(w: Writer, ns: argparse.Namespace) -> None:
    """Issue 10 (2), writer B: an unchanged save(load(s)), then the identical append."""
    w.save(w.store.load("s"))
    w.append_loop("s", make_loop("s", 2))


PROGRAMS: Final[dict[str, tuple[Callable[[Writer, argparse.Namespace], None], tuple[str, ...]]]] = {
    "first-append": (prog_first_append, ("s1", "s2")),
    "appends": (prog_appends, ("s",)),
    "replace": (prog_replace, ("s",)),
    "save": (prog_save, ("s", "t")),
    "save-unchanged": (prog_save_unchanged, ("s",)),
    "update": (prog_update, ("s",)),
    "delete": (prog_delete, ("s",)),
    "interleaved": (prog_interleaved, ("a", "b")),
    "kill-new-session-a": (prog_kill_new_session_a, ("s",)),
    "kill-new-session-b": (prog_kill_new_session_b, ("s",)),
    "kill-manifest-a": (prog_kill_manifest_a, ("s",)),
    "kill-manifest-b": (prog_kill_manifest_b, ("s",)),
}
"""Program name -> (body, sessions it touches)."""


# --------------------------------------------------------------------------- fsync counting


def count_appends(root: str, ns: argparse.Namespace) -> None:
    """`count` appends to session s with bare BEGIN/ACK markers (no prediction, no reads)."""
    store = open_store(root)
    loops = [make_loop("s", ns.offset + i) for i in range(ns.count)]
    if ns.go:
        Path(ns.go + f".ready-{ns.writer}").write_text("")
        deadline = time.monotonic() + 120
        while not os.path.exists(ns.go):
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            time.sleep(0.002)
    for i, loop in enumerate(loops, 1):
        _emit("BEGIN", w=ns.writer, n=i)
        store.append_loop("s", loop)
        _emit("ACK", w=ns.writer, n=i)
    store.close()


def count_concurrent(root: str, ns: argparse.Namespace) -> None:
    """`procs` processes run count-appends on session s at once (released together)."""
    go = str(Path(root).parent / "go")
    children = []
    for p in range(ns.procs):
        argv = [
            sys.executable,
            "-m",
            "stress.powerloss_writers",
            "count-appends",
            root,
            "--writer",
            f"P{p}",
            "--count",
            str(ns.count),
            "--offset",
            str(1000 * (p + 1)),
            "--go",
            go,
        ]
        children.append(subprocess.Popen(argv, cwd=REPO))
    deadline = time.monotonic() + 120
    while not all(os.path.exists(f"{go}.ready-P{p}") for p in range(ns.procs)):
        if time.monotonic() > deadline or any(c.poll() is not None for c in children):
            break
        time.sleep(0.005)
    Path(go).write_text("")
    codes = [c.wait(timeout=600) for c in children]
    if any(codes):
        raise SystemExit(f"children exited {codes}")


# --------------------------------------------------------------------------- scenarios


def setup_nothing(root: Path) -> None:
    """An empty directory: the writer creates the store."""


def setup_store(root: Path) -> None:
    """An empty store."""
    open_store(root, durable=False).close()


def setup_sessions(*specs: tuple[str, int], appended: int = 0) -> Callable[[Path], None]:
    """A store with sessions (id, loops) saved; `appended` more loops appended to the first."""

    def setup(root: Path) -> None:
        store = open_store(root, durable=False)
        try:
            for sid, n in specs:
                store.save(make_session(sid, n))
            if appended:
                sid, n = specs[0]
                for i in range(appended):
                    store.append_loop(sid, make_loop(sid, n + i))
        finally:
            store.close()

    return setup


@dataclass(frozen=True)
class Params:
    """Sizes of the scenarios (`SHORT` for the test suite, `LONG` for ``python -m stress``)."""

    appends: int = 5
    interleaved: int = 2
    checkpoint_appends: int = 300
    """Traced appends of the checkpoint scenario: enough to cross a fold of the journal into
    a checkpoint (format v2 folds every few hundred records); all of them are traced, since
    a fold during an untraced prefill would leave too few records to cross another."""
    checkpoint_prefill: int = 0
    """Loops appended (untraced) to the session before the checkpoint scenario's run."""
    durable: bool = True
    """False runs the writers with durable=False: a store that must fail (negative control)."""


SHORT: Final = Params()
LONG: Final = Params(appends=40, interleaved=10, checkpoint_appends=400)

BUG_SCENARIOS: Final = ("kill-new-session", "kill-manifest")
"""The kill-restart-power-loss sequences of issue 10 (they fail on format v1)."""


def _run(label: str, program: str, *args: str, kill: Any = None, params: Params) -> WriterRun:
    extra = () if params.durable else ("--durable", "0")
    return WriterRun(label, (program, "--writer", label, *args, *extra), kill)


def catalog(params: Params = SHORT) -> dict[str, PowerLossScenario]:
    """Every power-loss scenario, by name."""
    p = params

    def sc(
        name: str,
        description: str,
        sessions: tuple[str, ...],
        setup: Callable[[Path], None],
        *runs: WriterRun,
        bug: bool = False,
        short_budget: Budget | None = None,
        long_budget: Budget | None = None,
    ) -> PowerLossScenario:
        return PowerLossScenario(
            name, description, sessions, setup, runs, fresh_loop, bug, short_budget, long_budget
        )

    prefill = p.checkpoint_prefill
    return {
        "first-append": sc(
            "first-append",
            "first append_loop of new sessions, starting from an empty directory",
            ("s1", "s2"),
            setup_nothing,
            _run("A", "first-append", params=p),
        ),
        "appends": sc(
            "appends",
            f"{p.appends} appends to an existing session",
            ("s",),
            setup_sessions(("s", 2)),
            _run("A", "appends", "--count", str(p.appends), "--offset", "2", params=p),
        ),
        "appends-checkpoint": sc(
            "appends-checkpoint",
            f"{p.checkpoint_appends} appends (after {prefill} untraced ones): enough to "
            "cross the journal's fold into a checkpoint",
            ("s",),
            setup_sessions(("s", 1), appended=prefill),
            _run(
                "A",
                "appends",
                "--count",
                str(p.checkpoint_appends),
                "--offset",
                str(1 + prefill),
                "--readback",
                "end",
                params=p,
            ),
            # Each check loads a few hundred loops twice: sample fewer states.
            short_budget=Budget(max_points=5, max_states_per_point=3),
            long_budget=Budget(mode="long", max_points=200, max_family=16, max_checks=300),
        ),
        "replace": sc(
            "replace",
            "append_loop replacing loops in place (and one identical replace)",
            ("s",),
            setup_sessions(("s", 3)),
            _run("A", "replace", params=p),
        ),
        "save": sc(
            "save",
            "save() of a grown, an unchanged, a shrunk and a new session",
            ("s", "t"),
            setup_sessions(("s", 2)),
            _run("A", "save", params=p),
        ),
        "save-unchanged": sc(
            "save-unchanged",
            "save(load(s)) of an unchanged session",
            ("s",),
            setup_sessions(("s", 2)),
            _run("A", "save-unchanged", params=p),
        ),
        "update": sc(
            "update",
            "update() appending inside fn, then dropping a loop",
            ("s",),
            setup_sessions(("s", 2)),
            _run("A", "update", params=p),
        ),
        "delete": sc(
            "delete",
            "delete(), then a new session with the same id",
            ("s",),
            setup_sessions(("s", 3)),
            _run("A", "delete", params=p),
        ),
        "interleaved": sc(
            "interleaved",
            f"{p.interleaved} appends to each of two sessions, alternating",
            ("a", "b"),
            setup_sessions(("a", 2), ("b", 2)),
            _run("A", "interleaved", "--count", str(p.interleaved), params=p),
        ),
        "kill-new-session": sc(
            "kill-new-session",
            "issue 10 (1): A's first append_loop(s) killed after the session directory was "
            "created, before its parent was fsynced; B's append_loop(s) returns; power loss",
            ("s",),
            setup_store,
            _run(
                "A", "kill-new-session-a", kill=kill_before_parent_sync_of_new_entry("s"), params=p
            ),
            _run("B", "kill-new-session-b", params=p),
            bug=True,
        ),
        "kill-manifest": sc(
            "kill-manifest",
            "issue 10 (2): A killed after replacing the manifest, before the fsync of its "
            "directory; B's unchanged save(load(s)) and identical append_loop return; power loss",
            ("s",),
            setup_sessions(("s", 2)),
            _run("A", "kill-manifest-a", kill=kill_before_dir_sync_after_replace_in("s"), params=p),
            _run("B", "kill-manifest-b", params=p),
            bug=True,
        ),
    }


def with_params(params: Params, **changes: Any) -> Params:
    return replace(params, **changes)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stress.powerloss_writers")
    ap.add_argument(
        "program", choices=[*PROGRAMS, "count-appends", "count-concurrent"], help="what to run"
    )
    ap.add_argument("root", help="the store directory")
    ap.add_argument("--writer", default="A", help="writer name in the markers")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--offset", type=int, default=2, help="index of the first appended loop")
    ap.add_argument("--readback", choices=("each", "end", "none"), default="each")
    ap.add_argument("--durable", type=int, default=1)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--go", default="", help="count-appends: wait for this file to exist")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.program == "count-appends":
        count_appends(ns.root, ns)
        return 0
    if ns.program == "count-concurrent":
        count_concurrent(ns.root, ns)
        return 0
    body, sessions = PROGRAMS[ns.program]
    store = open_store(ns.root, durable=bool(ns.durable))
    try:
        w = Writer(ns.writer, store, sessions, readback=ns.readback)
        body(w, ns)
        if ns.readback != "none":
            w.check_all()
        _emit("DONE", w=ns.writer)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
