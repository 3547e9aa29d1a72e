"""loopstore: AI-agent sessions in a plain shared directory, safe for many processes.

The names below are the public contract of DESIGN.md section 1.
"""

from __future__ import annotations

from loopstore.aio import AsyncFileSystemSessionStore
from loopstore.errors import (
    CorruptSession,
    InvalidSessionId,
    LoopNotFound,
    SessionError,
    SessionLocked,
    SessionNotFound,
    StorageError,
    UnsupportedFormat,
)
from loopstore.models import (
    ChildLoopRef,
    ContinuationKind,
    LoopConfigSnapshot,
    LoopEvent,
    LoopRecord,
    LoopStatus,
    ParallelGroupRecord,
    Session,
    SessionFormation,
    SessionScope,
    SpawnRef,
    Turn,
    TurnId,
    TurnTrigger,
    Usage,
)
from loopstore.recorder import SessionRecorder, SessionRecorderConfig
from loopstore.store import FileSystemSessionStore

__version__ = "0.1.0"

__all__ = [
    "AsyncFileSystemSessionStore",
    "ChildLoopRef",
    "ContinuationKind",
    "CorruptSession",
    "FileSystemSessionStore",
    "InvalidSessionId",
    "LoopConfigSnapshot",
    "LoopEvent",
    "LoopNotFound",
    "LoopRecord",
    "LoopStatus",
    "ParallelGroupRecord",
    "Session",
    "SessionError",
    "SessionFormation",
    "SessionLocked",
    "SessionNotFound",
    "SessionRecorder",
    "SessionRecorderConfig",
    "SessionScope",
    "SpawnRef",
    "StorageError",
    "Turn",
    "TurnId",
    "TurnTrigger",
    "UnsupportedFormat",
    "Usage",
    "__version__",
]
