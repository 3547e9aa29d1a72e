"""Session model: lossless phi-core JSON, Python construction, tree helpers, errors."""

from __future__ import annotations

import json
import operator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from helpers import fixture_paths, load_fixture, load_fixture_text, make_loop, make_session
from loopstore.models import (
    ChildLoopRef,
    ContinuationKind,
    LoopConfigSnapshot,
    LoopRecord,
    LoopStatus,
    ParallelGroupRecord,
    Session,
    SessionFormation,
    SessionScope,
    TurnTrigger,
    Usage,
    format_timestamp,
    parse_timestamp,
)

FIXTURES = fixture_paths()


def test_three_fixtures_present() -> None:
    assert len(FIXTURES) == 3


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_round_trip_is_value_and_byte_identical(path: Any) -> None:
    text = load_fixture_text(path)
    session = Session.model_validate_json(text)
    dumped = session.model_dump(mode="json")
    assert dumped == json.loads(text)
    assert json.dumps(dumped, indent=2, ensure_ascii=False) == text
    assert session.model_dump_json(indent=2) == text
    # python-mode dump and a second round trip change nothing either
    assert json.dumps(session.model_dump(), indent=2, ensure_ascii=False) == text
    again = Session.model_validate(json.loads(text))
    assert again.model_dump(mode="json") == dumped


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_holds_no_unknowns(path: Any) -> None:
    """Everything phi-core wrote is understood by a typed model (no fallbacks used)."""
    from pydantic import BaseModel

    found: list[str] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, BaseModel):
            if type(obj).__name__.startswith("Unknown") or obj.__pydantic_extra__:
                found.append(f"{where}: {type(obj).__name__} {obj.__pydantic_extra__}")
            for name in type(obj).model_fields:
                walk(getattr(obj, name), f"{where}.{name}")
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, f"{where}[{i}]")

    walk(load_fixture(path), "session")
    assert found == []


def test_timestamps_keep_nanoseconds_and_offer_datetime() -> None:
    session = load_fixture(FIXTURES[0])
    assert session.created_at == "2025-06-01T10:15:30.250192131Z"
    assert session.created_at_dt == datetime(2025, 6, 1, 10, 15, 30, 250192, tzinfo=timezone.utc)
    loop = session.loops[0]
    assert loop.ended_at_dt is not None and loop.ended_at_dt > loop.started_at_dt
    turn = loop.turns[0]
    assert abs(turn.duration() - (turn.ended_at_dt - turn.started_at_dt)) <= timedelta(
        microseconds=1
    )


@pytest.mark.parametrize(
    ("dt", "nanos", "text"),
    [
        (datetime(2025, 6, 1, 10, 15, 30, tzinfo=timezone.utc), None, "2025-06-01T10:15:30Z"),
        (
            datetime(2025, 6, 1, 10, 15, 30, 250000, tzinfo=timezone.utc),
            None,
            "2025-06-01T10:15:30.250Z",
        ),
        (
            datetime(2025, 6, 1, 10, 15, 30, 250192, tzinfo=timezone.utc),
            None,
            "2025-06-01T10:15:30.250192Z",
        ),
        (
            datetime(2025, 6, 1, 10, 15, 30, tzinfo=timezone.utc),
            250192131,
            "2025-06-01T10:15:30.250192131Z",
        ),
        (
            datetime(2025, 6, 1, 12, 15, 30, tzinfo=timezone(timedelta(hours=2))),
            None,
            "2025-06-01T10:15:30Z",
        ),
    ],
)
def test_format_timestamp_matches_chrono(dt: datetime, nanos: int | None, text: str) -> None:
    assert format_timestamp(dt, nanos=nanos) == text
    micros = dt.microsecond if nanos is None else nanos // 1000
    assert parse_timestamp(text) == dt.replace(microsecond=micros)


