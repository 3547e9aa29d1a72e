"""phi-core ``AgentEvent`` variants (internally tagged by ``"type"``) and their enums.

One model per variant, named as the variant; attribute names are phi-core's serde keys
and fields are declared in phi-core's order, so dumps match phi-core key for key.
Events of a type phi-core 0.10 does not define are kept verbatim as ``UnknownEvent``.
Timestamps are phi-core's exact RFC 3339 text; ``timestamp_dt`` gives a datetime.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, TypeAdapter, model_serializer, model_validator

from loopstore._lossless import (
    F32,
    U32,
    U64,
    JsonValue,
    LosslessModel,
    OpenEnum,
    StrictBool,
    StrictStr,
    Timestamp,
)
from loopstore._timestamps import parse_timestamp
from loopstore.messages import AgentMessage, ToolResult, Usage, WireMessage


class ThinkingLevel(OpenEnum):
    OFF = "off"
    MINIMAL = "minimal"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class ApiProtocol(OpenEnum):
    """``provider::ApiProtocol`` with serde's ``snake_case`` spelling ("OpenAi" -> "open_ai")."""

    ANTHROPIC_MESSAGES = "anthropic_messages"
    OPENAI_COMPLETIONS = "open_ai_completions"
    OPENAI_RESPONSES = "open_ai_responses"
    AZURE_OPENAI_RESPONSES = "azure_open_ai_responses"
    GOOGLE_GENERATIVE_AI = "google_generative_ai"
    GOOGLE_VERTEX = "google_vertex"
    BEDROCK_CONVERSE_STREAM = "bedrock_converse_stream"


class TurnTrigger(OpenEnum):
    """What started a turn. ``FOLLOW_UP`` is the pre-0.10 spelling of ``CONTINUATION``.

    phi-core reads "FollowUp" as ``Continuation``. loopstore keeps the spelling it read
    (``value`` and dumps stay "FollowUp", lossless) but compares and hashes by the
    canonical meaning, as phi-core would: ``TurnTrigger.FOLLOW_UP ==
    TurnTrigger.CONTINUATION``, both equal the string "Continuation" and hash alike.
    Compare ``.value`` to tell the two spellings apart.
    """

    USER = "User"
    SUB_AGENT = "SubAgent"
    CONTINUATION = "Continuation"
    BRANCH = "Branch"
    FOLLOW_UP = "FollowUp"

    @property
    def canonical(self) -> TurnTrigger:
        """The 0.10 meaning: ``FOLLOW_UP`` reads as ``CONTINUATION``."""
        return TurnTrigger.CONTINUATION if self is TurnTrigger.FOLLOW_UP else self

    def _canonical_text(self) -> str:
        return str.__str__(self.canonical)

    # A str mixin compares by its text; these make a trigger compare (and hash) as the
    # text of its canonical member instead. A plain string is taken as it is.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, TurnTrigger):
            return self._canonical_text() == other._canonical_text()
        if isinstance(other, str):
            return self._canonical_text() == str.__str__(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self._canonical_text())


_CK_UNIT = ("Initial", "Default", "Compaction")


