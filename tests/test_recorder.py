"""SessionRecorder: every behaviour of phi-core's recorder.rs, on hand-built event streams,
plus exact replay of real phi-core output and live persistence into a store."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import fixture_paths, lock_held_in_thread
from loopstore.errors import InvalidSessionId, SessionLocked, StorageError
from loopstore.recorder import (
    CallbackError,
    PersistError,
    RecorderCallbackError,
    SessionRecorder,
    SessionRecorderConfig,
)

ZERO = {
    "input": 0,
    "output": 0,
    "reasoning": 0,
    "cache_read": 0,
    "cache_write": 0,
    "total_tokens": 0,
}
Ev = dict[str, Any]


def ts(n: int) -> str:
    return f"2025-06-01T10:00:{n:02d}.250192131Z"


def usage(inp: int, out: int) -> dict[str, int]:
    return {**ZERO, "input": inp, "output": out, "total_tokens": inp + out}


def start(
    sid: str,
    lid: str,
    *,
    parent: str | None = None,
    kind: Any = "Initial",
    t: int = 0,
    agent: str = "agent-1",
    snapshot: dict[str, Any] | None = None,
    metadata: Any = None,
) -> Ev:
    ev: Ev = {
        "type": "AgentStart",
        "agent_id": agent,
        "session_id": sid,
        "loop_id": lid,
        "parent_loop_id": parent,
        "continuation_kind": kind,
        "timestamp": ts(t),
        "metadata": metadata,
    }
    if snapshot is not None:
        ev["config_snapshot"] = snapshot
    return ev


def end(
    lid: str, *, messages: list[Any] | None = None, t: int = 9, rejection: str | None = None
) -> Ev:
    return {
        "type": "AgentEnd",
        "loop_id": lid,
        "messages": messages or [],
        "usage": usage(10, 5) if messages else dict(ZERO),
        "timestamp": ts(t),
        "rejection": rejection,
    }


def user_msg(text: str, ms: int = 1748772930253) -> Ev:
    return {"content": [{"text": text, "type": "text"}], "role": "user", "timestamp": ms}


def assistant_msg(
    text: str, lid: str, turn: int, *, tool_calls: list[tuple[str, str]] = (), model: str = "m-1"
) -> Ev:
    content: list[Ev] = [{"text": text, "type": "text"}]
    content += [{"arguments": {}, "id": i, "name": n, "type": "toolCall"} for i, n in tool_calls]
    return {
        "content": content,
        "model": model,
        "provider": "prov",
        "role": "assistant",
        "stopReason": "toolUse" if tool_calls else "stop",
        "timestamp": 1748772931273,
        "turnId": {"loopId": lid, "turnIndex": turn},
        "usage": {
            "cache_read": 0,
            "cache_write": 0,
            "input": 5,
            "output": 3,
            "reasoning": 0,
            "total_tokens": 8,
        },
    }


def tool_result(tc_id: str, name: str, text: str, *, error: bool = False) -> Ev:
    return {
        "content": [{"text": text, "type": "text"}],
        "isError": error,
        "role": "toolResult",
        "timestamp": 1748772931353,
        "toolCallId": tc_id,
        "toolName": name,
    }


def turn_start(lid: str, i: int, trigger: str = "User", t: int = 1) -> Ev:
    return {
        "type": "TurnStart",
        "loop_id": lid,
        "turn_index": i,
        "timestamp": ts(t),
        "triggered_by": trigger,
    }


def msg_end(lid: str, message: Ev) -> Ev:
    return {"type": "MessageEnd", "loop_id": lid, "message": message}


def turn_end(lid: str, message: Ev, results: list[Ev] | None = None, t: int = 2) -> Ev:
    return {
        "type": "TurnEnd",
        "loop_id": lid,
        "message": message,
        "usage": usage(5, 3),
        "timestamp": ts(t),
        "tool_results": results or [],
    }


def tool_end(
    lid: str, tc_id: str, name: str, *, child: str | None = None, text: str = "done"
) -> Ev:
    result: Ev = {"content": [{"type": "text", "text": text}], "details": None}
    if child is not None:
        result["child_loop_id"] = child
    return {
        "type": "ToolExecutionEnd",
        "loop_id": lid,
        "tool_call_id": tc_id,
        "tool_name": name,
        "result": result,
        "is_error": False,
        "child_loop_id": child,
    }


def simple_loop(
    sid: str, lid: str, *, parent: str | None = None, kind: Any = "Initial", t0: int = 0
) -> list[Ev]:
    """AgentStart, one text turn, AgentEnd."""
    u = user_msg(f"question for {lid}")
    a = assistant_msg(f"answer for {lid}", lid, 0)
    trig = "User" if parent is None else "Continuation"
    return [
        start(sid, lid, parent=parent, kind=kind, t=t0),
        turn_start(lid, 0, trig, t=t0 + 1),
        {"type": "MessageStart", "loop_id": lid, "message": u},
        msg_end(lid, u),
        {"type": "MessageStart", "loop_id": lid, "message": a},
        msg_end(lid, a),
        turn_end(lid, a, t=t0 + 2),
        end(lid, messages=[u, a], t=t0 + 3),
    ]


def feed(rec: SessionRecorder, events: list[Ev]) -> SessionRecorder:
    for ev in events:
        rec.on_event(copy.deepcopy(ev))
    return rec


def one_session(rec: SessionRecorder) -> dict[str, Any]:
    values = rec.session_values()
    assert len(values) == 1
    return values[0]


# ---------------------------------------------------------------- grouping & status


def test_single_loop_session() -> None:
    rec = feed(SessionRecorder(), simple_loop("s-1", "s-1.cfg.1"))
    assert rec.current_loop("s-1.cfg.1") is None
    rec.flush()
    sessions = rec.sessions()
    assert len(sessions) == 1
    s = sessions[0]
    assert (s.session_id, s.agent_id, len(s.loops)) == ("s-1", "agent-1", 1)
    value = one_session(rec)
    assert value["created_at"] == value["last_active_at"] == ts(0)
    assert value["formation"] == {"FirstLoop": {"timestamp": ts(0)}}
    assert value["scope"] == "ephemeral" and value["parent_spawn_ref"] is None
    lp = value["loops"][0]
    assert lp["status"] == "Completed" and lp["rejection"] is None
    assert lp["started_at"] == ts(0) and lp["ended_at"] == ts(3)
    assert [m["role"] for m in lp["messages"]] == ["user", "assistant"]
    assert lp["usage"] == usage(10, 5)
    assert [e["sequence"] for e in lp["events"]] == list(range(8))
    assert lp["events"][0]["event"]["type"] == "AgentStart"
    assert "compaction_block" not in lp


def test_loops_group_by_session_and_last_active_tracks_agent_start() -> None:
    rec = SessionRecorder()
    feed(rec, simple_loop("s-a", "s-a.c.1", t0=0))
    feed(rec, simple_loop("s-b", "s-b.c.1", t0=10))
    feed(rec, simple_loop("s-a", "s-a.c.2", parent="s-a.c.1", kind="Default", t0=20))
    rec.flush()
    by_id = {v["session_id"]: v for v in rec.session_values()}
    assert [lp["loop_id"] for lp in by_id["s-a"]["loops"]] == ["s-a.c.1", "s-a.c.2"]
    assert by_id["s-a"]["created_at"] == ts(0)
    assert by_id["s-a"]["last_active_at"] == ts(20)
    assert len(by_id["s-b"]["loops"]) == 1


def test_rejected_loop() -> None:
    rec = SessionRecorder()
    feed(
        rec,
        [
            start("s", "s.c.1"),
            {"type": "InputRejected", "loop_id": "s.c.1", "reason": "PII"},
            end("s.c.1", rejection="PII"),
        ],
    )
    lp = one_session(rec)["loops"][0]
    assert lp["status"] == "Rejected" and lp["rejection"] == "PII"
    assert [e["event"]["type"] for e in lp["events"]] == ["AgentStart", "InputRejected", "AgentEnd"]


def test_running_loop_then_flush_aborts() -> None:
    rec = SessionRecorder()
    events = simple_loop("s", "s.c.1")[:-1]
    feed(rec, events)
    cur = rec.current_loop("s.c.1")
    assert (
        cur is not None and cur.status.value == "Running" if hasattr(cur.status, "value") else True
    )
    assert one_session(rec)["loops"] == []  # open loops are not in the session yet
    rec.flush()
    lp = one_session(rec)["loops"][0]
    assert lp["status"] == "Aborted"
    assert lp["ended_at"] is None and lp["messages"] == [] and lp["usage"] == ZERO
    assert len(lp["turns"]) == 1  # the finished turn stays
    assert rec.current_loop("s.c.1") is None


def test_current_loop_while_open() -> None:
    rec = SessionRecorder()
    events = simple_loop("s", "s.c.1")
    feed(rec, events[:-1])
    loop = rec.current_loop("s.c.1")
    assert loop is not None and loop.loop_id == "s.c.1" and len(loop.events) == 7
    feed(rec, events[-1:])
    assert rec.current_loop("s.c.1") is None


def test_agent_end_for_unknown_loop_is_ignored() -> None:
    rec = feed(SessionRecorder(), [end("ghost.c.1"), turn_start("ghost.c.1", 0)])
    assert rec.session_values() == []


# ---------------------------------------------------------------- loop tree


def test_continuation_links_parent_and_child() -> None:
    rec = SessionRecorder()
    feed(rec, simple_loop("s", "s.c.1"))
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=10))
    rec.flush()
    s = rec.get_session("s")
    assert s is not None
    parent = s.get_loop("s.c.1")
    child = s.get_loop("s.c.2")
    assert parent is not None and child is not None
    assert parent.children_loop_ids == ["s.c.2"]
    assert child.parent_loop_id == "s.c.1"
    assert [lp.loop_id for lp in s.root_loops()] == ["s.c.1"]
    assert [lp.loop_id for lp in s.children_of("s.c.1")] == ["s.c.2"]
    assert one_session(rec)["loops"][1]["continuation_kind"] == "Default"


def test_two_children_of_one_parent_and_rerun_kind() -> None:
    rec = SessionRecorder()
    feed(rec, simple_loop("s", "s.c.1"))
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=10))
    feed(rec, simple_loop("s", "s.c.3", parent="s.c.1", kind={"Rerun": {"tag": ts(19)}}, t0=20))
    rec.flush()
    value = one_session(rec)
    assert value["loops"][0]["children_loop_ids"] == ["s.c.2", "s.c.3"]
    assert value["loops"][2]["continuation_kind"] == {"Rerun": {"tag": ts(19)}}
    assert value["loops"][0]["parent_loop_id"] is None


def test_child_ending_before_parent_links_open_parent() -> None:
    rec = SessionRecorder()
    feed(rec, [start("s", "s.c.1")])
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=5))
    feed(rec, [end("s.c.1")])
    value = one_session(rec)
    assert [lp["loop_id"] for lp in value["loops"]] == ["s.c.2", "s.c.1"]
    assert value["loops"][1]["children_loop_ids"] == ["s.c.2"]


# ---------------------------------------------------------------- sub-agents


def _spawn_events(order: str) -> list[Ev]:
    p, c = "sess-parent.mock.1", "sess-child.mock.1"
    ps = start("sess-parent", p, agent="parent-agent")
    ts_ = {
        "type": "ToolExecutionStart",
        "loop_id": p,
        "tool_call_id": "tc-1",
        "tool_name": "sub_agent",
        "args": {"task": "do work"},
    }
    cs = start("sess-child", c, parent=p, agent="child-agent")
    ce = end(c)
    te = tool_end(p, "tc-1", "sub_agent", child=c)
    pe = end(p)
    if order == "child_first":
        return [ps, ts_, cs, ce, te, pe]
    return [ps, cs, te, ce, pe]


@pytest.mark.parametrize("order", ["child_first", "tool_end_first"])
def test_cross_session_child_loop_ref_and_spawn_ref(order: str) -> None:
    rec = feed(SessionRecorder(), _spawn_events(order))
    rec.flush()
    assert len(rec.sessions()) == 2
    parent = rec.session_value("sess-parent")
    child = rec.session_value("sess-child")
    assert parent is not None and child is not None
    ploop = parent["loops"][0]
    assert ploop["child_loop_refs"] == [
        {
            "tool_call_id": "tc-1",
            "tool_name": "sub_agent",
            "child_loop_id": "sess-child.mock.1",
            "child_session_id": "sess-child",
        }
    ]
    assert ploop["children_loop_ids"] == []
    assert child["parent_spawn_ref"] == {
        "parent_session_id": "sess-parent",
        "parent_loop_id": "sess-parent.mock.1",
        "tool_call_id": "tc-1",
        "tool_name": "sub_agent",
    }
    assert child["agent_id"] == "child-agent"


def test_spawn_ref_left_unenriched_without_tool_end() -> None:
    rec = feed(
        SessionRecorder(),
        [start("sp", "sp.m.1"), start("sc", "sc.m.1", parent="sp.m.1"), end("sc.m.1")],
    )
    child = rec.session_value("sc")
    assert child is not None
    assert child["parent_spawn_ref"] == {
        "parent_session_id": "sp",
        "parent_loop_id": "sp.m.1",
        "tool_call_id": "",
        "tool_name": "",
    }


def test_spawn_ref_enriched_after_checkpoint_moved_child_to_completed() -> None:
    rec = SessionRecorder()
    p, c = "sp.mock.1", "sc.mock.1"
    feed(rec, [start("sp", p), start("sc", c, parent=p), end(c)])
    assert rec.checkpoint() == 1
    feed(rec, [tool_end(p, "tc-221", "sub_agent_221", child=c), end(p)])
    rec.flush()
    child = rec.session_value("sc")
    assert child is not None
    assert child["parent_spawn_ref"]["tool_call_id"] == "tc-221"
    assert child["parent_spawn_ref"]["tool_name"] == "sub_agent_221"


def test_malformed_loop_ids() -> None:
    rec = feed(SessionRecorder(), [start("nodots", "nodots"), end("nodots")])
    rec.flush()
    s = rec.session_value("nodots")
    assert s is not None and s["loops"][0]["config"] is None
    rec = SessionRecorder()
    feed(
        rec,
        [
            start("parent", "parent.cfg.1"),
            tool_end("parent.cfg.1", "tc", "tool", child="child-nodots"),
            end("parent.cfg.1"),
        ],
    )
    s = rec.session_value("parent")
    assert s is not None
    assert s["loops"][0]["child_loop_refs"][0]["child_session_id"] == "child-nodots"


# ---------------------------------------------------------------- parallel groups


def _parallel(end_before_agent_end: bool) -> SessionRecorder:
    a, b = "sp.cfgA.1", "sp.cfgB.2"
    pls = {"type": "ParallelLoopStart", "session_id": "sp", "loop_ids": [a, b], "timestamp": ts(0)}
    ple = {
        "type": "ParallelLoopEnd",
        "session_id": "sp",
        "selected_loop_id": b,
        "selected_config_index": 1,
        "evaluation_usage": usage(7, 1),
        "timestamp": ts(8),
    }
    body = [start("sp", a), start("sp", b)]
    if end_before_agent_end:
        body += [ple, end(a), end(b)]
    else:
        body += [end(a), end(b), ple]
    rec = feed(SessionRecorder(), [pls, *body])
    rec.flush()
    return rec


@pytest.mark.parametrize("end_first", [False, True])
def test_parallel_group_on_closed_and_open_loops(end_first: bool) -> None:
    rec = _parallel(end_first)
    value = one_session(rec)
    groups = {lp["loop_id"]: lp["parallel_group"] for lp in value["loops"]}
    base = {
        "all_loop_ids": ["sp.cfgA.1", "sp.cfgB.2"],
        "selected_loop_id": "sp.cfgB.2",
        "selected_config_index": 1,
        "evaluation_usage": usage(7, 1),
    }
    assert groups == {
        "sp.cfgA.1": {**base, "is_selected": False},
        "sp.cfgB.2": {**base, "is_selected": True},
    }
    for lp in value["loops"]:  # parallel events belong to no loop
        assert {e["event"]["type"] for e in lp["events"]} == {"AgentStart", "AgentEnd"}
    s = rec.get_session("sp")
    assert s is not None and len(s.parallel_siblings("sp.cfgB.2")) == 2


def test_parallel_end_without_start_groups_only_the_selected_loop() -> None:
    ple = {
        "type": "ParallelLoopEnd",
        "session_id": "s",
        "selected_loop_id": "s.c.1",
        "selected_config_index": 0,
        "evaluation_usage": dict(ZERO),
        "timestamp": ts(5),
    }
    rec = feed(SessionRecorder(), [start("s", "s.c.1"), end("s.c.1"), ple])
    assert one_session(rec)["loops"][0]["parallel_group"]["all_loop_ids"] == ["s.c.1"]


def test_parallel_group_reaches_checkpointed_session() -> None:
    a = "sp.c.1"
    pls = {"type": "ParallelLoopStart", "session_id": "sp", "loop_ids": [a], "timestamp": ts(0)}
    ple = {
        "type": "ParallelLoopEnd",
        "session_id": "sp",
        "selected_loop_id": a,
        "selected_config_index": 0,
        "evaluation_usage": dict(ZERO),
        "timestamp": ts(8),
    }
    rec = feed(SessionRecorder(), [pls, start("sp", a), end(a)])
    assert rec.checkpoint() == 1
    feed(rec, [ple])
    assert one_session(rec)["loops"][0]["parallel_group"]["is_selected"] is True


# ---------------------------------------------------------------- turns


def _tool_loop(lid: str = "s.cfg.1") -> list[Ev]:
    u = user_msg("Do something")
    a0 = assistant_msg("calling", lid, 0, tool_calls=[("tc-1", "test_tool")])
    r0 = tool_result("tc-1", "test_tool", "ok")
    a1 = assistant_msg("Done!", lid, 1)
    return [
        start("s", lid),
        turn_start(lid, 0, "User", t=1),
        msg_end(lid, u),
        msg_end(lid, a0),
        {
            "type": "ToolExecutionStart",
            "loop_id": lid,
            "tool_call_id": "tc-1",
            "tool_name": "test_tool",
            "args": {},
        },
        tool_end(lid, "tc-1", "test_tool", text="ok"),
        msg_end(lid, r0),
        turn_end(lid, a0, [r0], t=2),
        turn_start(lid, 1, "Continuation", t=3),
        msg_end(lid, a1),
        turn_end(lid, a1, t=4),
        end(lid, messages=[u, a0, {**r0, "turnId": {"loopId": lid, "turnIndex": 0}}, a1], t=5),
    ]


def test_turn_materialization_multi_turn() -> None:
    rec = feed(SessionRecorder(), _tool_loop())
    rec.flush()
    s = rec.get_session("s")
    assert s is not None
    lp = s.loops[0]
    assert lp.turn_count() == 2
    t0, t1 = lp.get_turn(0), lp.get_turn(1)
    assert t0 is not None and t1 is not None
    assert t0.index() == 0 and t0.has_tool_calls() and not t1.has_tool_calls()
    value = one_session(rec)["loops"][0]["turns"]
    assert value[0]["triggered_by"] == "User" and value[1]["triggered_by"] == "Continuation"
    assert [m["role"] for m in value[0]["input_messages"]] == ["user", "toolResult"]
    assert value[1]["input_messages"] == []
    assert value[0]["output_message"]["turnId"] == {"loopId": "s.cfg.1", "turnIndex": 0}
    assert value[0]["tool_results"] == [
        {**tool_result("tc-1", "test_tool", "ok"), "turnId": {"loopId": "s.cfg.1", "turnIndex": 0}}
    ]
    assert value[0]["started_at"] == ts(1) and value[0]["ended_at"] == ts(2)
    assert value[0]["usage"] == usage(5, 3)
    assert "request_payload" not in value[0]


def test_tool_results_turn_id_replaces_any_wrapper_keys() -> None:
    lid = "s.c.1"
    odd = {**tool_result("x", "t", "r"), "turnId": {"loopId": "other", "turnIndex": 9}}
    a = assistant_msg("a", lid, 0)
    rec = feed(
        SessionRecorder(), [start("s", lid), turn_start(lid, 0), turn_end(lid, a, [odd]), end(lid)]
    )
    tr = one_session(rec)["loops"][0]["turns"][0]["tool_results"][0]
    assert tr["turnId"] == {"loopId": lid, "turnIndex": 0}


def test_partial_turn_discarded_on_flush_and_on_agent_end() -> None:
    rec = feed(SessionRecorder(), [start("s", "loop-abort"), turn_start("loop-abort", 0)])
    rec.flush()
    lp = one_session(rec)["loops"][0]
    assert lp["status"] == "Aborted" and lp["turns"] == []
    rec = feed(
        SessionRecorder(),
        [start("s", "loop-orphan"), turn_start("loop-orphan", 0), end("loop-orphan")],
    )
    assert one_session(rec)["loops"][0]["turns"] == []


def test_turn_end_without_turn_start_makes_no_turn() -> None:
    lid = "s.c.1"
    rec = feed(
        SessionRecorder(), [start("s", lid), turn_end(lid, assistant_msg("a", lid, 0)), end(lid)]
    )
    lp = one_session(rec)["loops"][0]
    assert lp["turns"] == []
    assert lp["config"] == {"model": "m-1", "provider": "prov", "config_id": "c"}


# ---------------------------------------------------------------- config snapshot


def test_config_from_agent_start_snapshot_wins() -> None:
    snap = {
        "model": "snap-model",
        "provider": "anthropic",
        "config_id": "x",
        "thinking_level": "low",
    }
    lid = "s.anthropic.snap.1"
    rec = feed(
        SessionRecorder(),
        [
            start("s", lid, snapshot=snap),
            turn_start(lid, 0),
            turn_end(lid, assistant_msg("a", lid, 0)),
            end(lid),
        ],
    )
    assert one_session(rec)["loops"][0]["config"] == snap


def test_config_fallback_from_first_assistant_message() -> None:
    rec = feed(SessionRecorder(), simple_loop("s", "s.anthropic.claude.1"))
    assert one_session(rec)["loops"][0]["config"] == {
        "model": "m-1",
        "provider": "prov",
        "config_id": "anthropic.claude",
    }
    lid = "s.only-one-dot"
    rec = feed(
        SessionRecorder(),
        [start("s", lid), end(lid, messages=[user_msg("u"), assistant_msg("a", lid, 0)])],
    )
    assert one_session(rec)["loops"][0]["config"]["config_id"] is None
    rec = feed(SessionRecorder(), [start("s", "s.c.1"), end("s.c.1", messages=[user_msg("u")])])
    assert one_session(rec)["loops"][0]["config"] is None


# ---------------------------------------------------------------- streaming & sequences


def _with_updates(lid: str = "s.c.1") -> list[Ev]:
    events = simple_loop("s", lid)
    a = events[5]["message"]
    upd = {
        "type": "MessageUpdate",
        "loop_id": lid,
        "message": a,
        "delta": {"Text": {"delta": "an"}},
    }
    return [*events[:5], upd, copy.deepcopy(upd), *events[5:]]


def test_message_update_dropped_by_default() -> None:
    lp = one_session(feed(SessionRecorder(), _with_updates()))["loops"][0]
    assert "MessageUpdate" not in [e["event"]["type"] for e in lp["events"]]
    assert [e["sequence"] for e in lp["events"]] == list(range(8))


def test_message_update_kept_when_asked() -> None:
    rec = feed(
        SessionRecorder(SessionRecorderConfig(include_streaming_events=True)), _with_updates()
    )
    lp = one_session(rec)["loops"][0]
    assert [e["event"]["type"] for e in lp["events"]].count("MessageUpdate") == 2
    assert [e["sequence"] for e in lp["events"]] == list(range(10))


def test_events_keep_their_verbatim_payload() -> None:
    events = simple_loop("s", "s.c.1")
    events[0]["metadata"] = {"nested": {"n": [1, 2.5, None, "x"]}, "big": 2**63 - 1}
    events[0]["timestamp"] = "2025-06-01T10:00:00Z"
    lp = one_session(feed(SessionRecorder(), events))["loops"][0]
    assert lp["events"][0]["event"] == events[0]
    assert lp["metadata"] == events[0]["metadata"]
    assert lp["started_at"] == "2025-06-01T10:00:00Z"


def test_progress_message_with_empty_loop_id_is_not_recorded() -> None:
    events = simple_loop("s", "s.c.1")
    events.insert(
        3,
        {
            "type": "ProgressMessage",
            "loop_id": "",
            "tool_call_id": "t",
            "tool_name": "n",
            "text": "x",
        },
    )
    events.insert(
        3,
        {
            "type": "ProgressMessage",
            "loop_id": "s.c.1",
            "tool_call_id": "t",
            "tool_name": "n",
            "text": "y",
        },
    )
    lp = one_session(feed(SessionRecorder(), events))["loops"][0]
    texts = [
        e["event"].get("text") for e in lp["events"] if e["event"]["type"] == "ProgressMessage"
    ]
    assert texts == ["y"]


# ---------------------------------------------------------------- routing, variant by variant


RL = "s.c.1"


def _variant_samples() -> dict[str, Ev]:
    """One event of every AgentEvent variant phi-core 0.10 defines, naming loop RL."""
    u = user_msg("q")
    a = assistant_msg("a", RL, 0)
    result: Ev = {"content": [{"type": "text", "text": "out"}], "details": None}
    return {
        "AgentStart": start("s", RL),
        "AgentEnd": end(RL),
        "TurnStart": turn_start(RL, 0),
        "TurnRequest": _turn_request_loop(RL)[4],
        "TurnEnd": turn_end(RL, a),
        "MessageStart": {"type": "MessageStart", "loop_id": RL, "message": u},
        "MessageUpdate": {
            "type": "MessageUpdate",
            "loop_id": RL,
            "message": a,
            "delta": {"Text": {"delta": "a"}},
        },
        "MessageEnd": msg_end(RL, u),
        "ToolExecutionStart": {
            "type": "ToolExecutionStart",
            "loop_id": RL,
            "tool_call_id": "t1",
            "tool_name": "bash",
            "args": {"command": "ls"},
        },
        "ToolExecutionUpdate": {
            "type": "ToolExecutionUpdate",
            "loop_id": RL,
            "tool_call_id": "t1",
            "tool_name": "bash",
            "partial_result": result,
        },
        "ToolExecutionEnd": tool_end(RL, "t1", "bash"),
        "ProgressMessage": {
            "type": "ProgressMessage",
            "loop_id": RL,
            "tool_call_id": "t1",
            "tool_name": "bash",
            "text": "running",
        },
        "InputRejected": {"type": "InputRejected", "loop_id": RL, "reason": "PII"},
        "ParallelLoopStart": {
            "type": "ParallelLoopStart",
            "session_id": "s",
            "loop_ids": [RL],
            "timestamp": ts(1),
        },
        "ParallelLoopEnd": {
            "type": "ParallelLoopEnd",
            "session_id": "s",
            "selected_loop_id": RL,
            "selected_config_index": 0,
            "evaluation_usage": dict(ZERO),
            "timestamp": ts(2),
        },
        "CompactionStarted": {
            "type": "CompactionStarted",
            "loop_id": RL,
            "estimated_tokens": 1000,
            "message_count": 12,
            "timestamp": ts(1),
        },
        "PrunApplied": {
            "type": "PrunApplied",
            "loop_id": RL,
            "tokens_removed": 10,
            "messages_removed": 2,
            "memo": None,
            "pruned_timestamps": [1, 2],
            "timestamp": ts(1),
        },
        "RevertApplied": {
            "type": "RevertApplied",
            "loop_id": RL,
            "category": "failure",
            "target": 12,
            "abandoned_node_ids": [13, 14],
            "summary": "dead end",
            "applied": True,
            "reason": None,
            "timestamp": ts(1),
        },
        "CompactionEnded": {
            "type": "CompactionEnded",
            "loop_id": RL,
            "messages_before": 12,
            "messages_after": 4,
            "estimated_tokens_before": 1000,
            "estimated_tokens_after": 300,
            "loops_compacted": 1,
            "timestamp": ts(2),
        },
    }


# phi-core 0.10: recorder.rs's own arms, then the catch-all through helpers.rs `loop_id_of`
# (TurnStart, TurnRequest, MessageStart, MessageEnd, ToolExecutionStart/Update,
# ProgressMessage and InputRejected when loop_id is not empty, CompactionStarted/Ended,
# PrunApplied; anything else, RevertApplied included, is not filed).
FILED_ALWAYS = {
    "AgentStart",
    "AgentEnd",
    "TurnStart",
    "TurnEnd",
    "MessageStart",
    "MessageEnd",
    "ToolExecutionStart",
    "ToolExecutionUpdate",
    "ToolExecutionEnd",
    "ProgressMessage",
    "InputRejected",
    "CompactionStarted",
    "CompactionEnded",
    "PrunApplied",
}
FILED_WHEN_ASKED = {"MessageUpdate", "TurnRequest"}
NEVER_FILED = {"ParallelLoopStart", "ParallelLoopEnd", "RevertApplied"}


def test_routing_table_covers_every_variant_phi_core_defines() -> None:
    from loopstore.events import KNOWN_EVENT_TYPES
    from loopstore.recorder import PHI_CORE_EVENT_ROUTES

    assert FILED_ALWAYS | FILED_WHEN_ASKED | NEVER_FILED == KNOWN_EVENT_TYPES
    assert _variant_samples().keys() == KNOWN_EVENT_TYPES
    assert PHI_CORE_EVENT_ROUTES.keys() == KNOWN_EVENT_TYPES


@pytest.mark.parametrize("asked", [False, True], ids=["default", "streaming+capture"])
@pytest.mark.parametrize("variant", sorted(FILED_ALWAYS | FILED_WHEN_ASKED | NEVER_FILED))
def test_each_variant_is_filed_exactly_as_phi_core_files_it(variant: str, asked: bool) -> None:
    samples = _variant_samples()
    middle = [] if variant in ("AgentStart", "AgentEnd") else [samples[variant]]
    config = SessionRecorderConfig(include_streaming_events=asked, capture_turn_requests=asked)
    rec = feed(SessionRecorder(config), [samples["AgentStart"], *middle, samples["AgentEnd"]])
    lp = one_session(rec)["loops"][0]
    filed = [e["event"] for e in lp["events"]]
    expected = variant in FILED_ALWAYS or (asked and variant in FILED_WHEN_ASKED)
    assert [e["type"] for e in filed].count(variant) == int(expected)
    if expected:
        assert samples[variant] in filed  # verbatim
    assert filed[0]["type"] == "AgentStart" and filed[-1]["type"] == "AgentEnd"
    assert [e["sequence"] for e in lp["events"]] == list(range(len(filed)))


def test_revert_applied_is_dropped_like_phi_core_and_takes_no_sequence_number() -> None:
    samples = _variant_samples()
    events = simple_loop("s", RL)
    stream = [
        *events[:4],
        samples["RevertApplied"],
        samples["PrunApplied"],
        samples["RevertApplied"],
        *events[4:],
    ]
    lp = one_session(feed(SessionRecorder(), stream))["loops"][0]
    types = [e["event"]["type"] for e in lp["events"]]
    assert "RevertApplied" not in types
    assert types[4] == "PrunApplied" and len(types) == len(events) + 1
    assert [e["sequence"] for e in lp["events"]] == list(range(len(types)))


@pytest.mark.parametrize("variant", ["ProgressMessage", "InputRejected"])
def test_empty_loop_id_names_no_loop(variant: str) -> None:
    samples = _variant_samples()
    nameless = {**samples[variant], "loop_id": ""}
    rec = feed(SessionRecorder(), [samples["AgentStart"], nameless, samples["AgentEnd"]])
    types = [e["event"]["type"] for e in one_session(rec)["loops"][0]["events"]]
    assert types == ["AgentStart", "AgentEnd"]


def test_events_for_a_loop_that_is_not_open_are_dropped() -> None:
    samples = _variant_samples()
    late = [samples[v] for v in sorted(FILED_ALWAYS - {"AgentStart", "AgentEnd"})]
    rec = feed(SessionRecorder(), [*simple_loop("s", RL), *late])
    types = [e["event"]["type"] for e in one_session(rec)["loops"][0]["events"]]
    assert types == [e["type"] for e in simple_loop("s", RL)]


# ---------------------------------------------------------------- TurnRequest capture


def _turn_request_loop(lid: str = "s.c.1") -> list[Ev]:
    events = simple_loop("s", lid)
    req = {
        "type": "TurnRequest",
        "loop_id": lid,
        "turn_index": 0,
        "timestamp": ts(1),
        "payload": {
            "system_prompt": "sys",
            "messages": [],
            "provenance": [],
            "tools": [],
            "model_id": "m-1",
            "thinking_level": "off",
            "max_tokens": 10,
            "temperature": 0.5,
            "response_format": {"kind": "text"},
        },
    }
    return [*events[:4], req, *events[4:]]


def test_turn_request_ignored_by_default() -> None:
    lp = one_session(feed(SessionRecorder(), _turn_request_loop()))["loops"][0]
    assert "TurnRequest" not in [e["event"]["type"] for e in lp["events"]]
    assert "request_payload" not in lp["turns"][0]


def test_turn_request_captured_when_asked() -> None:
    events = _turn_request_loop()
    rec = feed(SessionRecorder(SessionRecorderConfig(capture_turn_requests=True)), events)
    lp = one_session(rec)["loops"][0]
    assert [e["event"]["type"] for e in lp["events"]][4] == "TurnRequest"
    assert lp["turns"][0]["request_payload"] == events[4]["payload"]


# ---------------------------------------------------------------- session callbacks


def test_before_task_fires_once_per_new_session_and_cannot_reject() -> None:
    seen: list[str] = []

    def before(session: Any) -> bool:
        seen.append(session.session_id)
        assert session.loops == []
        return False

    rec = SessionRecorder(SessionRecorderConfig(before_task=before))
    feed(rec, simple_loop("s", "s.c.1"))
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default"))
    feed(rec, simple_loop("t", "t.c.1"))
    assert seen == ["s", "t"]
    assert rec.get_session("s") is not None


def test_after_task_fires_on_flush_only() -> None:
    seen: list[tuple[str, int]] = []
    rec = SessionRecorder(
        SessionRecorderConfig(after_task=lambda s: seen.append((s.session_id, len(s.loops))))
    )
    feed(rec, simple_loop("s", "s.c.1"))
    assert seen == []
    rec.checkpoint()
    assert seen == []
    feed(rec, [start("u", "u.c.1")])
    rec.flush()
    assert seen == [("u", 1)]  # only sessions still open at flush are finalized there


def test_callback_error_raised_after_state_is_consistent() -> None:
    def boom(session: Any) -> bool:
        raise RuntimeError("hook failed")

    rec = SessionRecorder(SessionRecorderConfig(before_task=boom))
    with pytest.raises(RecorderCallbackError) as info:
        rec.on_event(start("s", "s.c.1"))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert rec.current_loop("s.c.1") is not None  # the event was fully recorded
    assert len(rec.callback_errors) == 1


def test_callback_error_goes_to_on_error_when_given() -> None:
    reports: list[Any] = []

    def boom(session: Any) -> None:
        raise ValueError("after failed")

    rec = SessionRecorder(SessionRecorderConfig(after_task=boom), on_error=reports.append)
    feed(rec, simple_loop("s", "s.c.1"))
    rec.flush()
    assert len(reports) == 1 and isinstance(reports[0], CallbackError)
    assert reports[0].callback == "after_task" and reports[0].session_id == "s"
    assert rec.get_session("s") is not None


# ---------------------------------------------------------------- checkpoint & drain


def test_checkpoint_promotes_only_sessions_without_open_loops() -> None:
    rec = SessionRecorder()
    feed(rec, simple_loop("done", "done.c.1"))
    feed(rec, [start("busy", "busy.c.1")])
    assert rec.checkpoint() == 1
    drained = rec.drain_completed()
    assert [s.session_id for s in drained] == ["done"]
    assert rec.drain_completed() == []
    assert [v["session_id"] for v in rec.session_values()] == ["busy"]


def test_agent_start_after_checkpoint_opens_a_second_session_object() -> None:
    rec = SessionRecorder()
    feed(rec, simple_loop("s", "s.c.1"))
    rec.checkpoint()
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=10))
    values = rec.session_values()
    assert [len(v["loops"]) for v in values] == [1, 1]
    found = rec.session_value("s")
    assert found is not None and found["loops"][0]["loop_id"] == "s.c.1"  # completed one first


# ---------------------------------------------------------------- models in, models out


def test_accepts_event_models_and_dicts_alike() -> None:
    from loopstore.events import parse_event

    events = _tool_loop()
    a = feed(SessionRecorder(), events)
    b = SessionRecorder()
    for ev in events:
        b.on_event(parse_event(copy.deepcopy(ev)))
    assert a.session_values() == b.session_values()


def test_rejects_malformed_events() -> None:
    rec = SessionRecorder()
    with pytest.raises((ValueError, TypeError)):
        rec.on_event({"no_type": 1})
    with pytest.raises((ValueError, TypeError)):
        rec.on_event({"type": "AgentStart", "loop_id": 3})


# ---------------------------------------------------------------- exact phi-core replay


def _fixture_values() -> dict[str, dict[str, Any]]:
    out = {}
    for path in fixture_paths():
        value = json.loads(path.read_text(encoding="utf-8"))
        out[value["session_id"]] = value
    return out


def replay_order(sessions: list[dict[str, Any]]) -> list[Ev]:
    """All fixture events, each sub-agent loop inlined before the tool end that reports it."""
    loops = {lp["loop_id"]: lp for s in sessions for lp in s["loops"]}
    spawned = {
        (ev["event"].get("result") or {}).get("child_loop_id")
        for lp in loops.values()
        for ev in lp["events"]
        if ev["event"]["type"] == "ToolExecutionEnd"
    }
    out: list[Ev] = []

    def emit(lp: dict[str, Any]) -> None:
        for entry in lp["events"]:
            ev = entry["event"]
            if ev["type"] == "ToolExecutionEnd":
                child = (ev.get("result") or {}).get("child_loop_id")
                if child in loops:
                    emit(loops[child])
            out.append(copy.deepcopy(ev))

    for s in sessions:
        for lp in s["loops"]:
            if lp["loop_id"] not in spawned:
                emit(lp)
    return out


def test_fixture_replay_reproduces_phi_core_exactly() -> None:

    fixtures = _fixture_values()
    assert len(fixtures) >= 3
    rec = SessionRecorder(SessionRecorderConfig(capture_turn_requests=True))
    for ev in replay_order(list(fixtures.values())):
        rec.on_event(ev)
    rec.flush()
    values = {v["session_id"]: v for v in rec.session_values()}
    assert values.keys() == fixtures.keys()
    for sid, expected in fixtures.items():
        assert values[sid] == expected, sid
        session = rec.get_session(sid)
        assert session is not None
        assert session.model_dump(mode="json") == expected


def test_fixture_replay_without_capture_drops_turn_requests_only() -> None:
    fixtures = _fixture_values()
    rec = SessionRecorder()
    for ev in replay_order(list(fixtures.values())):
        rec.on_event(ev)
    rec.flush()
    for value in rec.session_values():
        expected = copy.deepcopy(fixtures[value["session_id"]])
        for lp in expected["loops"]:
            lp["events"] = [e for e in lp["events"] if e["event"]["type"] != "TurnRequest"]
            for i, e in enumerate(lp["events"]):
                e["sequence"] = i
            for t in lp["turns"]:
                t.pop("request_payload", None)
        assert value == expected


# ---------------------------------------------------------------- persistence (fake store)


class FakeStore:
    """In-memory store with FileSystemSessionStore's append/update semantics.

    Records calls; `fail` decides per call whether to raise.
    """

    def __init__(self) -> None:
        self.loops: dict[str, list[Any]] = {}
        self.headers: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: Callable[[str, str], BaseException | None] = lambda op, sid: None

    def append_loop(self, session_id: str, loop: Any, *, session: Any = None) -> None:
        err = self.fail("append", session_id)
        if err is not None:
            raise err
        self.calls.append(("append", loop.loop_id))
        if session_id not in self.loops:
            assert session is not None and session.loops == []
            self.loops[session_id] = []
            self.headers[session_id] = session
        lst = self.loops[session_id]
        for i, old in enumerate(lst):
            if old.loop_id == loop.loop_id:
                lst[i] = loop
                return
        lst.append(loop)
        header = self.headers[session_id]
        if loop.started_at_dt > header.last_active_at_dt:  # as FileSystemSessionStore does
            self.headers[session_id] = header.model_copy(update={"last_active_at": loop.started_at})

    def update(self, session_id: str, fn: Callable[[Any], Any]) -> Any:
        from loopstore.models import Session

        err = self.fail("update", session_id)
        if err is not None:
            raise err
        self.calls.append(("update", session_id))
        current = self.headers[session_id].model_copy(
            update={"loops": list(self.loops[session_id])}
        )
        new = fn(current)
        new = current if new is None else new
        assert isinstance(new, Session)
        self.headers[session_id] = new.model_copy(update={"loops": []})
        self.loops[session_id] = list(new.loops)
        return new

    def session_value(self, sid: str) -> dict[str, Any]:
        header = self.headers[sid].model_dump(mode="json")
        header["loops"] = [lp.model_dump(mode="json") for lp in self.loops[sid]]
        return header


def test_store_gets_each_loop_at_agent_end_and_current_header() -> None:
    store = FakeStore()
    rec = SessionRecorder(store=store)
    events = simple_loop("s", "s.c.1")
    feed(rec, events[:-1])
    assert store.calls == []  # nothing is stored while the loop runs
    feed(rec, events[-1:])
    assert store.calls[0] == ("append", "s.c.1")
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=20))
    assert store.session_value("s") == one_session(rec)
    assert store.session_value("s")["last_active_at"] == ts(20)
    assert rec.pending_writes == 0


def test_store_receives_later_changes_to_closed_loops_and_aborted_loops() -> None:
    store = FakeStore()
    rec = SessionRecorder(store=store)
    feed(rec, _spawn_events("child_first"))  # spawn ref enriched after child loop stored
    feed(
        rec,
        [start("s", "s.c.1"), start("s", "s.c.2", parent="s.c.1", kind="Default"), end("s.c.2")],
    )
    rec.flush()  # s.c.1 aborted: written now, with its child link
    for value in rec.session_values():
        assert store.session_value(value["session_id"]) == value
    stored = store.session_value("s")
    assert [lp["status"] for lp in stored["loops"]] == ["Completed", "Aborted"]
    assert stored["loops"][1]["children_loop_ids"] == ["s.c.2"]


def test_locked_store_keeps_loop_pending_and_retries() -> None:
    store = FakeStore()
    reports: list[Any] = []
    rec = SessionRecorder(store=store, on_error=reports.append)
    locked = {"on": True}
    store.fail = lambda op, sid: SessionLocked(sid, "lock busy") if locked["on"] else None
    feed(rec, simple_loop("s", "s.c.1"))
    assert rec.pending_writes >= 1 and store.loops == {}
    assert isinstance(reports[0], PersistError) and reports[0].retrying
    assert rec.persist_errors[0].loop_id == "s.c.1"
    feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=20))
    assert store.loops == {}  # still locked: nothing written out of order
    locked["on"] = False
    assert rec.persist() == 0
    assert [lp.loop_id for lp in store.loops["s"]] == ["s.c.1", "s.c.2"]
    assert store.session_value("s") == one_session(rec)


def test_io_error_retried_on_flush_even_during_backoff() -> None:
    store = FakeStore()
    rec = SessionRecorder(store=store)
    fails = {"n": 1}

    def fail(op: str, sid: str) -> BaseException | None:
        if fails["n"] > 0:
            fails["n"] -= 1
            return StorageError(sid, "disk full")
        return None

    store.fail = fail
    feed(rec, simple_loop("s", "s.c.1"))
    assert rec.pending_writes >= 1
    rec.flush()
    assert rec.pending_writes == 0 and [lp.loop_id for lp in store.loops["s"]] == ["s.c.1"]


def test_invalid_session_id_is_reported_and_not_retried() -> None:
    store = FakeStore()
    store.fail = lambda op, sid: InvalidSessionId(sid, "bad id")
    rec = SessionRecorder(store=store)
    feed(rec, simple_loop("s", "s.c.1"))
    assert rec.pending_writes == 0
    assert len(rec.persist_errors) == 1 and not rec.persist_errors[0].retrying
    assert rec.get_session("s") is not None  # still in memory


# ---------------------------------------------------------------- persistence (real store)


def test_real_store_holds_exactly_what_the_recorder_recorded(tmp_path: Path) -> None:
    from loopstore.store import FileSystemSessionStore
    from loopstore.synth import generate_events

    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    rec = SessionRecorder(store=store)
    events = generate_events(11, loops=6, loop_bytes=20_000)
    for ev in events:
        rec.on_event(ev)
    rec.flush()
    assert rec.pending_writes == 0 and not rec.persist_errors
    values = rec.session_values()
    assert set(store.list_ids()) == {v["session_id"] for v in values}
    for value in values:
        assert store.load(value["session_id"]).model_dump(mode="json") == value
    assert store.verify().ok


def test_real_store_spawn_ref_enrichment_reaches_stored_header(tmp_path: Path) -> None:
    from loopstore.store import FileSystemSessionStore

    store = FileSystemSessionStore(tmp_path / "store", durable=False)
    rec = feed(SessionRecorder(store=store), _spawn_events("child_first"))
    stored = store.load("sess-child").model_dump(mode="json")
    assert stored["parent_spawn_ref"]["tool_call_id"] == "tc-1"
    assert stored == rec.session_value("sess-child")


def test_real_store_locked_session_keeps_loop_until_lock_is_free(tmp_path: Path) -> None:

    from loopstore.store import FileSystemSessionStore

    root = tmp_path / "store"
    store = FileSystemSessionStore(root, durable=False, lock_timeout=0.2, lock_poll_interval=0.02)
    rec = SessionRecorder(store=store)
    feed(rec, simple_loop("s", "s.c.1"))
    holder = FileSystemSessionStore(root, durable=False)
    with lock_held_in_thread(holder, "s"):
        feed(rec, simple_loop("s", "s.c.2", parent="s.c.1", kind="Default", t0=20))
        assert rec.pending_writes >= 1
        assert isinstance(rec.persist_errors[-1].error, SessionLocked)
        assert [lp.loop_id for lp in store.load("s").loops] == ["s.c.1"]
    rec.flush()
    assert rec.pending_writes == 0
    assert store.load("s").model_dump(mode="json") == one_session(rec)


def test_worker_killed_between_loops_loses_no_finished_loop(tmp_path: Path) -> None:
    import multiprocessing
    import os
    import signal

    from loopstore.demo import _Job, _worker_main, _WorkerArgs
    from loopstore.store import FileSystemSessionStore

    root = tmp_path / "store"
    FileSystemSessionStore(root)  # create the store before the worker opens it
    sid = "0b6f1d3e-9999-4a7c-9e21-5c3a7f9b1d99"
    job = _Job(sid, "agent-kill", 200, 5, "")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    args = (_WorkerArgs(0, str(root), (job,), 20_000), q, ctx.Event())
    proc = ctx.Process(target=_worker_main, args=args)
    proc.start()
    acked = 0
    try:
        while acked < 4:
            msg = q.get(timeout=60)
            assert msg[0] == "loop", msg
            acked = msg[2]
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    store = FileSystemSessionStore(root)
    session = store.load(sid)
    assert len(session.loops) >= acked
    assert len(session.loops) < 200
    assert all(lp.status.value in ("Completed", "Rejected") for lp in session.loops)
    assert len({lp.loop_id for lp in session.loops}) == len(session.loops)
    assert store.verify().ok


def test_unknown_event_types_naming_a_loop_are_kept() -> None:
    events = simple_loop("s", "s.c.1")
    future = {"type": "SomethingNew", "loop_id": "s.c.1", "payload": {"x": [1, None]}}
    rec = feed(SessionRecorder(), [*events[:2], future, *events[2:]])
    lp = one_session(rec)["loops"][0]
    assert lp["events"][2] == {"sequence": 2, "event": future}