def test_parse_timestamp_handles_offsets_and_rejects_garbage() -> None:
    assert parse_timestamp("2025-06-01T12:00:00.5+02:00") == datetime(
        2025, 6, 1, 10, 0, 0, 500000, tzinfo=timezone.utc
    )
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_python_built_session_dumps_like_phi_core() -> None:
    """Option fields without skip are written as null; skip-if-none fields are absent."""
    loop = LoopRecord(
        loop_id="s.cfg.1",
        session_id="s",
        agent_id="a",
        parent_loop_id=None,
        started_at=datetime(2025, 1, 2, 3, 4, 5, 123000, tzinfo=timezone.utc),
        ended_at=None,
        status=LoopStatus.RUNNING,
        rejection=None,
        config=LoopConfigSnapshot(model="m", provider="p", config_id=None),
        messages=[],
        usage=Usage.zero(),
        metadata=None,
        events=[],
        children_loop_ids=[],
        child_loop_refs=[],
        parallel_group=None,
    )
    session = Session(
        session_id="s",
        agent_id="a",
        created_at="2025-01-02T03:04:05.123Z",
        last_active_at="2025-01-02T03:04:05.123Z",
        formation=SessionFormation.first_loop("2025-01-02T03:04:05.123Z"),
        parent_spawn_ref=None,
        loops=[loop],
    )
    dumped = session.model_dump(mode="json")
    assert list(dumped) == [
        "session_id",
        "agent_id",
        "created_at",
        "last_active_at",
        "formation",
        "parent_spawn_ref",
        "scope",
        "loops",
    ]
    assert dumped["scope"] == "ephemeral"
    assert dumped["formation"] == {"FirstLoop": {"timestamp": "2025-01-02T03:04:05.123Z"}}
    lp = dumped["loops"][0]
    assert lp["started_at"] == "2025-01-02T03:04:05.123Z"
    assert lp["continuation_kind"] == "Initial"
    assert lp["ended_at"] is None and lp["rejection"] is None and lp["metadata"] is None
    assert lp["config"] == {"model": "m", "provider": "p", "config_id": None}
    assert lp["turns"] == []
    assert "compaction_block" not in lp
    assert lp["usage"] == {
        "input": 0,
        "output": 0,
        "reasoning": 0,
        "cache_read": 0,
        "cache_write": 0,
        "total_tokens": 0,
    }
    assert Session.model_validate_json(session.model_dump_json()).model_dump() == dumped


def test_absent_stays_absent_and_null_stays_null() -> None:
    data = json.loads(load_fixture_text(FIXTURES[0]))
    loop = data["loops"][0]
    del loop["turns"]  # serde(default): older files may lack it
    loop["continuation_kind"] = None  # phi-core reads null as Initial
    del data["scope"]
    session = Session.model_validate(data)
    dumped = session.model_dump(mode="json")
    assert "turns" not in dumped["loops"][0]
    assert dumped["loops"][0]["continuation_kind"] is None
    assert "scope" not in dumped
    assert session.scope is SessionScope.EPHEMERAL
    assert dumped == data


def test_enums_and_tagged_variants() -> None:
    assert ContinuationKind.model_validate({"Rerun": {"tag": "2025-01-01T00:00:00Z"}}).tag == (
        "2025-01-01T00:00:00Z"
    )
    for raw in ["Initial", "Default", "Compaction", {"Branch": {"tag": "t"}}, {"Future": {"x": 1}}]:
        assert ContinuationKind.model_validate(raw).model_dump(mode="json") == raw
    assert ContinuationKind.branch("t").model_dump() == {"Branch": {"tag": "t"}}
    formation = {
        "InactivityTimeout": {
            "threshold_secs": 600,
            "previous_session_id": None,
            "timestamp": "2025-01-01T00:00:00Z",
        }
    }
    parsed = SessionFormation.model_validate(formation)
    assert parsed.kind == "InactivityTimeout" and parsed.threshold_secs == 600
    assert parsed.model_dump(mode="json") == formation
    assert TurnTrigger("FollowUp").canonical is TurnTrigger.CONTINUATION
    unknown = LoopStatus("Paused")
    assert unknown.value == "Paused" and not unknown.is_known
    assert LoopStatus.COMPLETED.is_known


def test_follow_up_read_from_json_equals_continuation_and_dumps_as_read() -> None:
    """phi-core reads the pre-0.10 "FollowUp" as Continuation; the dump keeps "FollowUp"."""
    text = load_fixture_text(FIXTURES[0])
    old = text.replace('"triggered_by": "Continuation"', '"triggered_by": "FollowUp"')
    assert old != text
    session = Session.model_validate_json(old)
    triggers = [t.triggered_by for lp in session.loops for t in lp.turns]
    old_style = [t for t in triggers if t.value == "FollowUp"]
    assert old_style and all(t is TurnTrigger.FOLLOW_UP for t in old_style)
    for trigger in old_style:
        # both operand orders, and != as well as ==
        assert trigger == TurnTrigger.CONTINUATION
        assert operator.eq(TurnTrigger.CONTINUATION, trigger)
        assert operator.ne(trigger, TurnTrigger.CONTINUATION) is False
        assert trigger == "Continuation" and operator.eq("Continuation", trigger)
        assert trigger != TurnTrigger.USER and trigger != "User"
        # hashing agrees with equality
        assert hash(trigger) == hash(TurnTrigger.CONTINUATION) == hash("Continuation")
        assert {trigger, TurnTrigger.CONTINUATION} == {TurnTrigger.CONTINUATION}
        assert {TurnTrigger.CONTINUATION: "c"}[trigger] == "c"
        assert trigger in (TurnTrigger.CONTINUATION,)
    # lossless: the spelling read is the spelling written
    assert session.model_dump_json(indent=2) == old
    assert json.dumps(session.model_dump(mode="json"), indent=2, ensure_ascii=False) == old
    assert TurnTrigger.FOLLOW_UP.value == "FollowUp" and str(TurnTrigger.FOLLOW_UP) == "FollowUp"
    # the other triggers keep plain identity semantics
    assert TurnTrigger.USER == "User" and hash(TurnTrigger.USER) == hash("User")
    assert TurnTrigger.USER != TurnTrigger.SUB_AGENT
    assert TurnTrigger("Paused") == "Paused" and TurnTrigger("Paused") != TurnTrigger.USER


