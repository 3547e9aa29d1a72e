"""The S3 test servers themselves, and the SeaweedFS behaviour loopstore's S3 backend relies
on: create-only and compare-and-swap PUTs are refused with 412 when their condition fails,
exactly one of N racing writers wins, nothing is lost across restarts and crashes. Also:
the condition-ignoring fake really ignores conditions (what loopstore's probe must catch).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import multiprocessing.synchronize
import os
import socket
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from s3server import (
    GRPC_OFFSET,
    ConditionIgnoringS3Server,
    SeaweedFSServer,
    client_config,
)

CTX = mp.get_context("spawn")
PROCESSES = 8  # racers, and CAS counter writers
ROUNDS = 5
CAS_INCREMENTS = 50


def _status(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def _client(kwargs: dict[str, str]) -> Any:
    return boto3.client("s3", config=client_config(), **kwargs)


# -- workers (spawned processes import this module)


_barrier: multiprocessing.synchronize.Barrier | None = None


def _init_worker(barrier: multiprocessing.synchronize.Barrier) -> None:
    global _barrier
    _barrier = barrier


def _race_worker(kwargs: dict[str, str], bucket: str, prefix: str, index: int) -> list[str]:
    """Each round: wait for all racers, then try to create the round's key."""
    assert _barrier is not None
    client = _client(kwargs)
    client.head_bucket(Bucket=bucket)  # connect before the race
    outcomes = []
    for round_ in range(ROUNDS):
        _barrier.wait(60)
        try:
            client.put_object(
                Bucket=bucket,
                Key=f"{prefix}round-{round_}",
                Body=f"racer-{index}".encode(),
                IfNoneMatch="*",
            )
            outcomes.append("won")
        except ClientError as exc:
            code, name = _status(exc)
            outcomes.append(f"{code} {name}")
    return outcomes


def _cas_worker(kwargs: dict[str, str], bucket: str, key: str, increments: int) -> dict[str, int]:
    """Add 1 to the counter ``increments`` times: GET, then PUT If-Match, retry on 412."""
    client = _client(kwargs)
    stats = {"ok": 0, "412": 0}
    while stats["ok"] < increments:
        got = client.get_object(Bucket=bucket, Key=key)
        value = int(got["Body"].read())
        try:
            client.put_object(
                Bucket=bucket, Key=key, Body=str(value + 1).encode(), IfMatch=got["ETag"]
            )
            stats["ok"] += 1
        except ClientError as exc:
            if _status(exc) != (412, "PreconditionFailed"):
                raise
            stats["412"] += 1
    return stats


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    """PROCESSES spawned workers sharing a barrier. A task that waits on the barrier blocks
    its worker, so PROCESSES such tasks land on PROCESSES different workers."""
    with CTX.Pool(PROCESSES, initializer=_init_worker, initargs=(CTX.Barrier(PROCESSES),)) as p:
        yield p


# -- the fixture


def test_seaweedfs_serves_authenticated_s3_on_its_own_loopback_ports(
    seaweedfs: SeaweedFSServer, s3_prefix: str
) -> None:
    assert seaweedfs.endpoint_url.startswith("http://127.0.0.1:")
    assert seaweedfs.ports is not None
    for port in seaweedfs.ports.all_listeners():  # every HTTP and gRPC port is taken
        with socket.socket() as sock, pytest.raises(OSError):
            sock.bind(("127.0.0.1", port))
    assert seaweedfs.ports.s3 + GRPC_OFFSET in seaweedfs.ports.all_listeners()

    client = seaweedfs.boto3_client()
    buckets = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert seaweedfs.bucket in buckets
    client.put_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}hello", Body=b"hi")
    got = client.get_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}hello")
    assert got["Body"].read() == b"hi"

    wrong = boto3.client(
        "s3",
        config=client_config(),
        **{**seaweedfs.client_kwargs(), "aws_secret_access_key": "not-the-secret"},
    )
    with pytest.raises(ClientError) as err:
        wrong.get_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}hello")
    assert _status(err.value) == (403, "SignatureDoesNotMatch")

    with pytest.raises(ClientError) as err:  # no bucket auto-creation: a typo fails
        client.put_object(Bucket="no-such-bucket", Key="k", Body=b"x")
    assert _status(err.value) == (404, "NoSuchBucket")


# -- the SeaweedFS facts loopstore relies on


def test_create_only_put_is_refused_with_412(seaweedfs: SeaweedFSServer, s3_prefix: str) -> None:
    client, bucket, key = seaweedfs.boto3_client(), seaweedfs.bucket, f"{s3_prefix}obj"
    client.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert _status(err.value) == (412, "PreconditionFailed")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"
    client.delete_object(Bucket=bucket, Key=key)  # gone: creatable again
    client.put_object(Bucket=bucket, Key=key, Body=b"third", IfNoneMatch="*")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"third"


