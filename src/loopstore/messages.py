"""phi-core messages and content blocks, in both of the key orders phi-core writes.

phi-core writes an ``AgentMessage`` (``LlmMessage``) through ``serde_json::to_value``,
so **every key inside it is sorted** (content blocks and the nested usage included):
those are ``UserMessage``, ``AssistantMessage``, ``ToolResultMessage`` with
``TextContent``, ``ImageContent``, ``ThinkingContent``, ``ToolCall`` and ``MessageUsage``,
whose fields are declared in sorted key order. ``ExtensionMessage`` is serialized
directly (``role``, ``kind``, ``data``).

The plain LLM ``Message`` (``TurnEnd.tool_results``, ``TurnRequest.payload.messages``)
and ``ToolResult.content`` are written in struct order: the ``Wire*`` models.

Unknown roles and content types are kept verbatim (``UnknownMessage``,
``UnknownContent``); Python attributes are snake_case, JSON keys camelCase (aliases).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)

from loopstore._lossless import (
    U32,
    U64,
    JsonValue,
    LosslessModel,
    OpenEnum,
    StrictBool,
    StrictStr,
)

__all__ = [
    "AgentMessage",
    "AssistantMessage",
    "Content",
    "ExtensionMessage",
    "ImageContent",
    "MessageUsage",
    "StopReason",
    "TextContent",
    "ThinkingContent",
    "ToolCall",
    "ToolResult",
    "ToolResultMessage",
    "TurnId",
    "UnknownContent",
    "UnknownMessage",
    "Usage",
    "UserMessage",
    "WireAssistantMessage",
    "WireContent",
    "WireImageContent",
    "WireMessage",
    "WireTextContent",
    "WireThinkingContent",
    "WireToolCall",
    "WireToolResultMessage",
    "WireUserMessage",
    "parse_message",
    "to_agent_message",
]


class SortedKeysModel(LosslessModel):
    """A model inside a ``serde_json::to_value`` subtree: phi-core writes its keys sorted.

    Fields are declared in sorted key order; keys these models do not know are merged
    into that order on dump, so even unknown keys come out where phi-core put them.
    """

    _sorts_keys = True

    @model_serializer(mode="wrap")
    def _sorted_keys(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if self.__pydantic_extra__ and isinstance(data, dict):
            return dict(sorted(data.items()))
        return data


class StopReason(OpenEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_USE = "toolUse"
    ERROR = "error"
    ABORTED = "aborted"
    MAX_TURNS = "maxTurns"
    USER_STOP = "userStop"
    HANDOFF = "handoff"
    GUARD_RAIL = "guardRail"
    CONTEXT_COMPACTED = "contextCompacted"
    PAUSED = "paused"


# ---------------------------------------------------------------------------
# Usage and TurnId
# ---------------------------------------------------------------------------


class _UsageMixin:
    if TYPE_CHECKING:
        input: int
        output: int
        reasoning: int
        cache_read: int
        cache_write: int
        total_tokens: int

    def cache_hit_rate(self) -> float:
        """Fraction of input tokens served from cache (phi-core ``cache_hit_rate``)."""
        total = self.input + self.cache_read + self.cache_write
        return 0.0 if total == 0 else self.cache_read / total


class Usage(_UsageMixin, LosslessModel):
    """Token usage in phi-core's struct key order (LoopRecord/Turn/event usage)."""

    input: U64
    output: U64
    reasoning: U64 = 0
    cache_read: U64 = 0
    cache_write: U64 = 0
    total_tokens: U64 = 0

    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def zero(cls) -> Usage:
        """``Usage::default()``: every counter 0, every key written."""
        return cls(input=0, output=0)

    def combine(self, other: _UsageMixin) -> Usage:
        """Field-wise sum, like phi-core's ``Usage::combine``."""
        return Usage(
            input=self.input + other.input,
            output=self.output + other.output,
            reasoning=self.reasoning + other.reasoning,
            cache_read=self.cache_read + other.cache_read,
            cache_write=self.cache_write + other.cache_write,
            total_tokens=self.total_tokens + other.total_tokens,
        )

    def __add__(self, other: _UsageMixin) -> Usage:
        return self.combine(other)


class MessageUsage(_UsageMixin, SortedKeysModel):
    """Usage inside an ``AssistantMessage``: same counters, keys written sorted.

    Accepts a ``Usage`` (or any object with the six counters) when built in Python.
    """

    model_config = ConfigDict(from_attributes=True)

    cache_read: U64 = 0
    cache_write: U64 = 0
    input: U64
    output: U64
    reasoning: U64 = 0
    total_tokens: U64 = 0

    def to_usage(self) -> Usage:
        return Usage.model_validate(self)