def test_tree_helpers() -> None:
    session = make_session("tree", 3)
    ids = [lp.loop_id for lp in session.loops]
    assert [lp.loop_id for lp in session.root_loops()] == [ids[0]]
    assert [lp.loop_id for lp in session.children_of(ids[0])] == [ids[1]]
    assert session.loop_chain_to(ids[2]) == ids
    assert session.get_loop(ids[1]) is session.loops[1]
    assert session.get_loop("nope") is None
    total = session.total_usage()
    assert total.input == sum(lp.usage.input for lp in session.loops)
    assert session.parallel_siblings(ids[0]) == []
    group = ParallelGroupRecord(
        all_loop_ids=ids[1:],
        selected_loop_id=ids[1],
        selected_config_index=0,
        evaluation_usage=Usage.zero(),
        is_selected=True,
    )
    session.loops[1].parallel_group = group
    assert [lp.loop_id for lp in session.parallel_siblings(ids[1])] == ids[1:]
    loop = session.loops[0]
    assert loop.turn_count() == 1 and loop.get_turn(0) is loop.turns[0] and loop.get_turn(5) is None
    turn = loop.turns[0]
    assert turn.index() == 0 and not turn.has_tool_calls()
    assert turn.all_messages() == [*turn.input_messages, turn.output_message]
    assert turn.duration() > timedelta(0)


def test_fixture_tree_and_subagent_links() -> None:
    sessions = {p.stem: load_fixture(p) for p in FIXTURES}
    refs = [r for s in sessions.values() for lp in s.loops for r in lp.child_loop_refs]
    assert refs and all(isinstance(r, ChildLoopRef) for r in refs)
    children = [s for s in sessions.values() if s.parent_spawn_ref is not None]
    assert children and children[0].parent_spawn_ref is not None
    assert children[0].parent_spawn_ref.tool_call_id == refs[0].tool_call_id
    for s in sessions.values():
        assert s.root_loops()


def test_make_loop_statuses() -> None:
    loop = make_loop("x", 4, status="Aborted", text_bytes=500)
    assert loop.status is LoopStatus.ABORTED and loop.ended_at is None
    assert make_loop("x", 5).started_at > make_loop("x", 4).started_at


# -- bad input -----------------------------------------------------------------------


