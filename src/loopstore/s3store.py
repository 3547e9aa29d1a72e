"""The session store on S3-compatible object storage (``s3://bucket/prefix``).

`S3SessionStore` is a `store.SessionStore` over `s3backend.S3Backend`: the same API, the
same formats, the same commit logic as `FileSystemSessionStore`. What differs:

* Writers in different processes (or machines) never wait for each other: each commit
  is a compare-and-swap on the next record's name. A writer that loses re-reads the
  session and tries again, with a randomized backoff, until `lock_timeout` is spent
  (then `SessionLocked`). `update(fn)` runs `fn` again on the newer state each time.
* `store.lock(session_id)` excludes only the threads of this process: there are no
  leases in the bucket. Code that must not interleave with other processes uses
  `update`, whose read-modify-write is atomic everywhere.
* There is no group commit and no listing catalog: a listing reads every session.
* Every write is durable once acknowledged (`durable` is always True).

Endpoint, region and credentials come from the standard AWS configuration
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``) unless given as keywords.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from loopstore import ondisk
from loopstore.aio import AsyncSessionStore
from loopstore.locking import LOCK_POLL_INTERVAL_S, LOCK_TIMEOUT_S
from loopstore.s3backend import Endpoint, S3Backend
from loopstore.s3backend import s3_store_exists as _exists
from loopstore.store import SessionStore, check_options


class S3SessionStore(SessionStore):
    """Sessions in an S3-compatible bucket, shared by any number of processes and hosts.

    `location` is ``s3://bucket/prefix`` (the prefix may be empty). The store marker
    is created if missing (a prefix holding other objects is refused); a store of a
    newer format is refused; a missing bucket is an error (nothing is created).
    Before its first write to an endpoint and bucket, a process checks that the server
    honours conditional writes and refuses one that does not.

    Picklable: a multiprocessing worker gets a store on the same location with the same
    options (credentials given as keywords travel with it; by default each process
    reads the AWS configuration itself).
    """

    def __init__(
        self,
        location: str,
        *,
        lock_timeout: float = LOCK_TIMEOUT_S,
        lock_poll_interval: float = LOCK_POLL_INTERVAL_S,
        durable: bool = True,
        compression_level: int = ondisk.DEFAULT_COMPRESSION_LEVEL,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        profile: str | None = None,
    ) -> None:
        options = check_options(lock_timeout, lock_poll_interval, durable, compression_level)
        endpoint = Endpoint(endpoint_url, region, access_key, secret_key, profile)
        for name, value in (
            ("endpoint_url", endpoint_url),
            ("region", region),
            ("access_key", access_key),
            ("secret_key", secret_key),
            ("profile", profile),
        ):
            if value is not None:
                options[name] = value
        backend = S3Backend(
            location,
            endpoint=endpoint,
            lock_timeout=lock_timeout,
            lock_poll_interval=lock_poll_interval,
        )
        super().__init__(backend, compression_level=compression_level, options=options)
        self._s3 = backend

    @property
    def bucket(self) -> str:
        return self._s3.bucket

    @property
    def prefix(self) -> str:
        """The key prefix of the store in its bucket ("" or ending in "/")."""
        return self._s3.prefix

    @property
    def endpoint_url(self) -> str:
        """The endpoint requests go to (as resolved from the options and configuration)."""
        return self._s3.endpoint_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __enter__(self) -> S3SessionStore:
        return self

    @contextlib.contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        """Exclude the other threads (and asyncio tasks) of this process from the session.

        Only this process: an object store has no locks, and other processes commit
        whenever their compare-and-swap wins. For a read-modify-write that must not
        lose another process's change, use `update`: it commits by compare-and-swap and
        runs `fn` again on the newer state when another writer committed first.
        """
        with super().lock(session_id):
            yield


class AsyncS3SessionStore(AsyncSessionStore[S3SessionStore]):
    """`S3SessionStore` for asyncio (same options): each call runs in a worker thread.

    `lock` excludes only this process's threads and tasks, as `S3SessionStore.lock`.
    """

    def __init__(
        self,
        location: str,
        *,
        lock_timeout: float = LOCK_TIMEOUT_S,
        lock_poll_interval: float = LOCK_POLL_INTERVAL_S,
        durable: bool = True,
        compression_level: int = ondisk.DEFAULT_COMPRESSION_LEVEL,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__(
            S3SessionStore(
                location,
                lock_timeout=lock_timeout,
                lock_poll_interval=lock_poll_interval,
                durable=durable,
                compression_level=compression_level,
                endpoint_url=endpoint_url,
                region=region,
                access_key=access_key,
                secret_key=secret_key,
                profile=profile,
            )
        )


def s3_store_exists(
    location: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    profile: str | None = None,
    **_store_options: Any,
) -> bool:
    """True if `location` (``s3://bucket/prefix``) holds a store: its marker object.

    Nothing is created. A missing bucket or an unreachable endpoint is a StorageError.
    Store options (lock_timeout, ...) are accepted and ignored, so callers can pass the
    same keywords as to `S3SessionStore`.
    """
    return _exists(location, Endpoint(endpoint_url, region, access_key, secret_key, profile))


__all__ = ["AsyncS3SessionStore", "S3SessionStore", "s3_store_exists"]
