"""Store locations: a path or file:// URL is a directory store, s3:// an object store.

`open_store(location, **options)` is the one entry point the CLI and programs use when
the location is configuration (``--root``, ``LOOPSTORE_ROOT``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopstore import ondisk
from loopstore.store import FileSystemSessionStore, SessionStore

if TYPE_CHECKING:
    from loopstore.aio import AsyncSessionStore


def is_url(location: str | os.PathLike[str]) -> bool:
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    """The directory of a path or file:// location."""
    return Path(os.fspath(location).removeprefix("file://"))


def _check_scheme(text: str) -> None:
    if is_url(text) and not text.startswith("s3://"):
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"unsupported store location {text!r}: scheme {scheme!r} (use a path, file:// or s3://)"
        )


def open_store(location: str | os.PathLike[str], **options: Any) -> SessionStore:
    """The store at `location` (created if missing) with `FileSystemSessionStore`'s options.

    A path or file:// URL gives a `FileSystemSessionStore`; s3://bucket/prefix an
    `S3SessionStore` (extra `loopstore[s3]`), whose endpoint, region and credentials come
    from the standard AWS configuration unless given as keywords.
    """
    text = os.fspath(location)
    _check_scheme(text)
    if text.startswith("s3://"):
        from loopstore.s3store import S3SessionStore

        store: SessionStore = S3SessionStore(text, **options)
        return store
    return FileSystemSessionStore(local_path(text), **options)


def open_async_store(location: str | os.PathLike[str], **options: Any) -> AsyncSessionStore[Any]:
    """`open_store` for asyncio: the same store, each call run in a worker thread."""
    from loopstore.aio import AsyncSessionStore

    return AsyncSessionStore(open_store(location, **options))


def store_exists(location: str | os.PathLike[str], **options: Any) -> bool:
    """True if `location` holds a store (its marker), without creating anything."""
    text = os.fspath(location)
    _check_scheme(text)
    if text.startswith("s3://"):
        from loopstore.s3store import s3_store_exists

        return bool(s3_store_exists(text, **options))
    return (local_path(text) / ondisk.MARKER_NAME).is_file()


__all__ = ["is_url", "local_path", "open_async_store", "open_store", "store_exists"]
