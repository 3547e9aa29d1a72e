"""SessionRecorder: turns a phi-core agent event stream into sessions (port of recorder.rs).

The recorder keeps its state as phi-core JSON values (plain dicts), exactly the shape
phi-core 0.10's serde writes, so that fed the same events it produces the same session
JSON value for value: event payloads and timestamps are copied verbatim, never parsed
and re-printed. Models (`Session`, `LoopRecord`) are built from those values when a
caller asks for them.

With a `store`, every loop is written with `append_loop` the moment its `AgentEnd`
arrives (and again if a later event changes it: a child link, a parallel group), and
`flush()` writes the loops it aborts. A write that fails (`SessionLocked`, an I/O
error) never drops the loop: it stays pending, is retried on the next event or
`flush()`, and every failure is reported (see `persist_errors` and `on_error`).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loopstore.errors import InvalidSessionId, SessionError, SessionNotFound
from loopstore.messages import Usage

if TYPE_CHECKING:
    from loopstore.models import LoopRecord, Session

__all__ = [
    "PHI_CORE_EVENT_ROUTES",
    "CallbackError",
    "EventRoute",
    "PersistError",
    "RecorderCallbackError",
    "RecorderError",
    "SessionRecorder",
    "SessionRecorderConfig",
]

log = logging.getLogger("loopstore.recorder")

JsonDict = dict[str, Any]

PERSIST_RETRY_MIN_S = 0.5
"""First back-off after a failed store write, so a locked store does not stall every event."""
PERSIST_RETRY_MAX_S = 30.0
"""Back-off ceiling between automatic retries (``flush()`` always retries at once)."""
MAX_REPORTED_ERRORS = 1000
"""`persist_errors` / `callback_errors` keep at most this many recent entries."""

ZERO_USAGE: JsonDict = Usage.zero().model_dump(mode="json")

# LlmMessage wrapper keys: a plain `Message` (TurnEnd.tool_results) never keeps them.
_LLM_WRAPPER_KEYS = ("turnId", "nodeId", "parentId", "tags", "provenanceHint")


class _SessionStore(Protocol):
    """The part of `FileSystemSessionStore` the recorder writes through."""

    def append_loop(
        self, session_id: str, loop: LoopRecord, *, session: Session | None = None
    ) -> None: ...

    def update(self, session_id: str, fn: Callable[[Session], Session | None]) -> Session: ...


BeforeTaskFn = Callable[["Session"], "bool | None"]
AfterTaskFn = Callable[["Session"], None]


@dataclass
class SessionRecorderConfig:
    """Recorder options, as phi-core's `SessionRecorderConfig`.

    `before_task` fires when a session is first created (its return value is ignored,
    as in phi-core: the session is created either way); `after_task` fires for every
    session that `flush()` finalizes.
    """

    include_streaming_events: bool = False
    capture_turn_requests: bool = False
    before_task: BeforeTaskFn | None = None
    after_task: AfterTaskFn | None = None


@dataclass(frozen=True)
class RecorderError:
    """Base of the problems the recorder reports without stopping."""

    session_id: str
    error: BaseException


@dataclass(frozen=True)
class PersistError(RecorderError):
    """A store write failed. `retrying` is False only for errors a retry cannot fix."""

    loop_id: str | None = None
    retrying: bool = True


@dataclass(frozen=True)
class CallbackError(RecorderError):
    """A `before_task` / `after_task` callback raised."""

    callback: Literal["before_task", "after_task"] = "before_task"


class RecorderCallbackError(RuntimeError):
    """Raised from `on_event`/`flush` when a session callback failed and no `on_error` is set.

    The recorder finishes handling the event first, so its state stays consistent.
    """

    def __init__(self, report: CallbackError) -> None:
        self.report = report
        super().__init__(
            f"{report.callback} callback failed for session {report.session_id!r}: {report.error!r}"
        )


@dataclass
class _OpenLoop:
    record: JsonDict
    next_seq: int = 0


@dataclass
class _PartialTurn:
    turn_id: JsonDict
    triggered_by: Any
    started_at: Any
    input_messages: list[Any] = field(default_factory=list)
    request_payload: Any = None
    has_request: bool = False


@dataclass
class _Pending:
    """One session's state on its way to the store."""

    session: JsonDict
    loops: dict[str, JsonDict] = field(default_factory=dict)
    header_dirty: bool = False


