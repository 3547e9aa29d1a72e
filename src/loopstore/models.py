"""Typed pydantic v2 models of the phi-core 0.10 session model, lossless in JSON.

``Session.model_validate_json(text).model_dump(mode="json") == json.loads(text)`` for any
session phi-core writes, and ``json.dumps(dump, indent=2, ensure_ascii=False)`` gives
phi-core's file byte for byte. Timestamps are kept as phi-core's exact RFC 3339 text
(nanoseconds); ``*_dt`` properties and ``parse_timestamp`` give ``datetime`` views.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, model_serializer, model_validator

from loopstore._lossless import (
    U64,
    JsonValue,
    LosslessModel,
    OpenEnum,
    StrictBool,
    StrictStr,
    Timestamp,
)
from loopstore._timestamps import format_timestamp, parse_timestamp, timestamp_nanos
from loopstore.events import (
    AgentEvent,
    AnnotatedRequestPayload,
    ApiProtocol,
    ContinuationKind,
    LoopConfigSnapshot,
    ThinkingLevel,
    TurnTrigger,
)
from loopstore.messages import AgentMessage, TurnId, Usage

__all__ = [
    "AgentEvent",
    "AgentMessage",
    "AnnotatedRequestPayload",
    "ApiProtocol",
    "ChildLoopRef",
    "ContinuationKind",
    "LoopConfigSnapshot",
    "LoopEvent",
    "LoopRecord",
    "LoopStatus",
    "ParallelGroupRecord",
    "Session",
    "SessionFormation",
    "SessionScope",
    "SpawnRef",
    "ThinkingLevel",
    "Turn",
    "TurnId",
    "TurnTrigger",
    "Usage",
    "format_timestamp",
    "parse_timestamp",
    "timestamp_nanos",
]


class LoopStatus(OpenEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    REJECTED = "Rejected"
    ABORTED = "Aborted"


class SessionScope(OpenEnum):
    EPHEMERAL = "ephemeral"
    PERSISTENT = "persistent"


_FORMATION_FIELDS = ("threshold_secs", "previous_session_id", "timestamp")


class SessionFormation(LosslessModel):
    """Why a session was created; externally tagged in JSON.

    ``{"FirstLoop": {"timestamp": ...}}``, ``{"Explicit": {"timestamp": ...}}`` or
    ``{"InactivityTimeout": {"threshold_secs", "previous_session_id", "timestamp"}}``.
    Python view: ``kind`` plus the variant's fields.
    """

    kind: StrictStr
    threshold_secs: U64 | None = None
    previous_session_id: StrictStr | None = None
    timestamp: Timestamp

    @model_validator(mode="before")
    @classmethod
    def _from_tagged(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) == 1 and "kind" not in data:
            ((kind, body),) = data.items()
            if isinstance(body, dict):
                return {"kind": kind, **body}
        return data

    @model_serializer(mode="plain")
    def _to_tagged(self) -> dict[str, Any]:
        fields_set = self.model_fields_set
        body = {name: getattr(self, name) for name in _FORMATION_FIELDS if name in fields_set}
        if self.__pydantic_extra__:
            body.update(self.__pydantic_extra__)
        return {self.kind: body}

    def _after_init(self, data: dict[str, Any]) -> None:
        if self.kind != "InactivityTimeout":
            for name in ("threshold_secs", "previous_session_id"):
                if getattr(self, name) is None:
                    self.__pydantic_fields_set__.discard(name)

    @property
    def timestamp_dt(self) -> datetime:
        return parse_timestamp(self.timestamp)

    @classmethod
    def first_loop(cls, timestamp: str | datetime) -> SessionFormation:
        return cls(kind="FirstLoop", timestamp=timestamp)

    @classmethod
    def explicit(cls, timestamp: str | datetime) -> SessionFormation:
        return cls(kind="Explicit", timestamp=timestamp)

    @classmethod
    def inactivity_timeout(
        cls,
        threshold_secs: int,
        previous_session_id: str | None,
        timestamp: str | datetime,
    ) -> SessionFormation:
        return cls(
            kind="InactivityTimeout",
            threshold_secs=threshold_secs,
            previous_session_id=previous_session_id,
            timestamp=timestamp,
        )


class ChildLoopRef(LosslessModel):
    """Parent-side link to a sub-agent loop in another session."""

    tool_call_id: StrictStr
    tool_name: StrictStr
    child_loop_id: StrictStr
    child_session_id: StrictStr


class SpawnRef(LosslessModel):
    """Child-side link back to the parent session/loop/tool call that spawned it."""

    parent_session_id: StrictStr
    parent_loop_id: StrictStr
    tool_call_id: StrictStr
    tool_name: StrictStr


class ParallelGroupRecord(LosslessModel):
    """Membership of a loop in an evaluational-parallelism group."""

    all_loop_ids: list[StrictStr]
    selected_loop_id: StrictStr
    selected_config_index: U64
    evaluation_usage: Usage
    is_selected: StrictBool


class LoopEvent(LosslessModel):
    """One event of a loop's stream with its per-loop sequence number."""

    sequence: U64
    event: AgentEvent


