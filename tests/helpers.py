"""Shared test helpers: phi-core fixtures and small realistic sessions built in code."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopstore.models import LoopRecord, Session, format_timestamp
from loopstore.ondisk import JSON_INDENT, EncodedBlob, encode_blob

if TYPE_CHECKING:
    from loopstore.store import FileSystemSessionStore

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "phi-core"

_BASE_TIME = datetime(2025, 6, 1, 10, 0, 0, tzinfo=timezone.utc)
_LOOP_SPACING = timedelta(minutes=5)


def loop_blob(loop: LoopRecord, level: int = 3) -> EncodedBlob:
    """The blob the store writes for `loop` (its pretty JSON, zstd at `level`)."""
    return encode_blob(loop.model_dump_json(indent=JSON_INDENT).encode(), level)


def fixture_paths() -> list[Path]:
    """Every real phi-core session file, sorted by name."""
    return sorted(FIXTURES_DIR.glob("*.json"))


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = FIXTURES_DIR / path.name
    if candidate.is_file():
        return candidate
    candidate = FIXTURES_DIR / f"{path.name}.json"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no phi-core fixture {name_or_path!r} in {FIXTURES_DIR}")


def load_fixture_text(name_or_path: str | Path) -> str:
    """The exact text of a fixture (a path, a file name, or a session id)."""
    return _resolve(name_or_path).read_text(encoding="utf-8")


def load_fixture(name_or_path: str | Path) -> Session:
    return Session.model_validate_json(load_fixture_text(name_or_path))


def _ts(index: int, offset_ms: int = 0) -> str:
    moment = _BASE_TIME + _LOOP_SPACING * index + timedelta(milliseconds=offset_ms)
    # A fixed nanosecond tail, as phi-core writes on Linux.
    return format_timestamp(moment, nanos=moment.microsecond * 1000 + 131 + index % 7)


def _ms(index: int, offset_ms: int = 0) -> int:
    moment = _BASE_TIME + _LOOP_SPACING * index + timedelta(milliseconds=offset_ms)
    return int(moment.timestamp() * 1000)


def _filler(seed: str, size: int) -> str:
    """Deterministic prose-like text of ``size`` characters."""
    words: list[str] = []
    length = 0
    counter = 0
    while length < size:
        digest = hashlib.sha256(f"{seed}:{counter}".encode()).hexdigest()
        for i in range(0, 60, 6):
            word = digest[i : i + 2 + int(digest[i], 16) % 5]
            words.append(word)
            length += len(word) + 1
        counter += 1
    return " ".join(words)[:size]


def _usage_struct(inp: int, out: int) -> dict[str, int]:
    return {
        "input": inp,
        "output": out,
        "reasoning": 0,
        "cache_read": 0,
        "cache_write": 0,
        "total_tokens": inp + out,
    }


def _usage_sorted(inp: int, out: int) -> dict[str, int]:
    return dict(sorted(_usage_struct(inp, out).items()))


def make_loop(
    session_id: str,
    index: int,
    *,
    agent_id: str = "agent-test",
    parent_loop_id: str | None = None,
    text_bytes: int = 2000,
    status: str = "Completed",
) -> LoopRecord:
    """A realistic one-turn loop (user prompt, assistant answer) with its event stream.

    ``loop_id`` is ``f"{session_id}.test.{index + 1}"``; timestamps grow with ``index``.
    ``text_bytes`` is split between the prompt and the answer.
    """
    loop_id = f"{session_id}.test.{index + 1}"
    turn_id = {"loopId": loop_id, "turnIndex": 0}
    prompt = _filler(f"{loop_id}:prompt", max(1, text_bytes // 4))
    answer = _filler(f"{loop_id}:answer", max(1, text_bytes - len(prompt)))
    ended = status in ("Completed", "Rejected")
    user = {
        "content": [{"text": prompt, "type": "text"}],
        "role": "user",
        "timestamp": _ms(index, 1),
        "turnId": turn_id,
    }
    assistant = {
        "content": [{"text": answer, "type": "text"}],
        "model": "test-model",
        "provider": "mock",
        "role": "assistant",
        "stopReason": "stop",
        "timestamp": _ms(index, 900),
        "turnId": turn_id,
        "usage": _usage_sorted(len(prompt) // 4, len(answer) // 4),
    }
    usage = _usage_struct(len(prompt) // 4, len(answer) // 4)
    config = {
        "model": "test-model",
        "provider": "mock",
        "config_id": "test",
        "name": "Test Model",
        "thinking_level": "off",
    }
    cont_kind: Any = "Initial" if parent_loop_id is None else "Default"
    events: list[dict[str, Any]] = [
        {
            "type": "AgentStart",
            "agent_id": agent_id,
            "session_id": session_id,
            "loop_id": loop_id,
            "parent_loop_id": parent_loop_id,
            "continuation_kind": cont_kind,
            "timestamp": _ts(index),
            "metadata": None,
            "config_snapshot": config,
        },
        {
            "type": "TurnStart",
            "loop_id": loop_id,
            "turn_index": 0,
            "timestamp": _ts(index, 1),
            "triggered_by": "User" if parent_loop_id is None else "Continuation",
        },
        {"type": "MessageStart", "loop_id": loop_id, "message": user},
        {"type": "MessageEnd", "loop_id": loop_id, "message": user},
        {"type": "MessageStart", "loop_id": loop_id, "message": assistant},
        {"type": "MessageEnd", "loop_id": loop_id, "message": assistant},
        {
            "type": "TurnEnd",
            "loop_id": loop_id,
            "message": assistant,
            "usage": usage,
            "timestamp": _ts(index, 950),
            "tool_results": [],
        },
    ]
    if ended:
        events.append(
            {
                "type": "AgentEnd",
                "loop_id": loop_id,
                "messages": [user, assistant],
                "usage": usage,
                "timestamp": _ts(index, 1000),
                "rejection": None if status == "Completed" else "rejected by test filter",
            }
        )
    record: dict[str, Any] = {
        "loop_id": loop_id,
        "session_id": session_id,
        "agent_id": agent_id,
        "parent_loop_id": parent_loop_id,
        "continuation_kind": cont_kind,
        "started_at": _ts(index),
        "ended_at": _ts(index, 1000) if ended else None,
        "status": status,
        "rejection": "rejected by test filter" if status == "Rejected" else None,
        "config": config,
        "messages": [user, assistant] if ended else [],
        "turns": [
            {
                "turn_id": turn_id,
                "triggered_by": events[1]["triggered_by"],
                "usage": usage,
                "input_messages": [user],
                "output_message": assistant,
                "tool_results": [],
                "started_at": _ts(index, 1),
                "ended_at": _ts(index, 950),
            }
        ],
        "usage": usage,
        "metadata": {"test_index": index},
        "events": [{"sequence": i, "event": e} for i, e in enumerate(events)],
        "children_loop_ids": [],
        "child_loop_refs": [],
        "parallel_group": None,
    }
    return LoopRecord.model_validate(record)


def make_session(session_id: str, n_loops: int = 3, *, agent_id: str = "agent-test") -> Session:
    """A session of ``n_loops`` chained loops (each continues the previous one)."""
    loops: list[LoopRecord] = []
    for i in range(n_loops):
        parent = loops[-1].loop_id if loops else None
        loop = make_loop(session_id, i, agent_id=agent_id, parent_loop_id=parent)
        if loops:
            loops[-1].children_loop_ids.append(loop.loop_id)
        loops.append(loop)
    created = _ts(0)
    last = _ts(max(n_loops - 1, 0))
    return Session.model_validate(
        {
            "session_id": session_id,
            "agent_id": agent_id,
            "created_at": created,
            "last_active_at": last,
            "formation": {"FirstLoop": {"timestamp": created}},
            "parent_spawn_ref": None,
            "scope": "ephemeral",
            "loops": loops,
        }
    )


@contextlib.contextmanager
def lock_held_in_thread(
    store: FileSystemSessionStore, session_id: str, *, max_hold_s: float = 10.0
) -> Iterator[threading.Event]:
    """Hold `store.lock(session_id)` from another thread until the block ends.

    Yields the release event, so a test can also let go early (e.g. from a timer).
    """
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.lock(session_id):
            held.set()
            release.wait(max_hold_s)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5), f"lock on {session_id!r} was not taken"
        yield release
    finally:
        release.set()
        t.join()