def _error_locs(exc: ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


def test_wrong_type_names_the_field_path() -> None:
    data = json.loads(load_fixture_text(FIXTURES[0]))
    data["loops"][0]["usage"]["input"] = "12"
    with pytest.raises(ValidationError) as info:
        Session.model_validate_json(json.dumps(data))
    assert ("loops", 0, "usage", "input") in _error_locs(info.value)


def test_missing_required_field_names_the_field_path() -> None:
    data = json.loads(load_fixture_text(FIXTURES[0]))
    del data["loops"][0]["status"]
    del data["agent_id"]
    with pytest.raises(ValidationError) as info:
        Session.model_validate(data)
    locs = _error_locs(info.value)
    assert ("agent_id",) in locs and ("loops", 0, "status") in locs


def test_bad_timestamp_is_refused() -> None:
    data = json.loads(load_fixture_text(FIXTURES[0]))
    data["loops"][0]["started_at"] = "last tuesday"
    with pytest.raises(ValidationError) as info:
        Session.model_validate(data)
    assert ("loops", 0, "started_at") in _error_locs(info.value)


def test_truncated_json_raises_validation_error() -> None:
    text = load_fixture_text(FIXTURES[1])
    with pytest.raises(ValidationError):
        Session.model_validate_json(text[: len(text) // 2])


def test_invalid_known_event_is_not_swallowed_as_unknown() -> None:
    data = json.loads(load_fixture_text(FIXTURES[0]))
    event = data["loops"][0]["events"][1]["event"]
    assert event["type"] == "TurnStart"
    event["turn_index"] = "zero"
    with pytest.raises(ValidationError) as info:
        Session.model_validate(data)
    assert any(loc[:5] == ("loops", 0, "events", 1, "event") for loc in _error_locs(info.value))


# -- unknown keys at random depths survive --------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=8))
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_BASE = json.loads(load_fixture_text(FIXTURES[0]))


def _objects(node: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            _objects(value, out)
    elif isinstance(node, list):
        for value in node:
            _objects(value, out)


def _is_tag_wrapper(obj: dict[str, Any]) -> bool:
    """Externally tagged enum bodies ({"FirstLoop": {...}}) must keep a single key."""
    return len(obj) == 1 and next(iter(obj))[:1].isupper()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=4),
    value=_JSON,
)
def test_unknown_keys_survive_at_any_depth(picks: list[int], value: Any) -> None:
    data = json.loads(json.dumps(_BASE))
    targets: list[dict[str, Any]] = []
    _objects(data, targets)
    targets = [t for t in targets if not _is_tag_wrapper(t)]
    for i, pick in enumerate(picks):
        targets[pick % len(targets)][f"x_future_field_{i}"] = value
    session = Session.model_validate_json(json.dumps(data))
    assert session.model_dump(mode="json") == data
    assert json.loads(session.model_dump_json()) == data
    # the fast dump (no per-object sort hook) falls back to the exact one, key order too
    exact = Session.__pydantic_serializer__.to_json(session, indent=2, exclude_unset=True)
    assert session.dump_json(indent=2) == exact


def test_fast_dump_is_the_exact_dump() -> None:
    """`dump_json` skips the key-sorting hooks when no object holds unknown keys; an
    unknown key in a key-sorted object (a message) still lands in sorted order."""
    for path in FIXTURES:
        session = Session.model_validate_json(load_fixture_text(path))
        for model in (session, *session.loops):
            exact = type(model).__pydantic_serializer__.to_json(model, indent=2, exclude_unset=True)
            assert model.dump_json(indent=2) == exact
    data = json.loads(load_fixture_text(FIXTURES[0]))
    message = data["loops"][0]["messages"][0]
    message["aaa_future"] = 1
    message["zzz_future"] = 2
    loop = Session.model_validate_json(json.dumps(data)).loops[0]
    dumped = json.loads(loop.dump_json())["messages"][0]
    assert list(dumped) == sorted(dumped) and {"aaa_future", "zzz_future"} <= set(dumped)


# ---------------------------------------------------------------------------
# Hand-built phi-core 0.10 files covering what the three fixtures do not show.
# Key order is phi-core's: struct declaration order; every key inside an AgentMessage
# (serde_json::to_value) and inside serde_json::Value fields sorted.
# ---------------------------------------------------------------------------

WEIRD = (
    'ctl \x00\x01\x08\x0b\x1b\x1f\x7f tab\t nl\n cr\r bs\b ff\f quote" backslash\\ '
    "slash/ emoji 😀🧪 non-BMP 𝄞𠜎 LS\u2028 PS\u2029 bom\ufeff zwj 👩\u200d💻 rtl\u202e é"
)
SID = "0b6f1d3e-0101-4a7c-9e21-5c3a7f9b1d01"
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _usage(i: int, o: int, r: int = 0, cr: int = 0, cw: int = 0) -> dict[str, Any]:
    return {
        "input": i,
        "output": o,
        "reasoning": r,
        "cache_read": cr,
        "cache_write": cw,
        "total_tokens": i + o + cr + cw,
    }


def _msg_usage(i: int, o: int, r: int = 0, cr: int = 0, cw: int = 0) -> dict[str, Any]:
    return dict(sorted(_usage(i, o, r, cr, cw).items()))


def _tid(loop_id: str, index: int) -> dict[str, Any]:
    return {"loopId": loop_id, "turnIndex": index}


def _user(text: str, ts: int, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "content": [
            {"text": text, "type": "text"},
            {"data": PNG, "mimeType": "image/png", "type": "image"},
        ],
        "role": "user",
        "timestamp": ts,
    }
    msg.update(extra)
    return dict(sorted(msg.items()))


def _assistant(loop_id: str, turn: int, ts: int, stop: str, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "content": [
            {"signature": "EqQBCkYIBxgCKkD+/==", "thinking": "Plan: " + WEIRD, "type": "thinking"},
            {"thinking": "no signature yet", "type": "thinking"},
            {"text": "Answer " + WEIRD, "type": "text"},
            {
                "arguments": {"command": "ls -la", "env": {"A": "1", "B": None}, "timeout": 1.0},
                "id": "toolu_01X",
                "name": "bash",
                "type": "toolCall",
            },
        ],
        "model": "gpt-5",
        "provider": "openai",
        "role": "assistant",
        "stopReason": stop,
        "timestamp": ts,
        "turnId": _tid(loop_id, turn),
        "usage": _msg_usage(1200, 340, r=120, cr=64),
    }
    msg.update(extra)
    return dict(sorted(msg.items()))


def _tool_result(loop_id: str, turn: int, ts: int, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "content": [
            {"text": "stdout: " + WEIRD, "type": "text"},
            {"data": PNG, "mimeType": "image/jpeg", "type": "image"},
        ],
        "isError": False,
        "role": "toolResult",
        "timestamp": ts,
        "toolCallId": "toolu_01X",
        "toolName": "bash",
        "turnId": _tid(loop_id, turn),
    }
    msg.update(extra)
    return dict(sorted(msg.items()))


def _wire_user(text: str, ts: int) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}], "timestamp": ts}


