"""The random create / append / replace / update / delete / load workload and its checker.

Used by the *many sessions*, *kill -9* and *fault injection* scenarios. Each worker thread
*owns* a few sessions (only it writes them, so its log orders every write to them exactly and
the expected final state follows by replay), and every thread also appends to a few *shared*
sessions (appends of unique loop ids commute, so the expected loop set is exact even under
contention). Loads check the thread's own view while it runs; the parent replays all logs
afterwards and compares the whole store.

A state is the ordered list of (loop_id, tag) pairs of a session, or None when it is absent.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stress import faults
from stress.common import (
    AckLog,
    OpLogger,
    OpRecord,
    ScenarioResult,
    error_kind,
    injected,
    loop_tag,
    make_loop,
    make_session,
    open_store,
    ready_then_wait_for_go,
    session_state,
    start_and_join,
    thread_identity,
)

State = tuple[tuple[str, str], ...] | None
_ABSENT: State = None
WRITE_OPS = ("save", "append", "replace", "update", "delete", "shared_append")


def _to_state(pairs: list[Any] | None) -> State:
    if pairs is None:
        return None
    return tuple((str(a), str(b)) for a, b in pairs)


def apply_op(state: State, op: str, args: dict[str, Any]) -> State:
    """The state after `op` succeeded on `state` (the model of DESIGN §1)."""
    if op == "save":
        return _to_state(args["loops"])
    if op == "delete":
        return None
    lid, tag = args["lid"], args["tag"]
    if op in ("append", "update", "shared_append", "replace"):
        cur = list(state or ())
        for i, (existing, _) in enumerate(cur):
            if existing == lid:
                cur[i] = (lid, tag)
                return tuple(cur)
        cur.append((lid, tag))
        return tuple(cur)
    raise ValueError(op)


# ---------------------------------------------------------------- worker side


class OwnedThread:
    """One worker thread: its own sessions, the shared ones, and a log of what it did."""

    def __init__(
        self,
        store: Any,
        log_path: Path,
        writer: str,
        owned: list[str],
        shared: list[str],
        rng: random.Random,
        *,
        expect_faults: bool = False,
    ) -> None:
        self.store = store
        self.logger = OpLogger(AckLog(log_path))
        self.writer = writer
        self.owned = owned
        self.shared = shared
        self.rng = rng
        self.expect_faults = expect_faults
        self.model: dict[str, State] = {sid: None for sid in owned}
        self.shared_acked: dict[str, list[str]] = {sid: [] for sid in shared}
        self.seq = 0

    def _new_loop_id(self) -> tuple[str, str]:
        self.seq += 1
        lid = f"{self.writer}.{self.seq}"
        return lid, f"{lid}#0"

    def _new_tag(self, lid: str) -> str:
        self.seq += 1
        return f"{lid}#{self.seq}"

    def run(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline:
                self.step()
        finally:
            self.logger.log.close()

    def step(self) -> None:
        r = self.rng.random()
        if self.shared and r < 0.2:
            if self.rng.random() < 0.7:
                self._shared_append()
            else:
                self._shared_load()
            return
        sid = self.rng.choice(self.owned)
        state = self.model[sid]
        if state is None:
            choice = self.rng.choice(["save", "append", "append", "delete", "load"])
        else:
            choice = self.rng.choices(
                ["save", "append", "replace", "update", "delete", "load", "load_loop", "exists"],
                weights=[1, 4, 2, 2, 1, 2, 2, 1],
            )[0]
            if choice in ("replace", "load_loop") and not state:
                choice = "append"
        getattr(self, "_" + choice)(sid, state)

    # -- writes on owned sessions

    def _write(
        self, op: str, sid: str, state: State, args: dict[str, Any], call: Callable[[], Any]
    ) -> None:
        after = apply_op(state, op, args)
        faults.begin_op()
        n, t0 = self.logger.begin(op, sid=sid, **args)
        try:
            call()
        except Exception as exc:
            if op == "delete" and state is None and _is_not_found(exc):
                self.logger.ack(n, op, t0, notfound=True)
                return
            committed = faults.commit_passed()
            if getattr(exc, "maybe_committed", False):
                committed = True  # failed after its commit point (maybe in another process)
            if committed is None:  # no injection: only a lock timeout is known not to commit
                committed = error_kind(exc) != "SessionLocked"
            observed = self._observe(sid)
            self.logger.fail(n, op, t0, exc, committed=committed, observed=_dump(observed))
            allowed = [state, after] if committed else [state]
            if observed not in allowed and not (self.expect_faults and observed == "error"):
                self.logger.violation(
                    f"after failed {op} on {sid} ({error_kind(exc)}, commit point "
                    f"{'passed' if committed else 'not reached'}) the store holds {_dump(observed)}"
                    f", allowed {[_dump(a) for a in allowed]}"
                )
            if not isinstance(observed, str):
                self.model[sid] = observed
            return
        if op == "delete" and state is None:
            self.logger.ack(n, op, t0)
            self.logger.violation(
                f"delete of absent session {sid} returned instead of SessionNotFound"
            )
            return
        self.logger.ack(n, op, t0)
        self.model[sid] = after

    def _observe(self, sid: str) -> State | str:
        """Current state of an owned session after a failed write (its outcome may be unknown)."""
        with faults.suspended():
            try:
                return _to_state(session_state(self.store.load(sid)))
            except Exception as exc:
                if _is_not_found(exc):
                    return None
                self.logger.violation(
                    f"load of {sid} after a failed write raised {error_kind(exc)}: {exc}"
                )
                return "error"

    def _save(self, sid: str, state: State) -> None:
        keep = list(state or ())[: self.rng.randint(0, len(state or ()))]
        fresh = [self._new_loop_id() for _ in range(self.rng.randint(1, 3))]
        loops = keep + fresh
        session = make_session(sid, loops)
        self._write("save", sid, state, {"loops": loops}, lambda: self.store.save(session))

    def _append(self, sid: str, state: State) -> None:
        lid, tag = self._new_loop_id()
        loop = make_loop(sid, lid, tag)
        header = make_session(sid, []) if state is None else None
        self._write(
            "append",
            sid,
            state,
            {"lid": lid, "tag": tag},
            lambda: self.store.append_loop(sid, loop, session=header),
        )

    def _replace(self, sid: str, state: State) -> None:
        assert state
        lid = self.rng.choice(state)[0]
        tag = self._new_tag(lid)
        loop = make_loop(sid, lid, tag)
        self._write(
            "replace",
            sid,
            state,
            {"lid": lid, "tag": tag},
            lambda: self.store.append_loop(sid, loop),
        )

    def _update(self, sid: str, state: State) -> None:
        lid, tag = self._new_loop_id()
        loop = make_loop(sid, lid, tag)

        def fn(session: Any) -> Any:
            session.loops.append(loop)
            return session

        self._write(
            "update", sid, state, {"lid": lid, "tag": tag}, lambda: self.store.update(sid, fn)
        )

    def _delete(self, sid: str, state: State) -> None:
        self._write("delete", sid, state, {}, lambda: self.store.delete(sid))

    # -- reads on owned sessions: the thread knows the exact state

    def _load(self, sid: str, state: State) -> None:
        n, t0 = self.logger.begin("load", sid=sid)
        try:
            got: State = _to_state(session_state(self.store.load(sid)))
        except Exception as exc:
            if _is_not_found(exc):
                got = None
            else:
                self.logger.fail(n, "load", t0, exc)
                if not _read_fsync_fault(exc):
                    self.logger.violation(f"load {sid} raised {error_kind(exc)}: {exc}")
                return
        self.logger.ack(n, "load", t0)
        if got != state:
            self.logger.violation(
                f"load {sid}: got {_dump(got)}, the thread's model is {_dump(state)}"
            )

    def _read(self, op: str, what: str, fn: Callable[[], Any], **args: Any) -> tuple[bool, Any]:
        """A read that must not raise: (True, its value), or (False, None) with a violation.

        One failure is allowed: a read that found a commit not yet known durable (a
        writer failed after writing its record) fsyncs before it returns it, and an
        injected fsync error then fails the read with StorageError, as it must.
        """
        n, t0 = self.logger.begin(op, **args)
        try:
            value = fn()
        except Exception as exc:
            self.logger.fail(n, op, t0, exc)
            if not _read_fsync_fault(exc):
                self.logger.violation(f"{what} raised {error_kind(exc)}: {exc}")
            return False, None
        self.logger.ack(n, op, t0)
        return True, value

    def _load_loop(self, sid: str, state: State) -> None:
        assert state
        lid, tag = self.rng.choice(state)
        ok, loop = self._read(
            "load_loop",
            f"load_loop {sid}/{lid}",
            lambda: self.store.load_loop(sid, lid),
            sid=sid,
            lid=lid,
        )
        if ok and (loop.loop_id != lid or loop_tag(loop) != tag):
            self.logger.violation(
                f"load_loop {sid}/{lid}: got {loop.loop_id} tag {loop_tag(loop)}, want {tag}"
            )

    def _exists(self, sid: str, state: State) -> None:
        ok, got = self._read("exists", f"exists {sid}", lambda: self.store.exists(sid), sid=sid)
        if ok and got != (state is not None):
            self.logger.violation(
                f"exists {sid} is {got}, the thread's model says {state is not None}"
            )

    # -- shared sessions: commuting appends from every thread

    def _shared_append(self) -> None:
        sid = self.rng.choice(self.shared)
        lid, tag = self._new_loop_id()
        loop = make_loop(sid, lid, tag)
        faults.begin_op()
        n, t0 = self.logger.begin("shared_append", sid=sid, lid=lid, tag=tag)
        try:
            self.store.append_loop(sid, loop)
        except Exception as exc:
            committed = faults.commit_passed()
            if getattr(exc, "maybe_committed", False):
                committed = True  # failed after its commit point (maybe in another process)
            if committed is None:
                committed = error_kind(exc) != "SessionLocked"
            self.logger.fail(n, "shared_append", t0, exc, committed=committed)
            return
        self.logger.ack(n, "shared_append", t0)
        self.shared_acked[sid].append(lid)

    def _shared_load(self) -> None:
        sid = self.rng.choice(self.shared)
        ok, session = self._read(
            "shared_load", f"load of shared {sid}", lambda: self.store.load(sid), sid=sid
        )
        if not ok:
            return
        ids = [lp.loop_id for lp in session.loops]
        if len(ids) != len(set(ids)):
            self.logger.violation(f"shared {sid} has duplicate loop ids")
        missing = set(self.shared_acked[sid]) - set(ids)
        if missing:
            self.logger.violation(
                f"shared {sid} lacks loops this thread appended: {sorted(missing)[:5]}"
            )


def _is_not_found(exc: BaseException) -> bool:
    from loopstore.errors import SessionNotFound

    return isinstance(exc, SessionNotFound)


def _dump(state: State | str) -> Any:
    if state is None or isinstance(state, str):
        return state
    return [list(p) for p in state]


def owned_worker(spec: dict[str, Any]) -> None:
    """Process entry: open the store, run `threads` OwnedThreads until the deadline (or SIGKILL)."""
    root = Path(spec["root"])
    logdir = Path(spec["logdir"])
    store = open_store(root, **spec["store_kwargs"])
    if spec.get("fault_rate"):
        faults.install(spec["fault_rate"], random.Random(f"{spec['seed']}:faults:{spec['name']}"))
    workers = []
    for t in range(spec["threads"]):
        writer, rng, log = thread_identity(spec, t)
        owned = [f"{writer}.s{k}" for k in range(spec["owned_per_thread"])]
        w = OwnedThread(
            store,
            log,
            writer,
            owned,
            list(spec["shared"]),
            rng,
            expect_faults=bool(spec.get("fault_rate")),
        )
        workers.append(w)
    deadline = ready_then_wait_for_go(spec)
    if deadline is None:
        return
    start_and_join([threading.Thread(target=w.run, args=(deadline,)) for w in workers])
    if faults.installed():
        (logdir / f"{spec['name']}.faults.json").write_text(json.dumps(faults.counts()))


# ---------------------------------------------------------------- parent side: replay and compare


def tally(result: ScenarioResult, ops: list[OpRecord]) -> None:
    for op in ops:
        result.ops += 1
        if op.outcome == "ack":
            result.acknowledged += 1
        elif op.outcome == "fail":
            result.count_failure(op.error or "?")
        else:
            result.count_failure("unknown (killed)")


def expected_owned(
    ops_by_writer: dict[str, list[OpRecord]],
) -> tuple[dict[str, list[State]], list[str]]:
    """Replay each writer's ops on its own sessions: the set of allowed final states per session."""
    cands: dict[str, list[State]] = {}
    problems: list[str] = []
    for writer, ops in ops_by_writer.items():
        for op in ops:
            if op.op not in WRITE_OPS or op.op == "shared_append":
                continue
            sid = op.args["sid"]
            before = cands.setdefault(sid, [_ABSENT])
            nxt: list[State]
            if op.outcome == "ack":
                if op.op == "delete" and op.detail.get("notfound"):
                    nxt = [s for s in before if s is None]
                else:
                    nxt = [apply_op(s, op.op, op.args) for s in before]
            elif op.outcome == "fail":
                allowed = list(before)
                if op.detail.get("committed") and op.error != "SessionLocked":
                    allowed += [apply_op(s, op.op, op.args) for s in before]
                observed = op.detail.get("observed", "missing")
                if observed == "missing" or observed == "error":
                    nxt = allowed
                else:
                    obs = _to_state(observed)
                    if obs not in allowed:
                        problems.append(
                            f"{writer} op {op.n} {op.op} {sid}: observed {observed} not allowed"
                        )
                    nxt = [obs]
            else:  # unknown: the worker died inside the call
                nxt = list(before) + [apply_op(s, op.op, op.args) for s in before]
            cands[sid] = list(dict.fromkeys(nxt))
    return cands, problems