def test_stale_if_match_is_refused_with_412(seaweedfs: SeaweedFSServer, s3_prefix: str) -> None:
    client, bucket, key = seaweedfs.boto3_client(), seaweedfs.bucket, f"{s3_prefix}obj"
    v1 = client.put_object(Bucket=bucket, Key=key, Body=b"v1")["ETag"]
    v2 = client.put_object(Bucket=bucket, Key=key, Body=b"v2", IfMatch=v1)["ETag"]
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key=key, Body=b"lost", IfMatch=v1)
    assert _status(err.value) == (412, "PreconditionFailed")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"v2"
    with pytest.raises(ClientError) as err:  # If-Match on a missing key: 412, not 404
        client.put_object(Bucket=bucket, Key=f"{s3_prefix}missing", Body=b"x", IfMatch=v2)
    assert _status(err.value) == (412, "PreconditionFailed")
    with pytest.raises(ClientError) as err:  # conditional reads too
        client.get_object(Bucket=bucket, Key=key, IfMatch=v1)
    assert _status(err.value) == (412, "PreconditionFailed")


def test_etag_is_the_md5_of_the_content_so_it_repeats(
    seaweedfs: SeaweedFSServer, s3_prefix: str
) -> None:
    """A single-part ETag is the quoted MD5 of the body: identical bytes give the same ETag,
    so If-Match cannot tell A from A-B-A (loopstore must put something unique in a body
    it compare-and-swaps)."""
    client, bucket, key = seaweedfs.boto3_client(), seaweedfs.bucket, f"{s3_prefix}obj"
    body = b"same bytes"
    first = client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
    assert first == f'"{hashlib.md5(body).hexdigest()}"'
    client.put_object(Bucket=bucket, Key=key, Body=b"other", IfMatch=first)
    again = client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
    assert again == first
    client.put_object(Bucket=bucket, Key=key, Body=b"after ABA", IfMatch=first)  # accepted
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"after ABA"


def test_only_one_of_n_racing_creates_wins(
    seaweedfs: SeaweedFSServer, s3_prefix: str, pool: Any
) -> None:
    kwargs, bucket = seaweedfs.client_kwargs(), seaweedfs.bucket
    per_racer = pool.starmap(
        _race_worker, [(kwargs, bucket, s3_prefix, i) for i in range(PROCESSES)], chunksize=1
    )
    client = seaweedfs.boto3_client()
    for round_ in range(ROUNDS):
        outcomes = [racer[round_] for racer in per_racer]
        winners = [i for i, outcome in enumerate(outcomes) if outcome == "won"]
        assert len(winners) == 1, outcomes
        assert outcomes.count("412 PreconditionFailed") == PROCESSES - 1, outcomes
        body = client.get_object(Bucket=bucket, Key=f"{s3_prefix}round-{round_}")
        assert body["Body"].read() == f"racer-{winners[0]}".encode()


def test_cas_counter_loses_no_increment(
    seaweedfs: SeaweedFSServer, s3_prefix: str, pool: Any
) -> None:
    client, bucket, key = seaweedfs.boto3_client(), seaweedfs.bucket, f"{s3_prefix}counter"
    client.put_object(Bucket=bucket, Key=key, Body=b"0", IfNoneMatch="*")
    stats = pool.starmap(
        _cas_worker,
        [(seaweedfs.client_kwargs(), bucket, key, CAS_INCREMENTS)] * PROCESSES,
        chunksize=1,
    )
    assert [s["ok"] for s in stats] == [CAS_INCREMENTS] * PROCESSES
    final = int(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert final == PROCESSES * CAS_INCREMENTS == 400


def test_restart_keeps_data_and_endpoint(seaweedfs: SeaweedFSServer, s3_prefix: str) -> None:
    client, bucket = seaweedfs.boto3_client(), seaweedfs.bucket
    written = {f"{s3_prefix}obj-{i}": os.urandom(100 + i) for i in range(20)}
    for key, body in written.items():
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    endpoint = seaweedfs.endpoint_url

    seaweedfs.stop()
    assert not seaweedfs.running
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket=bucket, Key=next(iter(written)))
    seaweedfs.start()

    assert seaweedfs.endpoint_url == endpoint
    for key, body in written.items():  # the same client works again
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    with pytest.raises(ClientError) as err:  # and conditions still hold
        client.put_object(Bucket=bucket, Key=next(iter(written)), Body=b"x", IfNoneMatch="*")
    assert _status(err.value) == (412, "PreconditionFailed")