class TurnId(SortedKeysModel):
    """Identifies a turn: ``{"loopId", "turnIndex"}``."""

    loop_id: StrictStr = Field(alias="loopId")
    turn_index: U32 = Field(alias="turnIndex")


# ---------------------------------------------------------------------------
# Content blocks inside AgentMessage (sorted keys)
# ---------------------------------------------------------------------------

_KNOWN_CONTENT = frozenset({"text", "image", "thinking", "toolCall"})


def _unknown_content_type(value: str) -> str:
    if value in _KNOWN_CONTENT:
        raise ValueError(f"content type {value!r} is known; its fields are invalid")
    return value


class TextContent(SortedKeysModel):
    text: StrictStr
    type: Literal["text"] = "text"


class ImageContent(SortedKeysModel):
    """An inline image: base64 ``data`` and its ``mimeType``."""

    data: StrictStr
    mime_type: StrictStr = Field(alias="mimeType")
    type: Literal["image"] = "image"


class ThinkingContent(SortedKeysModel):
    _skip_if_empty = frozenset({"signature"})

    signature: StrictStr | None = None
    thinking: StrictStr
    type: Literal["thinking"] = "thinking"


class ToolCall(SortedKeysModel):
    """The model's request to call a tool; ``arguments`` is verbatim JSON."""

    arguments: JsonValue
    id: StrictStr
    name: StrictStr
    type: Literal["toolCall"] = "toolCall"


class UnknownContent(LosslessModel):
    """A content block of a type phi-core 0.10 does not define, kept verbatim."""

    type: Annotated[StrictStr, AfterValidator(_unknown_content_type)]


_KnownContent = Annotated[
    TextContent | ImageContent | ThinkingContent | ToolCall,
    Field(discriminator="type"),
]
Content = Annotated[_KnownContent | UnknownContent, Field(union_mode="left_to_right")]


# ---------------------------------------------------------------------------
# Messages (AgentMessage: sorted keys)
# ---------------------------------------------------------------------------

_KNOWN_ROLES = frozenset({"user", "assistant", "toolResult"})

# LlmMessage writes these keys only when set/non-empty and reads them leniently
# (``serde_json::from_value(..).ok()``): a null is accepted and kept.
_LLM_SKIP = frozenset({"turn_id", "node_id", "parent_id", "provenance_hint", "tags"})


def _not_llm_role(value: str) -> str:
    if value in _KNOWN_ROLES:
        raise ValueError(f"role {value!r} is an LLM role; its fields are invalid")
    return value


class UserMessage(SortedKeysModel):
    """A user turn. ``timestamp`` is Unix milliseconds."""

    _skip_if_empty = _LLM_SKIP

    content: list[Content]
    node_id: U64 | None = Field(default=None, alias="nodeId")
    parent_id: U64 | None = Field(default=None, alias="parentId")
    provenance_hint: JsonValue = Field(default=None, alias="provenanceHint")
    role: Literal["user"] = "user"
    tags: list[JsonValue] | None = Field(default_factory=list)
    timestamp: U64
    turn_id: TurnId | None = Field(default=None, alias="turnId")


class AssistantMessage(SortedKeysModel):
    """The model's response, with stop reason, model identity and usage."""

    _skip_if_empty = _LLM_SKIP | {"error_message"}

    content: list[Content]
    error_message: StrictStr | None = None
    model: StrictStr
    node_id: U64 | None = Field(default=None, alias="nodeId")
    parent_id: U64 | None = Field(default=None, alias="parentId")
    provenance_hint: JsonValue = Field(default=None, alias="provenanceHint")
    provider: StrictStr
    role: Literal["assistant"] = "assistant"
    stop_reason: StopReason = Field(alias="stopReason")
    tags: list[JsonValue] | None = Field(default_factory=list)
    timestamp: U64
    turn_id: TurnId | None = Field(default=None, alias="turnId")
    usage: MessageUsage


class ToolResultMessage(SortedKeysModel):
    """A tool's result fed back to the model (``child_loop_id``: set by sub-agent tools)."""

    _skip_if_empty = _LLM_SKIP | {"child_loop_id"}

    child_loop_id: StrictStr | None = None
    content: list[Content]
    is_error: StrictBool = Field(alias="isError")
    node_id: U64 | None = Field(default=None, alias="nodeId")
    parent_id: U64 | None = Field(default=None, alias="parentId")
    provenance_hint: JsonValue = Field(default=None, alias="provenanceHint")
    role: Literal["toolResult"] = "toolResult"
    tags: list[JsonValue] | None = Field(default_factory=list)
    timestamp: U64
    tool_call_id: StrictStr = Field(alias="toolCallId")
    tool_name: StrictStr = Field(alias="toolName")
    turn_id: TurnId | None = Field(default=None, alias="turnId")