def check_store(
    store: Any,
    ops_by_writer: dict[str, list[OpRecord]],
    shared_initial: dict[str, list[tuple[str, str]]],
) -> list[str]:
    """Compare the store with the replayed logs; returns human-readable violations."""
    from loopstore.errors import SessionNotFound

    cands, problems = expected_owned(ops_by_writer)
    for sid, allowed in sorted(cands.items()):
        try:
            actual: State = _to_state(session_state(store.load(sid)))
        except SessionNotFound:
            actual = None
        except Exception as exc:
            problems.append(f"session {sid}: load raised {error_kind(exc)}: {exc}")
            continue
        if actual not in allowed:
            problems.append(
                f"session {sid}: store holds {_dump(actual)}, the ack log allows only "
                f"{[_dump(a) for a in allowed]}"
            )
    # shared sessions: appends commute, so the loop set is exact up to unknown outcomes
    must: dict[str, dict[str, tuple[str, int]]] = {s: {} for s in shared_initial}
    may: dict[str, set[str]] = {s: set() for s in shared_initial}
    for writer, ops in ops_by_writer.items():
        for op in ops:
            if op.op != "shared_append":
                continue
            sid, lid = op.args["sid"], op.args["lid"]
            if op.outcome == "ack":
                must[sid][lid] = (writer, op.n)
            elif op.outcome == "unknown" or (
                op.detail.get("committed") and op.error != "SessionLocked"
            ):
                may[sid].add(lid)
    for sid, initial in shared_initial.items():
        try:
            loops = [lp.loop_id for lp in store.load(sid).loops]
        except Exception as exc:
            problems.append(f"shared {sid}: load raised {error_kind(exc)}: {exc}")
            continue
        seen = set(loops)
        if len(loops) != len(seen):
            dups = sorted({x for x in loops if loops.count(x) > 1})
            problems.append(f"shared {sid}: duplicate loops {dups[:5]}")
        initial_ids = {lid for lid, _ in initial}
        missing = (set(must[sid]) | initial_ids) - seen
        if missing:
            problems.append(f"shared {sid}: acknowledged appends missing: {sorted(missing)[:5]}")
        extra = seen - set(must[sid]) - may[sid] - initial_ids
        if extra:
            problems.append(
                f"shared {sid}: loops no acknowledged or in-flight call wrote: {sorted(extra)[:5]}"
            )
        order: dict[str, int] = {}
        for lid in loops:
            if lid in must[sid]:
                writer, n = must[sid][lid]
                if order.get(writer, -1) > n:
                    problems.append(f"shared {sid}: loops of {writer} out of acknowledgement order")
                order[writer] = n
    return problems


def _read_fsync_fault(exc: BaseException) -> bool:
    """A StorageError from an injected fault in the fsync a read does to vouch for state."""
    return (
        type(exc).__name__ == "StorageError"
        and "make the session durable" in str(exc)
        and injected(exc)
    )
