"""Shared test helpers: phi-core fixtures and small realistic sessions built in code,
and stores on either backend (`StoreSpec`, `StoreFactory`, `RawStore`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopstore.models import LoopRecord, Session, format_timestamp
from loopstore.ondisk import JSON_INDENT, EncodedBlob, encode_blob

if TYPE_CHECKING:
    from loopstore.store import SessionStore

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
    store: SessionStore, session_id: str, *, max_hold_s: float = 10.0
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


# --------------------------------------------------------------------------- either backend


@dataclass(frozen=True)
class StoreSpec:
    """Where a test store lives and how to open it, in this process or a spawned worker.

    `location` is a directory or ``s3://bucket/prefix``; `options` are the keywords every
    open needs (an S3 store's endpoint and credentials). Picklable.
    """

    location: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return "s3" if self.location.startswith("s3://") else "fs"

    def open(self, **options: Any) -> SessionStore:
        """The store (created if missing), with `options` (lock_timeout, ...) on top."""
        from loopstore.locations import open_store

        return open_store(self.location, **{**self.options, **options})

    def exists(self) -> bool:
        from loopstore.locations import store_exists

        return store_exists(self.location, **self.options)


def open_spec(where: str | os.PathLike[str] | StoreSpec, **options: Any) -> SessionStore:
    """A worker's store: `where` is a spec, or a directory (the filesystem tests' root)."""
    if isinstance(where, StoreSpec):
        return where.open(**options)
    from loopstore.store import FileSystemSessionStore

    return FileSystemSessionStore(where, **options)


class RawStore:
    """A store's files or objects by key relative to its root (``sessions/<id>/...``),
    read and written around the store: how tests damage a store on either backend."""

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def ls(self, prefix: str = "") -> list[str]:
        """Every file (object) whose key starts with `prefix`, sorted."""
        raise NotImplementedError

    def flip(self, key: str, at: int | None = None, width: int = 1) -> None:
        """Bit rot: `width` bytes from `at` (default: the middle) inverted, same size."""
        data = bytearray(self.read(key))
        i = len(data) // 2 if at is None else at
        for j in range(i, min(i + width, len(data))):
            data[j] ^= 0xFF
        self.write(key, bytes(data))


class FsRaw(RawStore):
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(data)

    def delete(self, key: str) -> None:
        (self.root / key).unlink()

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def ls(self, prefix: str = "") -> list[str]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)


class S3Raw(RawStore):
    def __init__(self, client_kwargs: Mapping[str, str], bucket: str, prefix: str) -> None:
        self.client_kwargs = dict(client_kwargs)
        self.bucket = bucket
        self.prefix = prefix  # "" or ending in "/"
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1})
            self._client = boto3.client("s3", config=config, **self.client_kwargs)
        return self._client

    def read(self, key: str) -> bytes:
        got = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        return got["Body"].read()  # type: ignore[no-any-return]

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def exists(self, key: str) -> bool:
        return key in self.ls(key)

    def ls(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        for page in pages:
            out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        return sorted(out)


def blob_key(session_id: str, digest: str) -> str:
    """A materialized blob's key (the same on both backends)."""
    return f"sessions/{session_id}/loops/{digest}.zst"


def manifest_key(session_id: str) -> str:
    return f"sessions/{session_id}/manifest.json"


class StoreFactory:
    """Stores of one test on one backend ("fs" or "s3"), each named (default "store"):
    a directory under the test's tmp_path, or a prefix under the test's own S3 prefix.

    ``make()`` opens the store, ``make("dest", lock_timeout=1)`` another one with
    options; ``make.spec()`` is what a spawned worker reopens it from; ``make.raw()``
    reaches its files or objects directly; ``make.env`` is what a CLI subprocess needs
    (AWS_* for S3). Every store opened is closed when the test ends.
    """

    def __init__(
        self,
        backend: str,
        base: str,
        options: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        client_kwargs: Mapping[str, str] | None = None,
    ) -> None:
        if backend not in ("fs", "s3"):
            raise ValueError(backend)
        self.backend = backend
        self.base = base
        self.options = dict(options or {})
        self.env = dict(env or {})
        self.client_kwargs = dict(client_kwargs or {})
        self.opened: list[SessionStore] = []

    @property
    def is_s3(self) -> bool:
        return self.backend == "s3"

    def location(self, name: str = "store") -> str:
        if self.is_s3:
            return f"{self.base.rstrip('/')}/{name}"
        return str(Path(self.base) / name)

    def spec(self, name: str = "store") -> StoreSpec:
        return StoreSpec(self.location(name), dict(self.options))

    def __call__(self, name: str = "store", /, **options: Any) -> SessionStore:
        store = self.spec(name).open(**options)
        self.opened.append(store)
        return store

    def raw(self, name: str = "store") -> RawStore:
        if not self.is_s3:
            return FsRaw(Path(self.location(name)))
        bucket, _, prefix = self.location(name).removeprefix("s3://").partition("/")
        return S3Raw(self.client_kwargs, bucket, prefix.rstrip("/") + "/")

    def close(self) -> None:
        for store in self.opened:
            with contextlib.suppress(Exception):
                store.close()
        self.opened.clear()
