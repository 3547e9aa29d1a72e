"""Store locations: a path or file:// URL is a directory store, s3:// an object store.

`open_store(location, **options)` is the one entry point the CLI and programs use when
the location is configuration (``--root``, ``LOOPSTORE_ROOT``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopstore.store import FileSystemSessionStore, SessionStore

if TYPE_CHECKING:
    pass


def is_url(location: str | os.PathLike[str]) -> bool:
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    """The directory of a path or file:// location."""
    return Path(os.fspath(location).removeprefix("file://"))


def open_store(location: str | os.PathLike[str], **options: Any) -> SessionStore:
    """The store at `location` with the same options as `FileSystemSessionStore`."""
    text = os.fspath(location)
    if text.startswith("s3://"):
        from loopstore.s3store import S3SessionStore

        return S3SessionStore(text, **options)
    if is_url(text):
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"unsupported store location {text!r}: scheme {scheme!r} (use a path or s3://)"
        )
    return FileSystemSessionStore(local_path(text), **options)


__all__ = ["is_url", "local_path", "open_store"]
