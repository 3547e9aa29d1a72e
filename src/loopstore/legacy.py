"""phi-core's legacy one-file-per-session API (`{dir}/{session_id}.json`).

Same semantics as phi-core 0.10 `session/storage.rs` (pretty JSON, NotFound for a
missing file, newest-mtime-first listing), with two repairs: files are written
atomically (tmp + fsync + rename + fsync of the directory), and session ids are
validated so no file is ever created outside `dir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pydantic

from loopstore import atomic, ondisk
from loopstore.errors import CorruptSession, SessionNotFound, storage_error
from loopstore.models import Session

LEGACY_SUFFIX: Final = ".json"


def legacy_bytes(session: Session) -> bytes:
    """phi-core's exact bytes: serde_json pretty (2 spaces), raw UTF-8, no final newline.

    pydantic-core writes floats as serde_json does (ryu), so this matches phi-core more
    closely than `json.dumps` would.
    """
    return session.model_dump_json(indent=ondisk.JSON_INDENT).encode()


def legacy_path(session_id: str, directory: Path) -> Path:
    return Path(directory) / (ondisk.validate_session_id(session_id) + LEGACY_SUFFIX)


def save_session(session: Session, dir: Path) -> Path:
    """Write `{dir}/{session_id}.json` atomically; returns the path."""
    return write_session_file(session.session_id, legacy_bytes(session), Path(dir))


def write_session_file(session_id: str, data: bytes, directory: Path) -> Path:
    """Write a session file's bytes atomically (tmp, fsync, rename, fsync dir)."""
    path = legacy_path(session_id, directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic.atomic_write_path(path, data, point="staging", tmp_prefix=path.name)
    except OSError as exc:
        raise storage_error(session_id, "write session file", path, exc) from exc
    return path


def load_session(session_id: str, dir: Path) -> Session:
    path = legacy_path(session_id, Path(dir))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionNotFound(session_id, path=path) from None
    except OSError as exc:
        raise storage_error(session_id, "read session file", path, exc) from exc
    try:
        return Session.model_validate_json(data)
    except pydantic.ValidationError as exc:
        raise CorruptSession(
            session_id, f"not a valid phi-core session: {exc.error_count()} error(s)", path=path
        ) from exc


def list_session_ids(dir: Path) -> list[str]:
    """Ids of `{id}.json` files, newest modification time first."""
    directory = Path(dir)
    entries: list[tuple[int, str]] = []
    try:
        with os.scandir(directory) as it:
            for e in it:
                if not e.name.endswith(LEGACY_SUFFIX) or e.name == LEGACY_SUFFIX:
                    continue
                try:
                    if not e.is_file():
                        continue
                    mtime = e.stat().st_mtime_ns
                except OSError:
                    continue
                entries.append((mtime, e.name[: -len(LEGACY_SUFFIX)]))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise storage_error(None, "list session files", directory, exc) from exc
    entries.sort(key=lambda t: (-t[0], t[1]))
    return [sid for _, sid in entries]


def load_sessions_for_agent(agent_id: str, dir: Path) -> list[Session]:
    """Every session of `agent_id`, newest first (a file that vanished is skipped)."""
    out: list[Session] = []
    for sid in list_session_ids(dir):
        if not ondisk.is_valid_session_id(sid):
            continue
        try:
            session = load_session(sid, dir)
        except SessionNotFound:
            continue
        if session.agent_id == agent_id:
            out.append(session)
    return out


def delete_session(session_id: str, dir: Path) -> None:
    path = legacy_path(session_id, Path(dir))
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise SessionNotFound(session_id, path=path) from None
    except OSError as exc:
        raise storage_error(session_id, "delete session file", path, exc) from exc


__all__ = [
    "delete_session",
    "legacy_bytes",
    "legacy_path",
    "list_session_ids",
    "load_session",
    "load_sessions_for_agent",
    "save_session",
    "write_session_file",
]