def _wire_tool_result(ts: int) -> dict[str, Any]:
    return {
        "role": "toolResult",
        "toolCallId": "toolu_01X",
        "toolName": "bash",
        "content": [
            {"type": "text", "text": "stdout: " + WEIRD},
            {"type": "image", "data": PNG, "mimeType": "image/jpeg"},
        ],
        "isError": False,
        "timestamp": ts,
    }


EXTENSION = {
    "role": "extension",
    "kind": "ui.notice",
    "data": {"level": "warn", "text": WEIRD, "z": [1, 2.5, -3, None, True, {}, []]},
}


def _showcase_session() -> dict[str, Any]:
    """One session touching every optional shape phi-core 0.10 writes."""
    l1 = f"{SID}.openai.gpt-5.1"
    l2 = f"{SID}.fast.2"
    l3 = f"{SID}.slow.3"
    l4 = f"{SID}.pending.4"
    l5 = f"{SID}.openai.gpt-5.5"
    l6 = f"{SID}.openai.gpt-5.6"
    l7 = f"{SID}.openai.gpt-5.7"
    child = "0b6f1d3e-0102-4a7c-9e21-5c3a7f9b1d02.sub.1"
    t0 = "2025-07-04T23:59:59.999999999Z"
    t1 = "2025-07-05T00:00:00Z"
    t2 = "2025-07-05T00:00:00.500Z"
    t3 = "2025-07-05T00:00:01.000001Z"
    t4 = "2025-07-05T00:00:02.123456789Z"
    config = {
        "model": "gpt-5",
        "provider": "openai",
        "config_id": None,
        "name": "GPT-5 ✨",
        "api": "open_ai_responses",
        "base_url": "https://api.openai.com/v1",
        "reasoning": True,
        "context_window": 400000,
        "max_tokens": 128000,
        "thinking_level": "high",
        "temperature": 1.0,
    }
    a1 = _assistant(
        l1,
        0,
        1751673600100,
        "toolUse",
        nodeId=7,
        parentId=6,
        tags=[
            {
                "abandoned_node_ids": [3, 4, 5],
                "created_at_turn": 0,
                "kind": "lesson",
                "text": "bubble sort timed out",
            }
        ],
        provenanceHint={
            "kind": "loop-turn",
            "message_index": 0,
            "role": "assistant-response",
            "turn_index": 0,
        },
    )
    a1_final = _assistant(l1, 1, 1751673600400, "stop")
    tr1 = _tool_result(l1, 0, 1751673600200, nodeId=8, parentId=7)
    u1 = _user("Hello " + WEIRD, 1751673600000, provenanceHint={"kind": "steering"})
    partial = dict(
        sorted(
            {
                "content": [{"text": "Ans", "type": "text"}],
                "model": "gpt-5",
                "provider": "openai",
                "role": "assistant",
                "stopReason": "stop",
                "timestamp": 1751673600100,
                "usage": _msg_usage(0, 0),
            }.items()
        )
    )
    payload = {
        "system_prompt": "You are terse. " + WEIRD,
        "messages": [_wire_user("Hello " + WEIRD, 1751673600000), _wire_tool_result(1751673600200)],
        "provenance": [
            {"kind": "system-prompt"},
            {"kind": "identity-block", "name": "Agent", "order": 3},
            {"kind": "memory-tier", "tier": "long-term", "record_id": "mem/42.jsonl#7"},
            {"kind": "loop-turn", "turn_index": 0, "role": "tool-call-result", "message_index": 1},
            {"kind": "follow-up"},
            {"kind": "unknown"},
        ],
        "tools": [
            {
                "name": "bash",
                "description": "Run a command",
                "parameters": {"properties": {"command": {"type": "string"}}, "type": "object"},
            }
        ],
        "model_id": "gpt-5",
        "thinking_level": "high",
        "max_tokens": None,
        "temperature": 1.0,
        "response_format": {
            "kind": "json-schema",
            "schema": {"additionalProperties": False, "type": "object"},
            "name": "Out",
            "strict": True,
        },
    }
    tool_res = {
        "content": [{"type": "text", "text": "partial " + WEIRD}],
        "details": {"exit_code": 0, "ratio": 0.25, "signed": -7, "big": 18446744073709551615},
        "child_loop_id": child,
    }
    events: list[dict[str, Any]] = [
        {
            "type": "AgentStart",
            "agent_id": "agent-ü",
            "session_id": SID,
            "loop_id": l1,
            "parent_loop_id": None,
            "continuation_kind": "Initial",
            "timestamp": t0,
            "metadata": {"a": 1, "nested": {"list": [1.5, "x", None]}, "ts": 1.0},
            "config_snapshot": config,
        },
        {
            "type": "TurnStart",
            "loop_id": l1,
            "turn_index": 0,
            "timestamp": t0,
            "triggered_by": "User",
        },
        {"type": "MessageStart", "loop_id": l1, "message": u1},
        {"type": "MessageEnd", "loop_id": l1, "message": u1},
        {
            "type": "TurnRequest",
            "loop_id": l1,
            "turn_index": 0,
            "payload": payload,
            "timestamp": t1,
        },
        {"type": "MessageStart", "loop_id": l1, "message": partial},
        {
            "type": "MessageUpdate",
            "loop_id": l1,
            "message": partial,
            "delta": {"Text": {"delta": "Ans"}},
        },
        {
            "type": "MessageUpdate",
            "loop_id": l1,
            "message": partial,
            "delta": {"Thinking": {"delta": WEIRD}},
        },
        {
            "type": "MessageUpdate",
            "loop_id": l1,
            "message": partial,
            "delta": {"ToolCallDelta": {"delta": '{"command": "ls \\"-la'}},
        },
        {"type": "MessageEnd", "loop_id": l1, "message": a1},
        {
            "type": "ToolExecutionStart",
            "loop_id": l1,
            "tool_call_id": "toolu_01X",
            "tool_name": "bash",
            "args": {"command": "ls -la", "env": {"A": "1", "B": None}, "timeout": 1.0},
        },
        {
            "type": "ProgressMessage",
            "loop_id": l1,
            "tool_call_id": "toolu_01X",
            "tool_name": "bash",
            "text": "Running… " + WEIRD,
        },
        {
            "type": "ToolExecutionUpdate",
            "loop_id": l1,
            "tool_call_id": "toolu_01X",
            "tool_name": "bash",
            "partial_result": {"content": [], "details": None},
        },
        {
            "type": "ToolExecutionEnd",
            "loop_id": l1,
            "tool_call_id": "toolu_01X",
            "tool_name": "bash",
            "result": tool_res,
            "is_error": False,
            "child_loop_id": child,
        },
        {"type": "MessageStart", "loop_id": l1, "message": tr1},
        {"type": "MessageEnd", "loop_id": l1, "message": tr1},
        {
            "type": "TurnEnd",
            "loop_id": l1,
            "message": a1,
            "usage": _usage(1200, 340, r=120, cr=64),
            "timestamp": t2,
            "tool_results": [_wire_tool_result(1751673600200)],
        },
        {"type": "MessageStart", "loop_id": l1, "message": EXTENSION},
        {"type": "MessageEnd", "loop_id": l1, "message": EXTENSION},
        {
            "type": "CompactionStarted",
            "loop_id": l1,
            "estimated_tokens": 180000,
            "message_count": 42,
            "timestamp": t2,
        },
        {
            "type": "PrunApplied",
            "loop_id": l1,
            "tokens_removed": 1500,
            "messages_removed": 2,
            "memo": None,
            "pruned_timestamps": [1751673600000, 18446744073709551615],
            "timestamp": t2,
        },
        {
            "type": "PrunApplied",
            "loop_id": l1,
            "tokens_removed": 0,
            "messages_removed": 0,
            "memo": "dropped " + WEIRD,
            "pruned_timestamps": [],
            "timestamp": t2,
        },
        {
            "type": "RevertApplied",
            "loop_id": l1,
            "category": "step-summary",
            "target": 6,
            "abandoned_node_ids": [3, 4, 5],
            "summary": "checkpoint " + WEIRD,
            "applied": True,
            "reason": None,
            "timestamp": t3,
        },
        {
            "type": "RevertApplied",
            "loop_id": l1,
            "category": "failure",
            "target": None,
            "abandoned_node_ids": [],
            "summary": None,
            "applied": False,
            "reason": "revert target n99 not found",
            "timestamp": t3,
        },
        {
            "type": "CompactionEnded",
            "loop_id": l1,
            "messages_before": 42,
            "messages_after": 9,
            "estimated_tokens_before": 180000,
            "estimated_tokens_after": 30000,
            "loops_compacted": 2,
            "timestamp": t3,
        },
        {
            "type": "TurnStart",
            "loop_id": l1,
            "turn_index": 1,
            "timestamp": t3,
            "triggered_by": "Continuation",
        },
        {
            "type": "TurnEnd",
            "loop_id": l1,
            "message": a1_final,
            "usage": _usage(1200, 340, r=120, cr=64),
            "timestamp": t4,
            "tool_results": [],
        },
        {
            "type": "AgentEnd",
            "loop_id": l1,
            "messages": [u1, a1, tr1, EXTENSION, a1_final],
            "usage": _usage(2400, 680, r=240, cr=128),
            "timestamp": t4,
            "rejection": None,
        },
    ]
    turns = [
        {
            "turn_id": _tid(l1, 0),
            "triggered_by": "User",
            "usage": _usage(1200, 340, r=120, cr=64),
            "input_messages": [u1],
            "output_message": a1,
            "tool_results": [tr1],
            "started_at": t0,
            "ended_at": t2,
            "request_payload": payload,
        },
        {
            "turn_id": _tid(l1, 1),
            "triggered_by": "Continuation",
            "usage": _usage(1200, 340, r=120, cr=64),
            "input_messages": [],
            "output_message": a1_final,
            "tool_results": [],
            "started_at": t3,
            "ended_at": t4,
        },
    ]
    compaction_block = {
        "keep_first": {"startTurn": 0, "endTurn": 0},
        "keep_recent": {"range": {"startTurn": 1, "endTurn": 1}, "messages": [a1_final]},
        "keep_compacted": {
            "range": {"startTurn": 0, "endTurn": 1},
            "messages": [_user("[summary] " + WEIRD, 1751673600999), EXTENSION],
        },
        "createdAt": t4,
    }

    def loop(loop_id: str, **fields: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "loop_id": loop_id,
            "session_id": SID,
            "agent_id": "agent-ü",
            "parent_loop_id": l1,
            "continuation_kind": "Default",
            "started_at": t3,
            "ended_at": t4,
            "status": "Completed",
            "rejection": None,
            "config": None,
            "messages": [],
            "turns": [],
            "usage": _usage(0, 0),
            "metadata": None,
            "events": [],
            "children_loop_ids": [],
            "child_loop_refs": [],
            "parallel_group": None,
        }
        for key, value in fields.items():
            assert key in base or key == "compaction_block"
            base[key] = value
        return base

    group = {
        "all_loop_ids": [l2, l3, l4],
        "selected_loop_id": l2,
        "selected_config_index": 0,
        "evaluation_usage": _usage(50, 5),
    }
    parallel_events = [
        {"type": "ParallelLoopStart", "session_id": SID, "loop_ids": [l2, l3, l4], "timestamp": t3},
        {
            "type": "ParallelLoopEnd",
            "session_id": SID,
            "selected_loop_id": l2,
            "selected_config_index": 0,
            "evaluation_usage": _usage(50, 5),
            "timestamp": t4,
        },
    ]
    loops = [
        loop(
            l1,
            parent_loop_id=None,
            continuation_kind="Initial",
            started_at=t0,
            config=config,
            messages=[u1, a1, tr1, EXTENSION, a1_final],
            turns=turns,
            usage=_usage(2400, 680, r=240, cr=128),
            metadata={"a": 1, "nested": {"list": [1.5, "x", None]}, "ts": 1.0},
            events=[{"sequence": i, "event": e} for i, e in enumerate(events)],
            children_loop_ids=[l2, l3, l4, l5, l6, l7],
            child_loop_refs=[
                {
                    "tool_call_id": "toolu_01X",
                    "tool_name": "bash",
                    "child_loop_id": child,
                    "child_session_id": child.split(".")[0],
                }
            ],
            compaction_block=compaction_block,
        ),
        loop(
            l2,
            continuation_kind={"Branch": {"tag": t3}},
            parallel_group={**group, "is_selected": True},
            events=[
                {"sequence": 0, "event": parallel_events[0]},
                {"sequence": 5, "event": parallel_events[1]},
            ],
        ),
        loop(
            l3,
            continuation_kind={"Branch": {"tag": t3}},
            parallel_group={**group, "is_selected": False},
        ),
        loop(l4, status="Pending", ended_at=None, parallel_group={**group, "is_selected": False}),
        loop(
            l5,
            status="Rejected",
            rejection="PII detected: " + WEIRD,
            events=[
                {
                    "sequence": 0,
                    "event": {"type": "InputRejected", "loop_id": l5, "reason": "PII " + WEIRD},
                },
                {
                    "sequence": 1,
                    "event": {
                        "type": "AgentEnd",
                        "loop_id": l5,
                        "messages": [],
                        "usage": _usage(0, 0),
                        "timestamp": t4,
                        "rejection": "PII detected: " + WEIRD,
                    },
                },
            ],
        ),
        loop(
            l6,
            continuation_kind={"Rerun": {"tag": t3}},
            status="Aborted",
            ended_at=None,
            messages=[
                _assistant(l6, 0, 1751673601000, "aborted"),
                _assistant(
                    l6, 0, 1751673601001, "error", error_message="HTTP 529 overloaded " + WEIRD
                ),
                _assistant(l6, 0, 1751673601002, "length"),
            ],
        ),
        loop(l7, continuation_kind="Compaction", compaction_block={"createdAt": t4}),
    ]
    return {
        "session_id": SID,
        "agent_id": "agent-ü",
        "created_at": t0,
        "last_active_at": t3,
        "formation": {
            "InactivityTimeout": {
                "threshold_secs": 1800,
                "previous_session_id": None,
                "timestamp": t0,
            }
        },
        "parent_spawn_ref": {
            "parent_session_id": "0b6f1d3e-0100-4a7c-9e21-5c3a7f9b1d00",
            "parent_loop_id": "0b6f1d3e-0100-4a7c-9e21-5c3a7f9b1d00.main.3",
            "tool_call_id": "toolu_parent",
            "tool_name": "spawn_agent",
        },
        "scope": "persistent",
        "loops": loops,
    }