def test_crash_keeps_acknowledged_writes(seaweedfs: SeaweedFSServer, s3_prefix: str) -> None:
    client, bucket = seaweedfs.boto3_client(), seaweedfs.bucket
    written = {f"{s3_prefix}obj-{i}": os.urandom(1000 + i) for i in range(20)}
    for key, body in written.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    seaweedfs.kill()  # SIGKILL: no flush, no shutdown
    seaweedfs.start()
    for key, body in written.items():
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    listed = client.list_objects_v2(Bucket=bucket, Prefix=s3_prefix)
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(written)


def test_listing_paginates_every_key_once(seaweedfs: SeaweedFSServer, s3_prefix: str) -> None:
    """Paginated ListObjectsV2, with and without a delimiter, returns every key and prefix
    exactly once. (Order is not asserted: SeaweedFS lists path component by component,
    so ``a/b/1`` comes before ``a/b-x``, unlike S3's byte order.)"""
    client, bucket = seaweedfs.boto3_client(), seaweedfs.bucket
    names = ["a/1", "a/2", "b/1", "b/2/x", "b!", "b-x", "b-x/y", "b.txt", "b0", "c", "d/e/f"]
    for name in names:
        client.put_object(Bucket=bucket, Key=s3_prefix + name, Body=b"v")
    pages = client.get_paginator("list_objects_v2")
    flat = [
        o["Key"][len(s3_prefix) :]
        for page in pages.paginate(
            Bucket=bucket, Prefix=s3_prefix, PaginationConfig={"PageSize": 2}
        )
        for o in page.get("Contents", [])
    ]
    assert sorted(flat) == sorted(names)
    keys, prefixes = [], []
    for page in pages.paginate(
        Bucket=bucket, Prefix=s3_prefix, Delimiter="/", PaginationConfig={"PageSize": 2}
    ):
        keys += [o["Key"][len(s3_prefix) :] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"][len(s3_prefix) :] for p in page.get("CommonPrefixes", [])]
    assert sorted(keys) == ["b!", "b-x", "b.txt", "b0", "c"]
    assert sorted(prefixes) == ["a/", "b-x/", "b/", "d/"]


# -- the fake


def test_fake_ignores_conditional_headers(
    condition_ignoring_s3: ConditionIgnoringS3Server,
) -> None:
    fake = condition_ignoring_s3
    client, bucket = fake.boto3_client(), fake.bucket
    first = client.put_object(Bucket=bucket, Key="k", Body=b"first", IfNoneMatch="*")["ETag"]
    client.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")  # no 412
    client.put_object(Bucket=bucket, Key="k", Body=b"third", IfMatch=first)  # stale: no 412
    client.put_object(Bucket=bucket, Key="new", Body=b"x", IfMatch=first)  # missing: no 412
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"third"
    assert client.get_object(Bucket=bucket, Key="k", IfMatch=first)["Body"].read() == b"third"
    # the headers did arrive; the fake just did not honour them
    assert fake.ignored_conditions == {"If-None-Match": 2, "If-Match": 3}


def test_fake_is_s3_enough_for_a_probe_and_restarts(
    condition_ignoring_s3: ConditionIgnoringS3Server,
) -> None:
    fake = condition_ignoring_s3
    client, bucket = fake.boto3_client(), fake.bucket
    client.head_bucket(Bucket=bucket)
    put = client.put_object(Bucket=bucket, Key="p/a", Body=b"0123456789", Metadata={"m": "1"})
    assert put["ETag"] == f'"{hashlib.md5(b"0123456789").hexdigest()}"'
    head = client.head_object(Bucket=bucket, Key="p/a")
    assert (head["ContentLength"], head["Metadata"]) == (10, {"m": "1"})
    ranged = client.get_object(Bucket=bucket, Key="p/a", Range="bytes=2-4")
    assert ranged["Body"].read() == b"234"
    client.put_object(Bucket=bucket, Key="p/b/c", Body=b"")
    listed = client.list_objects_v2(Bucket=bucket, Prefix="p/", Delimiter="/")
    assert [o["Key"] for o in listed["Contents"]] == ["p/a"]
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["p/b/"]
    client.delete_object(Bucket=bucket, Key="p/b/c")
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key="p/b/c")
    assert _status(err.value) == (404, "NoSuchKey")

    endpoint = fake.endpoint_url
    fake.stop()
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket=bucket, Key="p/a")
    fake.start()
    assert fake.endpoint_url == endpoint
    assert client.get_object(Bucket=bucket, Key="p/a")["Body"].read() == b"0123456789"
