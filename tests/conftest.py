"""Shared fixtures: a real SeaweedFS S3 server, a condition-ignoring fake S3, and stores
on either backend.

``s3server`` (boto3, the ``weed`` binary) is imported inside the fixtures, so tests that
use neither need none of it.

A test that takes `make_store` (or `backend`) runs twice, ``[fs]`` and ``[s3]``: once on
a directory store, once on an S3 store under its own prefix of the shared SeaweedFS
bucket.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from helpers import StoreFactory

if TYPE_CHECKING:
    from s3server import ConditionIgnoringS3Server, SeaweedFSServer

BACKENDS = ("fs", "s3")


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFSServer]:
    """One real SeaweedFS S3 server for the whole run (started on first use, ~2 s).

    Prefer :func:`seaweedfs`, which also restarts it if an earlier test left it stopped.
    """
    from s3server import SeaweedFSServer

    server = SeaweedFSServer(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def seaweedfs(seaweedfs_server: SeaweedFSServer) -> SeaweedFSServer:
    """The session's SeaweedFS server, running. A test may ``stop()``/``start()``/``kill()``
    it; the next test gets it running again on the same endpoint and data."""
    seaweedfs_server.start()  # a no-op while it runs
    return seaweedfs_server


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the shared bucket, e.g. ``t/test_x-1a2b3c4d/``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"t/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def condition_ignoring_s3() -> Iterator[ConditionIgnoringS3Server]:
    """A fresh in-memory S3 stand-in that accepts If-None-Match/If-Match and ignores them."""
    from s3server import ConditionIgnoringS3Server

    with ConditionIgnoringS3Server() as server:
        yield server


def store_factory(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> StoreFactory:
    """Stores of this test on `backend`: under tmp_path, or under its own S3 prefix (the
    SeaweedFS server is started only when an S3 store is asked for)."""
    if backend == "fs":
        return StoreFactory("fs", str(tmp_path))
    server: SeaweedFSServer = request.getfixturevalue("seaweedfs")
    prefix: str = request.getfixturevalue("s3_prefix")
    options = {
        "endpoint_url": server.endpoint_url,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "region": server.region,
    }
    return StoreFactory(
        "s3",
        f"s3://{server.bucket}/{prefix}",
        options,
        env=server.env(),
        client_kwargs=server.client_kwargs(),
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend, "fs" or "s3": a test taking it (or `make_store`) runs on both."""
    return str(request.param)


@pytest.fixture
def make_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    """`make(**options)` opens this test's store on `backend` (see `StoreFactory`)."""
    factory = store_factory(backend, tmp_path, request)
    yield factory
    factory.close()


@pytest.fixture(params=BACKENDS)
def other_backend(request: pytest.FixtureRequest) -> str:
    """A second backend, for tests between two stores (backups): with `backend`, every
    pair fs->fs, fs->s3, s3->fs, s3->s3."""
    return str(request.param)


@pytest.fixture
def make_other_store(
    other_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    """Like `make_store`, on `other_backend` (same tmp_path and S3 prefix: use other names)."""
    factory = store_factory(other_backend, tmp_path, request)
    yield factory
    factory.close()
