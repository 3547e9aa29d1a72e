"""Shared fixtures: a real SeaweedFS S3 server and a condition-ignoring fake S3.

``s3server`` (boto3, the ``weed`` binary) is imported inside the fixtures, so tests that
use neither need none of it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from s3server import ConditionIgnoringS3Server, SeaweedFSServer


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