class ContinuationKind(LosslessModel):
    """How a loop relates to its parent; externally tagged in JSON.

    ``"Initial"``, ``"Default"``, ``"Compaction"`` or ``{"Rerun": {"tag": ...}}`` /
    ``{"Branch": {"tag": ...}}``. Python view: ``kind`` plus ``tag``.
    """

    kind: StrictStr
    tag: StrictStr | None = None
    # Body of a variant that is neither a unit nor a struct (unknown to 0.10), verbatim.
    payload: Any = None
    # True when the JSON was a bare string (a unit variant).
    unit: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _from_tagged(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"kind": data, "unit": True}
        if isinstance(data, dict) and len(data) == 1 and "kind" not in data:
            ((kind, body),) = data.items()
            if isinstance(body, dict):
                return {"kind": kind, **body}
            return {"kind": kind, "payload": body}
        return data

    @model_serializer(mode="plain")
    def _to_tagged(self) -> Any:
        if "payload" in self.model_fields_set:
            return {self.kind: self.payload}
        body: dict[str, Any] = {}
        if "tag" in self.model_fields_set:
            body["tag"] = self.tag
        body.update(self.__pydantic_extra__ or {})
        if not body and self.unit:
            return self.kind
        return {self.kind: body}

    def __init__(self, /, **data: Any) -> None:
        if "unit" not in data:
            data["unit"] = data.get("kind") in _CK_UNIT and data.get("tag") is None
        super().__init__(**data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def _after_init(self, data: dict[str, Any]) -> None:
        if self.tag is None:
            self.__pydantic_fields_set__.discard("tag")
        if "payload" not in data:
            self.__pydantic_fields_set__.discard("payload")

    @classmethod
    def initial(cls) -> ContinuationKind:
        return cls(kind="Initial")

    @classmethod
    def default(cls) -> ContinuationKind:
        return cls(kind="Default")

    @classmethod
    def compaction(cls) -> ContinuationKind:
        return cls(kind="Compaction")

    @classmethod
    def rerun(cls, tag: str) -> ContinuationKind:
        return cls(kind="Rerun", tag=tag)

    @classmethod
    def branch(cls, tag: str) -> ContinuationKind:
        return cls(kind="Branch", tag=tag)


class LoopConfigSnapshot(LosslessModel):
    """Model and provider that ran a loop (no secrets)."""

    _skip_if_empty = frozenset(
        {
            "name",
            "api",
            "base_url",
            "reasoning",
            "context_window",
            "max_tokens",
            "thinking_level",
            "temperature",
        }
    )

    model: StrictStr
    provider: StrictStr
    # Option without #[serde(default)]: serde still reads an absent key as None.
    config_id: StrictStr | None = None
    name: StrictStr | None = None
    api: ApiProtocol | None = None
    base_url: StrictStr | None = None
    reasoning: StrictBool | None = None
    context_window: U32 | None = None
    max_tokens: U32 | None = None
    thinking_level: ThinkingLevel | None = None
    temperature: F32 | None = None


class AnnotatedRequestPayload(LosslessModel):
    """The exact request sent to the model for one turn (phi-core 0.9+ ``TurnRequest``).

    ``provenance``, ``tools`` and ``response_format`` are kept as verbatim JSON.
    """

    system_prompt: StrictStr
    messages: list[WireMessage]
    provenance: list[JsonValue]
    tools: list[JsonValue]
    model_id: StrictStr
    thinking_level: ThinkingLevel
    max_tokens: U32 | None = None
    temperature: F32 | None = None
    response_format: JsonValue


class _Event(LosslessModel):
    @property
    def timestamp_dt(self) -> datetime | None:
        """The event's timestamp as a datetime (None for variants without one)."""
        text = getattr(self, "timestamp", None)
        return None if text is None else parse_timestamp(text)

    @property
    def event_loop_id(self) -> str | None:
        """The loop this event names (its ``loop_id``), if any.

        Not phi-core's routing: whether phi-core's recorder files the event in that
        loop's stream is ``loopstore.recorder.PHI_CORE_EVENT_ROUTES``.
        """
        value = getattr(self, "loop_id", None)
        return value if isinstance(value, str) else None


class AgentStart(_Event):
    _skip_if_empty = frozenset({"config_snapshot"})

    type: Literal["AgentStart"] = "AgentStart"
    agent_id: StrictStr
    session_id: StrictStr
    loop_id: StrictStr
    parent_loop_id: StrictStr | None = None
    # #[serde(default)]: absent reads as Initial (and stays absent on dump); a null
    # (pre-0.9 Option) is kept as null.
    continuation_kind: ContinuationKind | None = Field(default_factory=ContinuationKind.initial)
    timestamp: Timestamp
    metadata: JsonValue = None
    config_snapshot: LoopConfigSnapshot | None = None


class AgentEnd(_Event):
    type: Literal["AgentEnd"] = "AgentEnd"
    loop_id: StrictStr
    messages: list[AgentMessage]
    usage: Usage
    timestamp: Timestamp
    rejection: StrictStr | None = None


class TurnStart(_Event):
    type: Literal["TurnStart"] = "TurnStart"
    loop_id: StrictStr
    turn_index: U32
    timestamp: Timestamp
    triggered_by: TurnTrigger


class TurnRequest(_Event):
    type: Literal["TurnRequest"] = "TurnRequest"
    loop_id: StrictStr
    turn_index: U32
    payload: AnnotatedRequestPayload
    timestamp: Timestamp


class TurnEnd(_Event):
    type: Literal["TurnEnd"] = "TurnEnd"
    loop_id: StrictStr
    message: AgentMessage
    usage: Usage
    timestamp: Timestamp
    tool_results: list[WireMessage]


class MessageStart(_Event):
    type: Literal["MessageStart"] = "MessageStart"
    loop_id: StrictStr
    message: AgentMessage


class MessageUpdate(_Event):
    """A streaming delta. ``delta`` is phi-core's externally tagged ``StreamDelta``
    (``{"Text": {"delta": "..."}}``), kept verbatim; see ``delta_kind``/``delta_text``.
    """

    type: Literal["MessageUpdate"] = "MessageUpdate"
    loop_id: StrictStr
    message: AgentMessage
    delta: JsonValue

    @property
    def delta_kind(self) -> str | None:
        """``"Text"``, ``"Thinking"`` or ``"ToolCallDelta"``."""
        if isinstance(self.delta, dict) and len(self.delta) == 1:
            return str(next(iter(self.delta)))
        return self.delta if isinstance(self.delta, str) else None

    @property
    def delta_text(self) -> str | None:
        if isinstance(self.delta, dict) and len(self.delta) == 1:
            body = next(iter(self.delta.values()))
            if isinstance(body, dict) and isinstance(body.get("delta"), str):
                return str(body["delta"])
        return None


class MessageEnd(_Event):
    type: Literal["MessageEnd"] = "MessageEnd"
    loop_id: StrictStr
    message: AgentMessage


class ToolExecutionStart(_Event):
    type: Literal["ToolExecutionStart"] = "ToolExecutionStart"
    loop_id: StrictStr
    tool_call_id: StrictStr
    tool_name: StrictStr
    args: JsonValue


class ToolExecutionUpdate(_Event):
    type: Literal["ToolExecutionUpdate"] = "ToolExecutionUpdate"
    loop_id: StrictStr
    tool_call_id: StrictStr
    tool_name: StrictStr
    partial_result: ToolResult


class ToolExecutionEnd(_Event):
    type: Literal["ToolExecutionEnd"] = "ToolExecutionEnd"
    loop_id: StrictStr
    tool_call_id: StrictStr
    tool_name: StrictStr
    result: ToolResult
    is_error: StrictBool
    child_loop_id: StrictStr | None = None


class ProgressMessage(_Event):
    type: Literal["ProgressMessage"] = "ProgressMessage"
    loop_id: StrictStr
    tool_call_id: StrictStr
    tool_name: StrictStr
    text: StrictStr


class InputRejected(_Event):
    type: Literal["InputRejected"] = "InputRejected"
    loop_id: StrictStr
    reason: StrictStr


class ParallelLoopStart(_Event):
    type: Literal["ParallelLoopStart"] = "ParallelLoopStart"
    session_id: StrictStr
    loop_ids: list[StrictStr]
    timestamp: Timestamp


class ParallelLoopEnd(_Event):
    type: Literal["ParallelLoopEnd"] = "ParallelLoopEnd"
    session_id: StrictStr
    selected_loop_id: StrictStr
    selected_config_index: U64
    evaluation_usage: Usage
    timestamp: Timestamp


class CompactionStarted(_Event):
    type: Literal["CompactionStarted"] = "CompactionStarted"
    loop_id: StrictStr
    estimated_tokens: U64
    message_count: U64
    timestamp: Timestamp


class PrunApplied(_Event):
    type: Literal["PrunApplied"] = "PrunApplied"
    loop_id: StrictStr
    tokens_removed: U64
    messages_removed: U64
    memo: StrictStr | None = None
    pruned_timestamps: list[U64]
    timestamp: Timestamp


class RevertApplied(_Event):
    """A ``revert_to_state`` request was applied (or refused: ``applied`` false).

    ``category``, ``target``, ``abandoned_node_ids``, ``summary`` and ``reason`` are
    kept as the JSON phi-core wrote.
    """

    type: Literal["RevertApplied"] = "RevertApplied"
    loop_id: StrictStr
    category: JsonValue
    target: JsonValue = None
    abandoned_node_ids: JsonValue
    summary: JsonValue = None
    applied: StrictBool
    reason: JsonValue = None
    timestamp: Timestamp


class CompactionEnded(_Event):
    type: Literal["CompactionEnded"] = "CompactionEnded"
    loop_id: StrictStr
    messages_before: U64
    messages_after: U64
    estimated_tokens_before: U64
    estimated_tokens_after: U64
    loops_compacted: U64
    timestamp: Timestamp


_KNOWN_EVENT_MODELS: tuple[type[_Event], ...] = (
    AgentStart,
    AgentEnd,
    TurnStart,
    TurnRequest,
    TurnEnd,
    MessageStart,
    MessageUpdate,
    MessageEnd,
    ToolExecutionStart,
    ToolExecutionUpdate,
    ToolExecutionEnd,
    ProgressMessage,
    InputRejected,
    ParallelLoopStart,
    ParallelLoopEnd,
    CompactionStarted,
    PrunApplied,
    RevertApplied,
    CompactionEnded,
)
KNOWN_EVENT_TYPES: frozenset[str] = frozenset(m.__name__ for m in _KNOWN_EVENT_MODELS)


def _unknown_event_type(value: str) -> str:
    if value in KNOWN_EVENT_TYPES:
        raise ValueError(f"event type {value!r} is known; its fields are invalid")
    return value


class UnknownEvent(_Event):
    """An event of a type phi-core 0.10 does not define, kept verbatim."""

    type: Annotated[StrictStr, AfterValidator(_unknown_event_type)]


_KnownEvent = Annotated[
    AgentStart
    | AgentEnd
    | TurnStart
    | TurnRequest
    | TurnEnd
    | MessageStart
    | MessageUpdate
    | MessageEnd
    | ToolExecutionStart
    | ToolExecutionUpdate
    | ToolExecutionEnd
    | ProgressMessage
    | InputRejected
    | ParallelLoopStart
    | ParallelLoopEnd
    | CompactionStarted
    | PrunApplied
    | RevertApplied
    | CompactionEnded,
    Field(discriminator="type"),
]

AgentEvent = Annotated[_KnownEvent | UnknownEvent, Field(union_mode="left_to_right")]


@functools.cache
def _agent_event() -> TypeAdapter[Any]:
    """Built on first use: the adapter's schema costs ~50 ms, and the command line's
    listings never parse one."""
    return TypeAdapter(AgentEvent)


def parse_event(obj: Any) -> Any:
    """An ``AgentEvent`` model from phi-core JSON (dict, str or bytes) or an event model."""
    if isinstance(obj, _Event):
        return obj
    if isinstance(obj, (str, bytes, bytearray)):
        return _agent_event().validate_json(obj)
    return _agent_event().validate_python(obj)


__all__ = [
    "KNOWN_EVENT_TYPES",
    "AgentEnd",
    "AgentEvent",
    "AgentStart",
    "AnnotatedRequestPayload",
    "ApiProtocol",
    "CompactionEnded",
    "CompactionStarted",
    "ContinuationKind",
    "InputRejected",
    "LoopConfigSnapshot",
    "MessageEnd",
    "MessageStart",
    "MessageUpdate",
    "ParallelLoopEnd",
    "ParallelLoopStart",
    "ProgressMessage",
    "PrunApplied",
    "RevertApplied",
    "ThinkingLevel",
    "ToolExecutionEnd",
    "ToolExecutionStart",
    "ToolExecutionUpdate",
    "TurnEnd",
    "TurnRequest",
    "TurnStart",
    "TurnTrigger",
    "UnknownEvent",
    "parse_event",
]