class ExtensionMessage(LosslessModel):
    """An app-only message (never sent to the model): ``role``, ``kind``, ``data``."""

    role: Annotated[StrictStr, AfterValidator(_not_llm_role)] = "extension"
    kind: StrictStr
    data: JsonValue


class UnknownMessage(LosslessModel):
    """A message phi-core 0.10 could not have written; kept verbatim."""

    role: Annotated[StrictStr, AfterValidator(_not_llm_role)] | None = None


_LlmMessage = Annotated[
    UserMessage | AssistantMessage | ToolResultMessage,
    Field(discriminator="role"),
]

AgentMessage = Annotated[
    _LlmMessage | ExtensionMessage | UnknownMessage,
    Field(union_mode="left_to_right"),
]


@functools.cache
def _agent_message() -> TypeAdapter[Any]:
    """Built on first use: the adapter's schema costs ~50 ms, and the command line's
    listings never parse one."""
    return TypeAdapter(AgentMessage)


def parse_message(obj: Any) -> UserMessage | AssistantMessage | ToolResultMessage | Any:
    """An ``AgentMessage`` from phi-core JSON (dict or text) or a message model."""
    if isinstance(obj, LosslessModel):
        return obj
    if isinstance(obj, (str, bytes)):
        return _agent_message().validate_json(obj)
    return _agent_message().validate_python(obj)


# ---------------------------------------------------------------------------
# Wire-order models: Message, Content and ToolResult in struct key order
# ---------------------------------------------------------------------------


class WireTextContent(LosslessModel):
    type: Literal["text"] = "text"
    text: StrictStr


class WireImageContent(LosslessModel):
    type: Literal["image"] = "image"
    data: StrictStr
    mime_type: StrictStr = Field(alias="mimeType")


class WireThinkingContent(LosslessModel):
    _skip_if_empty = frozenset({"signature"})

    type: Literal["thinking"] = "thinking"
    thinking: StrictStr
    signature: StrictStr | None = None


class WireToolCall(LosslessModel):
    type: Literal["toolCall"] = "toolCall"
    id: StrictStr
    name: StrictStr
    arguments: JsonValue


_KnownWireContent = Annotated[
    WireTextContent | WireImageContent | WireThinkingContent | WireToolCall,
    Field(discriminator="type"),
]
WireContent = Annotated[_KnownWireContent | UnknownContent, Field(union_mode="left_to_right")]


class WireUserMessage(LosslessModel):
    role: Literal["user"] = "user"
    content: list[WireContent]
    timestamp: U64


class WireAssistantMessage(LosslessModel):
    _skip_if_empty = frozenset({"error_message"})

    role: Literal["assistant"] = "assistant"
    content: list[WireContent]
    stop_reason: StopReason = Field(alias="stopReason")
    model: StrictStr
    provider: StrictStr
    usage: Usage
    timestamp: U64
    error_message: StrictStr | None = None


class WireToolResultMessage(LosslessModel):
    _skip_if_empty = frozenset({"child_loop_id"})

    role: Literal["toolResult"] = "toolResult"
    tool_call_id: StrictStr = Field(alias="toolCallId")
    tool_name: StrictStr = Field(alias="toolName")
    content: list[WireContent]
    is_error: StrictBool = Field(alias="isError")
    timestamp: U64
    child_loop_id: StrictStr | None = None


WireMessage = Annotated[
    Annotated[
        WireUserMessage | WireAssistantMessage | WireToolResultMessage, Field(discriminator="role")
    ]
    | UnknownMessage,
    Field(union_mode="left_to_right"),
]


class ToolResult(LosslessModel):
    """What a tool returned: ``content``, free-form ``details``, sub-agent ``child_loop_id``."""

    _skip_if_empty = frozenset({"child_loop_id"})

    content: list[WireContent]
    details: JsonValue = None
    child_loop_id: StrictStr | None = None


_WIRE_TO_AGENT_CONTENT: dict[type[LosslessModel], type[LosslessModel]] = {
    WireTextContent: TextContent,
    WireImageContent: ImageContent,
    WireThinkingContent: ThinkingContent,
    WireToolCall: ToolCall,
}


def to_agent_message(message: Any, turn_id: TurnId | None = None) -> Any:
    """phi-core's ``AgentMessage::from(message).with_turn_id(turn_id)``.

    Takes a wire ``Message`` (model or dict) and returns the sorted-key
    ``AgentMessage`` model, with ``turnId`` set when ``turn_id`` is given.
    """
    data = message.model_dump(mode="json") if isinstance(message, LosslessModel) else dict(message)
    if turn_id is not None:
        data["turnId"] = turn_id.model_dump(mode="json")
    return _agent_message().validate_python(data)
