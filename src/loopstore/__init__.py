"""loopstore: AI-agent sessions in a shared directory or bucket, safe for many processes.

The names below are the public API (README "In a program"). They are imported on
first use (PEP 562), so `import loopstore` and the command line start without building
the pydantic models until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_HOMES = {
    "AsyncFileSystemSessionStore": "loopstore.aio",
    "AsyncS3SessionStore": "loopstore.s3store",
    "ChildLoopRef": "loopstore.models",
    "ContinuationKind": "loopstore.models",
    "CorruptSession": "loopstore.errors",
    "FileSystemSessionStore": "loopstore.store",
    "InvalidSessionId": "loopstore.errors",
    "LoopConfigSnapshot": "loopstore.models",
    "LoopEvent": "loopstore.models",
    "LoopNotFound": "loopstore.errors",
    "LoopRecord": "loopstore.models",
    "LoopStatus": "loopstore.models",
    "ParallelGroupRecord": "loopstore.models",
    "S3SessionStore": "loopstore.s3store",
    "Session": "loopstore.models",
    "SessionError": "loopstore.errors",
    "SessionFormation": "loopstore.models",
    "SessionLocked": "loopstore.errors",
    "SessionNotFound": "loopstore.errors",
    "SessionRecorder": "loopstore.recorder",
    "SessionRecorderConfig": "loopstore.recorder",
    "SessionScope": "loopstore.models",
    "SpawnRef": "loopstore.models",
    "StorageError": "loopstore.errors",
    "Turn": "loopstore.models",
    "TurnId": "loopstore.models",
    "TurnTrigger": "loopstore.models",
    "UnsupportedFormat": "loopstore.errors",
    "Usage": "loopstore.models",
    "open_async_store": "loopstore.locations",
    "open_store": "loopstore.locations",
}

if TYPE_CHECKING:
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
    from loopstore.locations import open_async_store, open_store
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
    from loopstore.s3store import AsyncS3SessionStore, S3SessionStore
    from loopstore.store import FileSystemSessionStore


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'loopstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "AsyncFileSystemSessionStore",
    "AsyncS3SessionStore",
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
    "S3SessionStore",
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
    "open_async_store",
    "open_store",
]