def test_showcase_session_round_trips_value_and_byte_identical() -> None:
    text = json.dumps(_showcase_session(), indent=2, ensure_ascii=False)
    session = Session.model_validate_json(text)
    dumped = session.model_dump(mode="json")
    assert dumped == json.loads(text)
    assert json.dumps(dumped, indent=2, ensure_ascii=False) == text
    assert json.dumps(session.model_dump(), indent=2, ensure_ascii=False) == text
    assert session.model_dump_json(indent=2) == text
    assert Session.model_validate(json.loads(text)).model_dump(mode="json") == dumped
    # the integer-valued f32 stays "1.0", the u64 max and the nanoseconds survive
    assert '"temperature": 1.0,' in text
    assert session.loops[0].config is not None and session.loops[0].config.temperature == 1.0
    assert "18446744073709551615" in text
    assert [lp.status.value for lp in session.loops] == [
        "Completed",
        "Completed",
        "Completed",
        "Pending",
        "Rejected",
        "Aborted",
        "Completed",
    ]
    assert [lp.continuation_kind.kind for lp in session.loops if lp.continuation_kind] == [
        "Initial",
        "Branch",
        "Branch",
        "Default",
        "Default",
        "Rerun",
        "Compaction",
    ]
    assert len(session.parallel_siblings(f"{SID}.fast.2")) == 3