def session_id_from_loop_id(loop_id: str) -> str:
    """The session id is everything before the first '.' of a loop id (phi-core helpers.rs)."""
    pos = loop_id.find(".")
    return loop_id if pos < 0 else loop_id[:pos]


def config_segment_from_loop_id(loop_id: str) -> str | None:
    """`{session}.{segment}.{N}` -> segment; None without two dots (phi-core helpers.rs)."""
    first = loop_id.find(".")
    if first < 0:
        return None
    after = loop_id[first + 1 :]
    last = after.rfind(".")
    if last < 0:
        return None
    return after[:last]


def _is_llm_assistant(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and isinstance(message.get("model"), str)
        and isinstance(message.get("provider"), str)
    )


def extract_config_snapshot(messages: list[Any], loop_id: str) -> JsonDict | None:
    """Config snapshot from the first assistant message (phi-core's fallback)."""
    for message in messages:
        if _is_llm_assistant(message):
            return {
                "model": message["model"],
                "provider": message["provider"],
                "config_id": config_segment_from_loop_id(loop_id),
            }
    return None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _with_turn_id(message: Any, turn_id: JsonDict) -> Any:
    """`AgentMessage::from(Message).with_turn_id(..)`: the message plus its `turnId`."""
    if not isinstance(message, dict):
        return copy.deepcopy(message)
    out = {k: copy.deepcopy(v) for k, v in message.items() if k not in _LLM_WRAPPER_KEYS}
    out["turnId"] = dict(turn_id)
    return out


EventRoute = Literal[
    "own_arm", "streaming", "capture", "loop_id_of", "loop_id_of_nonempty", "dropped"
]

PHI_CORE_EVENT_ROUTES: Mapping[str, EventRoute] = MappingProxyType(
    {
        # recorder.rs has a match arm of its own that appends the event to its loop.
        "AgentStart": "own_arm",
        "AgentEnd": "own_arm",
        "TurnStart": "own_arm",
        "MessageEnd": "own_arm",
        "TurnEnd": "own_arm",
        "ToolExecutionEnd": "own_arm",
        # Own arm, appended only when the config asks for it.
        "MessageUpdate": "streaming",  # include_streaming_events
        "TurnRequest": "capture",  # capture_turn_requests
        # The catch-all arm: helpers.rs `loop_id_of` names the loop.
        "MessageStart": "loop_id_of",
        "ToolExecutionStart": "loop_id_of",
        "ToolExecutionUpdate": "loop_id_of",
        "CompactionStarted": "loop_id_of",
        "CompactionEnded": "loop_id_of",
        "PrunApplied": "loop_id_of",
        # `loop_id_of` names the loop only when loop_id is not empty.
        "ProgressMessage": "loop_id_of_nonempty",
        "InputRejected": "loop_id_of_nonempty",
        # In no loop's stream: the parallel events only build `parallel_group`, and
        # `loop_id_of` has no arm for RevertApplied, so phi-core's recorder drops it.
        "ParallelLoopStart": "dropped",
        "ParallelLoopEnd": "dropped",
        "RevertApplied": "dropped",
    }
)
"""How phi-core 0.10's `recorder.rs` files each `AgentEvent` variant in `LoopRecord.events`.

An event that is filed goes to the stream of the loop it names, if that loop is open
(between its AgentStart and AgentEnd); otherwise it is dropped, as in phi-core.
"""


def _catch_all_loop_id(event: JsonDict) -> str | None:
    """The catch-all arm: phi-core's `loop_id_of`, the loop an event is filed under.

    Event types phi-core 0.10 does not define are kept (loopstore is lossless) when they
    name a loop; phi-core could not have parsed them at all.
    """
    loop_id = event.get("loop_id")
    if not isinstance(loop_id, str):
        return None
    route = PHI_CORE_EVENT_ROUTES.get(str(event.get("type")))
    if route is None or route == "loop_id_of":
        return loop_id
    if route == "loop_id_of_nonempty":
        return loop_id or None
    return None