class Turn(LosslessModel):
    """One LLM call-response cycle plus the tool executions that followed."""

    _skip_if_empty = frozenset({"request_payload"})

    turn_id: TurnId
    triggered_by: TurnTrigger
    usage: Usage
    input_messages: list[AgentMessage]
    output_message: AgentMessage
    tool_results: list[AgentMessage]
    started_at: Timestamp
    ended_at: Timestamp
    request_payload: AnnotatedRequestPayload | None = None

    def index(self) -> int:
        return self.turn_id.turn_index

    def duration(self) -> timedelta:
        """``ended_at - started_at`` (micro-second resolution, like ``timedelta``)."""
        nanos = timestamp_nanos(self.ended_at) - timestamp_nanos(self.started_at)
        return timedelta(microseconds=nanos // 1000)

    def has_tool_calls(self) -> bool:
        return bool(self.tool_results)

    def all_messages(self) -> list[AgentMessage]:
        """input_messages, then output_message, then tool_results."""
        return [*self.input_messages, self.output_message, *self.tool_results]

    @property
    def started_at_dt(self) -> datetime:
        return parse_timestamp(self.started_at)

    @property
    def ended_at_dt(self) -> datetime:
        return parse_timestamp(self.ended_at)


class LoopRecord(LosslessModel):
    """A complete record of one agent-loop execution."""

    _skip_if_empty = frozenset({"compaction_block"})

    loop_id: StrictStr
    session_id: StrictStr
    agent_id: StrictStr
    # serde reads an absent Option as None; absent keys stay absent on dump.
    parent_loop_id: StrictStr | None = None
    # phi-core reads null/absent as Initial; a null read here stays null on write.
    continuation_kind: ContinuationKind | None = Field(default_factory=ContinuationKind.initial)
    started_at: Timestamp
    ended_at: Timestamp | None = None
    status: LoopStatus
    rejection: StrictStr | None = None
    config: LoopConfigSnapshot | None = None
    messages: list[AgentMessage]
    turns: list[Turn] = Field(default_factory=list)
    usage: Usage
    metadata: JsonValue = None
    events: list[LoopEvent]
    children_loop_ids: list[StrictStr]
    child_loop_refs: list[ChildLoopRef]
    parallel_group: ParallelGroupRecord | None = None
    # context::CompactionBlock, kept as the JSON phi-core wrote.
    compaction_block: JsonValue = None

    def get_turn(self, turn_index: int) -> Turn | None:
        if 0 <= turn_index < len(self.turns):
            return self.turns[turn_index]
        return None

    def turn_count(self) -> int:
        return len(self.turns)

    @property
    def started_at_dt(self) -> datetime:
        return parse_timestamp(self.started_at)

    @property
    def ended_at_dt(self) -> datetime | None:
        return None if self.ended_at is None else parse_timestamp(self.ended_at)


class Session(LosslessModel):
    """All loops of one agent session, in ``started_at`` order."""

    session_id: StrictStr
    agent_id: StrictStr
    created_at: Timestamp
    last_active_at: Timestamp
    formation: SessionFormation
    parent_spawn_ref: SpawnRef | None = None
    scope: SessionScope = SessionScope.EPHEMERAL
    loops: list[LoopRecord]

    def root_loops(self) -> list[LoopRecord]:
        """Loops with no parent, or whose parent is in another session."""
        ids = {lp.loop_id for lp in self.loops}
        return [
            lp for lp in self.loops if lp.parent_loop_id is None or lp.parent_loop_id not in ids
        ]

    def children_of(self, loop_id: str) -> list[LoopRecord]:
        """Direct same-session children of ``loop_id`` (via its ``children_loop_ids``)."""
        record = self.get_loop(loop_id)
        if record is None:
            return []
        ids = set(record.children_loop_ids)
        return [lp for lp in self.loops if lp.loop_id in ids]

    def parallel_siblings(self, loop_id: str) -> list[LoopRecord]:
        """All loops of ``loop_id``'s parallel group (itself included); [] if none."""
        record = self.get_loop(loop_id)
        if record is None or record.parallel_group is None:
            return []
        ids = set(record.parallel_group.all_loop_ids)
        return [lp for lp in self.loops if lp.loop_id in ids]

    def get_loop(self, loop_id: str) -> LoopRecord | None:
        for lp in self.loops:
            if lp.loop_id == loop_id:
                return lp
        return None

    def loop_chain_to(self, target_loop_id: str) -> list[str]:
        """Loop ids from the root to ``target_loop_id`` following ``parent_loop_id``."""
        by_id = {lp.loop_id: lp for lp in self.loops}
        chain = [target_loop_id]
        seen = {target_loop_id}
        current = by_id.get(target_loop_id)
        while current is not None and current.parent_loop_id is not None:
            parent = current.parent_loop_id
            chain.append(parent)
            if parent in seen:  # a cycle in corrupt data; phi-core would loop forever
                break
            seen.add(parent)
            current = by_id.get(parent)
        chain.reverse()
        return chain

    def total_usage(self) -> Usage:
        total = Usage.zero()
        for lp in self.loops:
            total = total.combine(lp.usage)
        return total

    def iter_loops(self) -> Iterator[LoopRecord]:
        return iter(self.loops)

    @property
    def created_at_dt(self) -> datetime:
        return parse_timestamp(self.created_at)

    @property
    def last_active_at_dt(self) -> datetime:
        return parse_timestamp(self.last_active_at)

    def header(self) -> dict[str, Any]:
        """Every field but ``loops``, as phi-core JSON (for manifests)."""
        return self.model_dump(mode="json", exclude={"loops"})
