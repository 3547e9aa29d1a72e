"""The store for asyncio: each call runs in a worker thread (asyncio.to_thread).

`AsyncFileSystemSessionStore` wraps a `FileSystemSessionStore`; the object-store
twin (`AsyncS3SessionStore`) wraps an `S3SessionStore` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from loopstore import locking, ondisk
from loopstore.catalog import Summary
from loopstore.journal import SessionState
from loopstore.locking import LOCK_POLL_INTERVAL_S, LOCK_TIMEOUT_S
from loopstore.models import LoopRecord, Session
from loopstore.reports import (
    GcReport,
    ImportReport,
    MigrateReport,
    SessionInfo,
    StoreStats,
    VerifyReport,
)
from loopstore.store import GC_GRACE_S, FileSystemSessionStore, ProgressFn, SessionStore

if TYPE_CHECKING:
    from loopstore.backup import BackupReport

S = TypeVar("S", bound=SessionStore)


class AsyncSessionStore(Generic[S]):
    """Coroutine versions of every store method; `update` still takes a plain function."""

    def __init__(self, sync: S) -> None:
        self.sync = sync

    @property
    def location(self) -> str:
        return self.sync.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._from_sync, (self.sync,))

    @classmethod
    def _from_sync(cls, sync: S) -> AsyncSessionStore[S]:
        obj = cls.__new__(cls)
        AsyncSessionStore.__init__(obj, sync)
        return obj

    async def save(self, session: Session) -> None:
        await asyncio.to_thread(self.sync.save, session)

    async def load(self, session_id: str, *, lazy: bool = False) -> Session:
        return await asyncio.to_thread(lambda: self.sync.load(session_id, lazy=lazy))

    async def exists(self, session_id: str) -> bool:
        return await asyncio.to_thread(self.sync.exists, session_id)

    async def list_ids(self) -> list[str]:
        return await asyncio.to_thread(self.sync.list_ids)

    async def list_for_agent(self, agent_id: str, *, lazy: bool = False) -> list[Session]:
        return await asyncio.to_thread(lambda: self.sync.list_for_agent(agent_id, lazy=lazy))

    async def delete(self, session_id: str) -> None:
        await asyncio.to_thread(self.sync.delete, session_id)

    async def append_loop(
        self, session_id: str, loop: LoopRecord, *, session: Session | None = None
    ) -> None:
        await asyncio.to_thread(self.sync.append_loop, session_id, loop, session=session)

    async def update(self, session_id: str, fn: Callable[[Session], Session | None]) -> Session:
        return await asyncio.to_thread(self.sync.update, session_id, fn)

    async def load_loop(self, session_id: str, loop_id: str) -> LoopRecord:
        return await asyncio.to_thread(self.sync.load_loop, session_id, loop_id)

    async def load_json(self, session_id: str) -> bytes:
        return await asyncio.to_thread(self.sync.load_json, session_id)

    async def load_loop_json(self, session_id: str, loop_id: str) -> bytes:
        return await asyncio.to_thread(self.sync.load_loop_json, session_id, loop_id)

    async def iter_loop_json(self, session_id: str) -> AsyncIterator[bytes]:
        """Each loop's JSON, one blob read (in a worker thread) at a time."""
        it = await asyncio.to_thread(self.sync.iter_loop_json, session_id)
        done = object()
        while (item := await asyncio.to_thread(next, it, done)) is not done:
            yield item  # type: ignore[misc]

    async def session_state(self, session_id: str) -> SessionState:
        return await asyncio.to_thread(self.sync.session_state, session_id)

    async def sessions(
        self,
        *,
        agent_id: str | None = None,
        order: str = "active",
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Summary]:
        return await asyncio.to_thread(
            lambda: self.sync.sessions(agent_id=agent_id, order=order, limit=limit, reverse=reverse)
        )

    async def damaged_sessions(self) -> list[tuple[str, str]]:
        return await asyncio.to_thread(self.sync.damaged_sessions)

    async def checkpoint(self, session_id: str) -> bool:
        return await asyncio.to_thread(self.sync.checkpoint, session_id)

    async def reindex(self, *, progress: ProgressFn | None = None) -> int:
        return await asyncio.to_thread(lambda: self.sync.reindex(progress=progress))

    async def migrate(self, *, progress: ProgressFn | None = None) -> MigrateReport:
        return await asyncio.to_thread(lambda: self.sync.migrate(progress=progress))

    async def verify(
        self,
        session_id: str | None = None,
        *,
        progress: ProgressFn | None = None,
        deep: bool = False,
        grace: float | timedelta = GC_GRACE_S,
        processes: int = 1,
    ) -> VerifyReport:
        return await asyncio.to_thread(
            lambda: self.sync.verify(
                session_id, progress=progress, deep=deep, grace=grace, processes=processes
            )
        )

    async def gc(
        self,
        grace: float | timedelta = GC_GRACE_S,
        *,
        progress: ProgressFn | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        return await asyncio.to_thread(
            lambda: self.sync.gc(grace, progress=progress, dry_run=dry_run)
        )

    async def stats(self) -> StoreStats:
        return await asyncio.to_thread(self.sync.stats)

    async def session_info(self, session_id: str) -> SessionInfo:
        return await asyncio.to_thread(self.sync.session_info, session_id)

    async def import_legacy(
        self,
        directory: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        overwrite: bool = False,
    ) -> ImportReport:
        return await asyncio.to_thread(
            lambda: self.sync.import_legacy(directory, progress=progress, overwrite=overwrite)
        )

    async def export_legacy(self, session_id: str, directory: str | os.PathLike[str]) -> Path:
        return await asyncio.to_thread(self.sync.export_legacy, session_id, directory)

    async def backup(
        self,
        dest: str | os.PathLike[str] | SessionStore,
        *,
        prune: bool = True,
        progress: ProgressFn | None = None,
        link: bool = True,
        check: bool = False,
    ) -> BackupReport:
        return await asyncio.to_thread(
            lambda: self.sync.backup(dest, prune=prune, progress=progress, link=link, check=check)
        )

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        """Hold the session lock across awaits; store calls made inside count as the holder.

        The holder is this task's context (store calls run via asyncio.to_thread copy
        it), so `async with store.lock(id): await store.save(s)` does not deadlock.
        """
        session_id = ondisk.validate_session_id(session_id)
        locks = self.sync.backend.locks
        token = object()
        acquiring = asyncio.ensure_future(asyncio.to_thread(locks.acquire, session_id, token))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # The worker thread may still get the lock: give it back when it does.
            def undo(f: asyncio.Future[object]) -> None:
                if not f.cancelled() and f.exception() is None:
                    locks.release(session_id, token)

            acquiring.add_done_callback(undo)
            raise
        try:
            with locking.owner_override(locks.key(session_id), token):
                yield
        finally:
            await asyncio.to_thread(locks.release, session_id, token)

    def close(self) -> None:
        self.sync.close()


class AsyncFileSystemSessionStore(AsyncSessionStore[FileSystemSessionStore]):
    """`FileSystemSessionStore` for asyncio (same options)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        lock_timeout: float = LOCK_TIMEOUT_S,
        lock_poll_interval: float = LOCK_POLL_INTERVAL_S,
        durable: bool = True,
        compression_level: int = ondisk.DEFAULT_COMPRESSION_LEVEL,
    ) -> None:
        super().__init__(
            FileSystemSessionStore(
                root,
                lock_timeout=lock_timeout,
                lock_poll_interval=lock_poll_interval,
                durable=durable,
                compression_level=compression_level,
            )
        )

    @property
    def root(self) -> Path:
        return self.sync.root


__all__ = ["AsyncFileSystemSessionStore", "AsyncSessionStore"]