def _to_event_dict(event: object) -> JsonDict:
    """An event in phi-core JSON form, validated, as a fresh dict the recorder owns."""
    from loopstore.events import parse_event

    model = parse_event(event)
    dumped = model.model_dump(mode="json")
    if not isinstance(dumped, dict) or not isinstance(dumped.get("type"), str):
        raise ValueError(f"event did not serialize to a tagged JSON object: {dumped!r}")
    return dumped


class SessionRecorder:
    """Records every agent event into `Session`s of `LoopRecord`s, as phi-core does.

    Call `on_event` for every event, then `flush()` before shutdown. Single-writer in
    spirit (like phi-core's `&mut self`), but calls are serialized by a lock so a
    recorder may be fed from several threads.
    """

    def __init__(
        self,
        config: SessionRecorderConfig | None = None,
        *,
        store: _SessionStore | None = None,
        on_error: Callable[[RecorderError], None] | None = None,
    ) -> None:
        self.config = config if config is not None else SessionRecorderConfig()
        self.store = store
        self.on_error = on_error
        self.persist_errors: deque[PersistError] = deque(maxlen=MAX_REPORTED_ERRORS)
        self.callback_errors: deque[CallbackError] = deque(maxlen=MAX_REPORTED_ERRORS)
        self._completed: list[JsonDict] = []
        self._open_sessions: dict[str, JsonDict] = {}
        self._open_loops: dict[str, _OpenLoop] = {}
        self._partial_groups: dict[str, list[str]] = {}
        self._partial_turns: dict[str, _PartialTurn] = {}
        self._lock = threading.RLock()
        self._raise_later: list[CallbackError] = []
        # Persistence: pending writes in first-dirty order, keyed by session object id.
        self._pending: dict[int, _Pending] = {}
        self._written_sessions: set[str] = set()
        self._retry_at = 0.0
        self._backoff_s = PERSIST_RETRY_MIN_S

    # ------------------------------------------------------------------ events

    def on_event(self, event: object) -> None:
        """Feed one event (an event model or a dict in phi-core JSON form)."""
        if self._ignored(event):
            # Streaming deltas are the bulk of a stream: do not even parse what is dropped.
            with self._lock:
                if self.store is not None:
                    self._persist(force=False)
            return
        ev = _to_event_dict(event)
        with self._lock:
            self._handle(ev)
            if self.store is not None:
                self._persist(force=False)
            self._raise_deferred()

    def _ignored(self, event: object) -> bool:
        """True for events this configuration drops unseen (MessageUpdate, TurnRequest)."""
        etype = event.get("type") if isinstance(event, dict) else getattr(event, "type", None)
        if etype == "MessageUpdate":
            return not self.config.include_streaming_events
        if etype == "TurnRequest":
            return not self.config.capture_turn_requests
        return False

    def _handle(self, ev: JsonDict) -> None:
        etype = ev["type"]
        if etype == "ParallelLoopStart":
            loop_ids = list(ev.get("loop_ids") or [])
            for lid in loop_ids:
                self._partial_groups.setdefault(lid, list(loop_ids))
        elif etype == "AgentStart":
            self._on_agent_start(ev)
        elif etype == "AgentEnd":
            self._on_agent_end(ev)
        elif etype == "TurnStart":
            loop_id = ev["loop_id"]
            self._partial_turns[loop_id] = _PartialTurn(
                turn_id={"loopId": loop_id, "turnIndex": ev.get("turn_index")},
                triggered_by=ev.get("triggered_by"),
                started_at=ev.get("timestamp"),
            )
            self._append_event(loop_id, ev)
        elif etype == "TurnRequest":
            # phi-core 0.9+: the recorder ignores TurnRequest unless asked to capture it.
            if self.config.capture_turn_requests:
                loop_id = ev["loop_id"]
                partial = self._partial_turns.get(loop_id)
                if partial is not None:
                    partial.request_payload = ev.get("payload")
                    partial.has_request = True
                self._append_event(loop_id, ev)
        elif etype == "MessageEnd":
            loop_id = ev["loop_id"]
            message = ev.get("message")
            if _role(message) != "assistant":
                partial = self._partial_turns.get(loop_id)
                if partial is not None:
                    partial.input_messages.append(message)
            self._append_event(loop_id, ev)
        elif etype == "TurnEnd":
            self._on_turn_end(ev)
        elif etype == "ToolExecutionEnd":
            self._on_tool_execution_end(ev)
        elif etype == "ParallelLoopEnd":
            self._on_parallel_loop_end(ev)
        elif etype == "MessageUpdate":
            if self.config.include_streaming_events:
                self._append_event(ev["loop_id"], ev)
        else:
            lid = _catch_all_loop_id(ev)
            if lid is not None:
                self._append_event(lid, ev)

    def _on_agent_start(self, ev: JsonDict) -> None:
        session_id: str = ev["session_id"]
        loop_id: str = ev["loop_id"]
        now = ev["timestamp"]
        session = self._open_sessions.get(session_id)
        is_new = session is None
        if session is None:
            session = {
                "session_id": session_id,
                "agent_id": ev["agent_id"],
                "created_at": now,
                "last_active_at": now,
                "formation": {"FirstLoop": {"timestamp": now}},
                "parent_spawn_ref": None,
                "scope": "ephemeral",
                "loops": [],
            }
            self._open_sessions[session_id] = session
        session["last_active_at"] = now

        if is_new and self.config.before_task is not None:
            self._call_hook("before_task", self.config.before_task, session)

        parent_loop_id = ev.get("parent_loop_id")
        if isinstance(parent_loop_id, str):
            parent_session_id = session_id_from_loop_id(parent_loop_id)
            if parent_session_id != session_id and session.get("parent_spawn_ref") is None:
                session["parent_spawn_ref"] = {
                    "parent_session_id": parent_session_id,
                    "parent_loop_id": parent_loop_id,
                    "tool_call_id": "",
                    "tool_name": "",
                }
                self._mark_header(session)

        continuation_kind = ev.get("continuation_kind")
        record: JsonDict = {
            "loop_id": loop_id,
            "session_id": session_id,
            "agent_id": ev["agent_id"],
            "parent_loop_id": parent_loop_id,
            "continuation_kind": "Initial" if continuation_kind is None else continuation_kind,
            "started_at": now,
            "ended_at": None,
            "status": "Running",
            "rejection": None,
            "config": ev.get("config_snapshot"),
            "messages": [],
            "turns": [],
            "usage": dict(ZERO_USAGE),
            "metadata": ev.get("metadata"),
            "events": [],
            "children_loop_ids": [],
            "child_loop_refs": [],
            "parallel_group": None,
        }
        self._open_loops[loop_id] = _OpenLoop(record)
        self._append_event(loop_id, ev)

    def _on_agent_end(self, ev: JsonDict) -> None:
        loop_id: str = ev["loop_id"]
        self._append_event(loop_id, ev)
        self._partial_turns.pop(loop_id, None)
        open_loop = self._open_loops.pop(loop_id, None)
        if open_loop is None:
            return
        record = open_loop.record
        rejection = ev.get("rejection")
        messages = ev.get("messages") or []
        record["ended_at"] = ev.get("timestamp")
        record["status"] = "Completed" if rejection is None else "Rejected"
        record["rejection"] = rejection
        record["messages"] = messages
        record["usage"] = ev.get("usage")
        if record["config"] is None:
            record["config"] = extract_config_snapshot(messages, loop_id)

        session_id = record["session_id"]
        parent_loop_id = record["parent_loop_id"]
        session = self._open_sessions.get(session_id)
        if isinstance(parent_loop_id, str):
            parent_in_session = None
            if session is not None:
                parent_in_session = next(
                    (lr for lr in session["loops"] if lr["loop_id"] == parent_loop_id), None
                )
            if parent_in_session is not None and session is not None:
                if loop_id not in parent_in_session["children_loop_ids"]:
                    parent_in_session["children_loop_ids"].append(loop_id)
                    self._mark_loop(session, parent_in_session)
            else:
                parent_open = self._open_loops.get(parent_loop_id)
                if (
                    parent_open is not None
                    and parent_open.record["session_id"] == session_id
                    and loop_id not in parent_open.record["children_loop_ids"]
                ):
                    parent_open.record["children_loop_ids"].append(loop_id)

        if session is not None:
            session["loops"].append(record)
            self._mark_loop(session, record)

    def _on_turn_end(self, ev: JsonDict) -> None:
        loop_id: str = ev["loop_id"]
        self._append_event(loop_id, ev)
        message = ev.get("message")
        partial = self._partial_turns.pop(loop_id, None)
        open_loop = self._open_loops.get(loop_id)
        if partial is not None:
            turn: JsonDict = {
                "turn_id": partial.turn_id,
                "triggered_by": partial.triggered_by,
                "usage": ev.get("usage"),
                "input_messages": partial.input_messages,
                "output_message": message,
                "tool_results": [
                    _with_turn_id(m, partial.turn_id) for m in (ev.get("tool_results") or [])
                ],
                "started_at": partial.started_at,
                "ended_at": ev.get("timestamp"),
            }
            if partial.has_request and partial.request_payload is not None:
                turn["request_payload"] = partial.request_payload
            if open_loop is not None:
                open_loop.record["turns"].append(turn)
        if open_loop is not None and open_loop.record["config"] is None:
            open_loop.record["config"] = extract_config_snapshot([message], loop_id)

    def _on_tool_execution_end(self, ev: JsonDict) -> None:
        loop_id: str = ev["loop_id"]
        self._append_event(loop_id, ev)
        result = ev.get("result")
        child_loop_id = result.get("child_loop_id") if isinstance(result, dict) else None
        if not isinstance(child_loop_id, str):
            return
        open_loop = self._open_loops.get(loop_id)
        if open_loop is None:
            return
        child_session_id = session_id_from_loop_id(child_loop_id)
        open_loop.record["child_loop_refs"].append(
            {
                "tool_call_id": ev["tool_call_id"],
                "tool_name": ev["tool_name"],
                "child_loop_id": child_loop_id,
                "child_session_id": child_session_id,
            }
        )
        child = self._open_sessions.get(child_session_id)
        if child is None:
            child = next((s for s in self._completed if s["session_id"] == child_session_id), None)
        if child is None:
            return
        spawn_ref = child.get("parent_spawn_ref")
        if isinstance(spawn_ref, dict) and spawn_ref.get("tool_call_id") == "":
            spawn_ref["parent_session_id"] = open_loop.record["session_id"]
            spawn_ref["parent_loop_id"] = loop_id
            spawn_ref["tool_call_id"] = ev["tool_call_id"]
            spawn_ref["tool_name"] = ev["tool_name"]
            self._mark_header(child)

    def _on_parallel_loop_end(self, ev: JsonDict) -> None:
        selected: str = ev["selected_loop_id"]
        all_loop_ids = list(self._partial_groups.get(selected, [selected]))
        for lid in all_loop_ids:
            group = {
                "all_loop_ids": list(all_loop_ids),
                "selected_loop_id": selected,
                "selected_config_index": ev.get("selected_config_index"),
                "evaluation_usage": copy.deepcopy(ev.get("evaluation_usage")),
                "is_selected": lid == selected,
            }
            open_loop = self._open_loops.get(lid)
            if open_loop is not None:
                open_loop.record["parallel_group"] = group
            for session in [*self._open_sessions.values(), *self._completed]:
                for lr in session["loops"]:
                    if lr["loop_id"] == lid:
                        lr["parallel_group"] = copy.deepcopy(group)
                        self._mark_loop(session, lr)
                        break
        for lid in all_loop_ids:
            self._partial_groups.pop(lid, None)

    def _append_event(self, loop_id: str, ev: JsonDict) -> None:
        open_loop = self._open_loops.get(loop_id)
        if open_loop is None:
            return
        open_loop.record["events"].append({"sequence": open_loop.next_seq, "event": ev})
        open_loop.next_seq += 1

    # ------------------------------------------------------------- lifecycle

    def flush(self) -> None:
        """Abort every open loop, finalize every session, and write what is pending."""
        with self._lock:
            self._partial_turns.clear()
            for loop_id in list(self._open_loops):
                open_loop = self._open_loops.pop(loop_id)
                open_loop.record["status"] = "Aborted"
                session = self._open_sessions.get(open_loop.record["session_id"])
                if session is not None:
                    session["loops"].append(open_loop.record)
                    self._mark_loop(session, open_loop.record)
            for session_id in list(self._open_sessions):
                session = self._open_sessions.pop(session_id)
                if self.config.after_task is not None:
                    self._call_hook("after_task", self.config.after_task, session)
                self._completed.append(session)
            if self.store is not None:
                self._persist(force=True)
            self._raise_deferred()

    def checkpoint(self) -> int:
        """Move sessions without open loops to the completed list; returns how many moved."""
        with self._lock:
            busy = {ol.record["session_id"] for ol in self._open_loops.values()}
            promotable = [sid for sid in self._open_sessions if sid not in busy]
            for sid in promotable:
                self._completed.append(self._open_sessions.pop(sid))
            return len(promotable)

    def drain_completed(self) -> list[Session]:
        """Take the completed sessions out of the recorder."""
        with self._lock:
            drained, self._completed = self._completed, []
            return [self._session_model(s) for s in drained]

    # ------------------------------------------------------------- queries

    def sessions(self) -> list[Session]:
        """Every session: completed ones first, then those still in progress (snapshots)."""
        with self._lock:
            return [self._session_model(s) for s in self._iter_sessions()]

    def get_session(self, session_id: str) -> Session | None:
        """A snapshot of the session, preferring a completed one (as phi-core)."""
        with self._lock:
            value = self._find_session(session_id)
            return None if value is None else self._session_model(value)

    def current_loop(self, loop_id: str) -> LoopRecord | None:
        """A snapshot of a loop that is still running."""
        from loopstore.models import LoopRecord

        with self._lock:
            open_loop = self._open_loops.get(loop_id)
            if open_loop is None:
                return None
            return LoopRecord.model_validate(copy.deepcopy(open_loop.record))

    def session_values(self) -> list[JsonDict]:
        """Every session as its phi-core JSON value (deep copies), in `sessions()` order."""
        with self._lock:
            return [copy.deepcopy(s) for s in self._iter_sessions()]

    def session_value(self, session_id: str) -> JsonDict | None:
        """One session as its phi-core JSON value (a deep copy), or None."""
        with self._lock:
            value = self._find_session(session_id)
            return None if value is None else copy.deepcopy(value)

    @property
    def pending_writes(self) -> int:
        """Loops and headers not yet written to the store."""
        with self._lock:
            return sum(len(p.loops) + int(p.header_dirty) for p in self._pending.values())

    def persist(self) -> int:
        """Retry pending store writes now; returns how many remain pending."""
        with self._lock:
            if self.store is not None:
                self._persist(force=True)
            return self.pending_writes

    def _iter_sessions(self) -> Iterator[JsonDict]:
        yield from self._completed
        yield from self._open_sessions.values()

    def _find_session(self, session_id: str) -> JsonDict | None:
        for s in self._completed:
            if s["session_id"] == session_id:
                return s
        return self._open_sessions.get(session_id)

    @staticmethod
    def _session_model(value: JsonDict) -> Session:
        from loopstore.models import Session

        return Session.model_validate(copy.deepcopy(value))

    # ------------------------------------------------------------- callbacks

    def _call_hook(
        self,
        name: Literal["before_task", "after_task"],
        hook: Callable[[Session], object],
        session: JsonDict,
    ) -> None:
        try:
            hook(self._session_model(session))
        except Exception as exc:
            report = CallbackError(session["session_id"], exc, callback=name)
            self.callback_errors.append(report)
            log.error("%s callback failed for session %r: %r", name, session["session_id"], exc)
            if self.on_error is not None:
                self._notify(report)
            else:
                self._raise_later.append(report)

    def _notify(self, report: RecorderError) -> None:
        assert self.on_error is not None
        try:
            self.on_error(report)
        except Exception:
            log.exception("on_error handler raised while reporting %r", report)

    def _raise_deferred(self) -> None:
        if self._raise_later:
            first = self._raise_later[0]
            self._raise_later.clear()
            raise RecorderCallbackError(first) from first.error

    # ------------------------------------------------------------- persistence

    def _pending_for(self, session: JsonDict) -> _Pending | None:
        if self.store is None:
            return None
        key = id(session)
        pending = self._pending.get(key)
        if pending is None:
            pending = _Pending(session)
            self._pending[key] = pending
        return pending

    def _mark_loop(self, session: JsonDict, record: JsonDict) -> None:
        pending = self._pending_for(session)
        if pending is not None:
            pending.loops[record["loop_id"]] = record

    def _mark_header(self, session: JsonDict) -> None:
        pending = self._pending_for(session)
        if pending is not None:
            pending.header_dirty = True

    def _persist(self, *, force: bool) -> None:
        if not self._pending:
            return
        if not force and time.monotonic() < self._retry_at:
            return
        failed = False
        for key in list(self._pending):
            pending = self._pending[key]
            if not self._persist_session(pending):
                failed = True
            if not pending.loops and not pending.header_dirty:
                del self._pending[key]
        if failed:
            self._retry_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, PERSIST_RETRY_MAX_S)
        else:
            self._retry_at = 0.0
            self._backoff_s = PERSIST_RETRY_MIN_S

    def _persist_session(self, pending: _Pending) -> bool:
        """Write one session's pending loops (in session order), then its header.

        `append_loop` creates a session with our header and itself moves
        `last_active_at` on as later loops arrive, so the header needs an `update` only
        when something else changed after the first write (a spawn ref enriched).
        """
        from loopstore.models import LoopRecord

        assert self.store is not None
        session = pending.session
        session_id: str = session["session_id"]
        order = {lr["loop_id"]: i for i, lr in enumerate(session["loops"])}
        for loop_id in sorted(pending.loops, key=lambda lid: order.get(lid, len(order))):
            record = pending.loops[loop_id]
            try:
                loop_model = LoopRecord.model_validate(copy.deepcopy(record))
                self.store.append_loop(
                    session_id, loop_model, session=self._header_model(self._header(session))
                )
            except Exception as exc:
                if self._report_persist(session_id, loop_id, exc):
                    return False
                del pending.loops[loop_id]  # a retry cannot fix it; reported above
                continue
            del pending.loops[loop_id]
            self._written_sessions.add(session_id)
        if pending.header_dirty:
            if session_id in self._written_sessions:
                try:
                    self.store.update(session_id, _merge_header(self._header(session)))
                except Exception as exc:
                    if self._report_persist(session_id, None, exc):
                        return False
            pending.header_dirty = False  # else the first append_loop carries the header
        return True

    def _report_persist(self, session_id: str, loop_id: str | None, exc: Exception) -> bool:
        """Record a failed write; True when it is worth retrying."""
        if not isinstance(exc, (SessionError, OSError)):
            raise exc
        retrying = not isinstance(exc, (InvalidSessionId, SessionNotFound))
        report = PersistError(session_id, exc, loop_id=loop_id, retrying=retrying)
        self.persist_errors.append(report)
        log.warning(
            "could not persist %s of session %r (%s): %r",
            f"loop {loop_id!r}" if loop_id else "header",
            session_id,
            "will retry" if retrying else "giving up",
            exc,
        )
        if self.on_error is not None:
            self._notify(report)
        return retrying

    @staticmethod
    def _header(session: JsonDict) -> JsonDict:
        return {k: copy.deepcopy(v) for k, v in session.items() if k != "loops"}

    @staticmethod
    def _header_model(header: JsonDict) -> Session:
        from loopstore.models import Session

        return Session.model_validate({**copy.deepcopy(header), "loops": []})


def _merge_header(header: JsonDict) -> Callable[[Session], Session | None]:
    """Bring a stored header up to date without undoing another writer's newer state.

    Several recorders (processes) may write one session: keep the stored creation
    fields, take the latest `last_active_at`, and fill in a spawn ref only where the
    stored one is missing or not yet enriched.
    """

    def apply(stored: Session) -> Session | None:
        from loopstore.models import SpawnRef, parse_timestamp

        updates: dict[str, Any] = {}
        ours = header.get("last_active_at")
        theirs = stored.last_active_at
        if isinstance(ours, str) and parse_timestamp(ours) > parse_timestamp(theirs):
            updates["last_active_at"] = ours
        spawn = header.get("parent_spawn_ref")
        stored_spawn = stored.parent_spawn_ref
        if isinstance(spawn, dict) and (
            stored_spawn is None or (stored_spawn.tool_call_id == "" and spawn["tool_call_id"])
        ):
            updates["parent_spawn_ref"] = SpawnRef.model_validate(copy.deepcopy(spawn))
        if not updates:
            return stored
        return stored.model_copy(update=updates)

    return apply