def test_showcase_session_uses_only_typed_models() -> None:
    """Every shape in the showcase is understood by a typed model (no fallbacks)."""
    from pydantic import BaseModel

    found: list[str] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, BaseModel):
            if type(obj).__name__.startswith("Unknown") or obj.__pydantic_extra__:
                found.append(f"{where}: {type(obj).__name__}")
            for name in type(obj).model_fields:
                walk(getattr(obj, name), f"{where}.{name}")
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, f"{where}[{i}]")

    walk(Session.model_validate(_showcase_session()), "session")
    assert found == []


def test_absent_serde_options_load_and_stay_absent() -> None:
    """serde reads a missing ``Option`` field as None; such files load and dump unchanged."""
    full = json.loads(load_fixture_text(FIXTURES[0]))
    header = {k: v for k, v in full.items() if k != "parent_spawn_ref"}
    loop = dict(full["loops"][0])
    for key in ("parent_loop_id", "continuation_kind", "ended_at", "rejection", "config"):
        del loop[key]
    for key in ("metadata", "parallel_group", "turns"):
        del loop[key]
    header["loops"] = [loop]
    text = json.dumps(header, indent=2, ensure_ascii=False)
    session = Session.model_validate_json(text)
    assert json.dumps(session.model_dump(mode="json"), indent=2, ensure_ascii=False) == text
    record = session.loops[0]
    assert session.parent_spawn_ref is None and record.parent_loop_id is None
    assert record.ended_at is None and record.config is None and record.metadata is None
    assert record.continuation_kind is not None and record.continuation_kind.kind == "Initial"
    assert "continuation_kind" not in record.model_dump(mode="json")
