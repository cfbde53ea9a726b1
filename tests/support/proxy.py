"""A recording, fault-injecting HTTP/1.1 reverse proxy for S3 tests.

``S3Proxy(upstream)`` listens on a free port of 127.0.0.1 and forwards every request
to the upstream S3 endpoint (also on 127.0.0.1) in background threads of the test
process: one thread per client connection, HTTP/1.1 keep-alive on both sides (one
upstream connection per client connection).

Requests are forwarded byte for byte: the request line and header block are sent
exactly as received (so the ``Host`` header and everything SigV4 signs stay intact),
and bodies are relayed as they arrive, whether framed by ``Content-Length`` or by
``Transfer-Encoding: chunked`` (botocore sends file-like bodies as ``aws-chunked``
inside ``Transfer-Encoding: chunked``, with ``Expect: 100-continue``).  For
``Expect: 100-continue`` the proxy answers ``100 Continue`` to the client itself,
then forwards head and body together, and drops the upstream's own 1xx responses.
Response bodies are streamed through a fixed buffer, never held whole.

Every request gets a :class:`Record` (operation, bucket, key, range, status, bytes,
timing, concurrency, injected fault).  A record is finished (``end`` set, in-flight
count decremented) right *before* the last byte of its response is sent, so once a
client has a whole response its record is complete, and a client issuing requests
one after another never sees them overlap in ``in_flight_at_start``/``max_in_flight``.
(For a response delimited by closing the connection this cannot be done before.)

Faults (:class:`Status`, :class:`Reset`, :class:`Stall`) are injected with
:meth:`S3Proxy.inject`; ``proxy.wait_for(predicate)`` and ``handle.wait()`` help to
synchronize with requests held by a Stall.

Example::

    with S3Proxy(server.endpoint) as proxy:
        s3 = server.client(endpoint_url=proxy.endpoint)
        with proxy.inject(Status(503, "SlowDown"), op="GetObject"):
            ...
        assert proxy.count("GetObject") == 1
"""

from __future__ import annotations

import copy
import email.utils
import itertools
import re
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "Fault",
    "FaultHandle",
    "Headers",
    "OPS",
    "Record",
    "Reset",
    "S3Proxy",
    "Stall",
    "DropContentRange",
    "Status",
    "classify",
    "parse_range",
]

OPS = (
    "GetObject",
    "HeadObject",
    "ListObjectsV2",
    "ListObjects",
    "HeadBucket",
    "GetBucketLocation",
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "ListMultipartUploads",
    "DeleteObject",
    "DeleteObjects",
    "CopyObject",
    "CreateBucket",
    "ListBuckets",
    "Other",
)

_BUF_SIZE = 1 << 20
_MAX_HEAD = 128 * 1024
_UPSTREAM_TIMEOUT = 300.0
_STOP_JOIN_TIMEOUT = 5.0


# ----------------------------------------------------------------------- headers
class Headers(Mapping[str, str]):
    """Case-insensitive, order-preserving header mapping (repeated headers joined by ', ')."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._d: dict[str, tuple[str, str]] = {}
        for k, v in items:
            lk = k.lower()
            if lk in self._d:
                ok, ov = self._d[lk]
                self._d[lk] = (ok, f"{ov}, {v}")
            else:
                self._d[lk] = (k, v)

    def __getitem__(self, key: str) -> str:
        return self._d[key.lower()][1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._d.values())

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return {k.lower(): v for k, v in self.items()} == {
                str(k).lower(): v for k, v in other.items()
            }
        return NotImplemented


def _parse_header_lines(lines: list[bytes]) -> Headers:
    items = []
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise _ProtocolError(f"bad header line {line[:100]!r}")
        items.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))
    return Headers(items)


# ------------------------------------------------------------------------ faults
class Fault:
    """Base class of injectable faults."""

    @property
    def name(self) -> str:
        return type(self).__name__


_DEFAULT_S3_ERRORS = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is in progress."),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class Status(Fault):
    """Answer with this HTTP status and an S3 XML error body, without contacting upstream."""

    code: int = 500
    s3_code: str | None = None
    message: str | None = None

    @property
    def name(self) -> str:
        return f"Status({self.code},{self.error_code})"

    @property
    def error_code(self) -> str:
        return self.s3_code or _DEFAULT_S3_ERRORS.get(self.code, ("InternalError", ""))[0]

    @property
    def error_message(self) -> str:
        if self.message is not None:
            return self.message
        return _DEFAULT_S3_ERRORS.get(self.code, ("", "Injected error"))[1] or "Injected error"


@dataclass(frozen=True)
class Reset(Fault):
    """Close the client connection with a TCP RST (before forwarding, after ``after_bytes``
    of the response body, or after ``after_request_bytes`` of the request body)."""


@dataclass(frozen=True)
class Stall(Fault):
    """Hold the request (or the response at ``after_bytes``, or the request body at
    ``after_request_bytes``) for ``seconds``.

    ``None`` holds until the fault is removed (``handle.remove()``, ``clear_faults()``)
    or the proxy stops.  Removing the fault releases held requests at once.
    """

    seconds: float | None = None

    @property
    def name(self) -> str:
        return "Stall"


@dataclass(frozen=True)
class DropContentRange(Fault):
    """Forward the request and its answer, but without the answer's Content-Range header:
    a ranged GET answered like that (seen from S3 itself, and from SeaweedFS under load)."""


class FaultHandle:
    """A fault injected into an :class:`S3Proxy`; returned by :meth:`S3Proxy.inject`."""

    def __init__(self, proxy: "S3Proxy", fault: Fault, op, match, times, after_bytes,
                 after_request_bytes=None):
        self.proxy = proxy
        self.fault = fault
        self.op = op
        self.match = match
        self.times = times
        self.after_bytes = after_bytes
        self.after_request_bytes = after_request_bytes
        self.hits = 0
        self.released = threading.Event()

    @property
    def active(self) -> bool:
        return not self.released.is_set() and (self.times is None or self.hits < self.times)

    def remove(self) -> None:
        """Stop matching new requests and release requests held by a Stall."""
        self.proxy._remove_fault(self)

    def wait(self, hits: int = 1, *, timeout: float = 10.0) -> bool:
        """Wait until the fault matched at least ``hits`` requests."""
        return self.proxy.wait_for(lambda: self.hits >= hits, timeout)

    def __enter__(self) -> "FaultHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"FaultHandle({self.fault!r}, op={self.op!r}, times={self.times!r}, "
            f"after_bytes={self.after_bytes!r}, hits={self.hits})"
        )


# ----------------------------------------------------------------------- records
@dataclass
class Record:
    """One request seen by the proxy.  ``end``/``status`` are None while in flight."""

    id: int
    op: str
    method: str
    target: str
    bucket: str | None
    key: str | None
    query: dict[str, str]
    request_headers: Headers
    range: tuple[int | None, int | None] | None
    start: float
    in_flight_at_start: int = 0
    status: int | None = None
    response_headers: Headers | None = None
    response_bytes: int = 0
    request_bytes: int = 0
    end: float | None = None
    fault: str | None = None
    forwarded: bool = False
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


_BUCKET_SUBRESOURCES_OTHER = {
    "acl", "cors", "encryption", "lifecycle", "logging", "notification", "policy",
    "replication", "requestPayment", "tagging", "versioning", "website", "versions",
    "object-lock", "ownershipControls", "publicAccessBlock", "accelerate", "analytics",
    "inventory", "metrics", "intelligent-tiering", "policyStatus",
}
_OBJECT_SUBRESOURCES_OTHER = {
    "acl", "tagging", "retention", "legal-hold", "attributes", "torrent", "restore",
    "select", "uploadId",
}


def classify(method: str, bucket: str | None, key: str | None, query: Mapping[str, str],
             headers: Mapping[str, str]) -> str:
    """Name the S3 operation of a path-style request."""
    method = method.upper()
    if not bucket:
        return "ListBuckets" if method == "GET" else "Other"
    if not key:
        if method == "GET":
            if "location" in query:
                return "GetBucketLocation"
            if "uploads" in query:
                return "ListMultipartUploads"
            if query.get("list-type") == "2":
                return "ListObjectsV2"
            if _BUCKET_SUBRESOURCES_OTHER & set(query):
                return "Other"
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            return "Other" if query else "CreateBucket"
        if method == "POST":
            return "DeleteObjects" if "delete" in query else "Other"
        return "Other"
    if method == "GET":
        return "Other" if _OBJECT_SUBRESOURCES_OTHER & set(query) else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        copy_source = "x-amz-copy-source" in headers
        if "uploadId" in query and "partNumber" in query:
            return "Other" if copy_source else "UploadPart"  # UploadPartCopy -> Other
        if _OBJECT_SUBRESOURCES_OTHER & set(query):
            return "Other"
        return "CopyObject" if copy_source else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "Other"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        if _OBJECT_SUBRESOURCES_OTHER & set(query):
            return "Other"
        return "DeleteObject"
    return "Other"


def parse_range(value: str | None) -> tuple[int | None, int | None] | None:
    """``bytes=a-b`` -> (a, b) inclusive; ``bytes=a-`` -> (a, None); ``bytes=-n`` -> (-n, None).

    Multiple ranges or unparsable values give None.
    """
    if not value:
        return None
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            return (-int(last), None)
        return (int(first), int(last) if last else None)
    except ValueError:
        return None


# ------------------------------------------------------------------ socket utils
class _ProtocolError(Exception):
    pass


class _Abort(Exception):
    """Stop handling this connection now (reset, stop, or a dead peer)."""


class _Reader:
    """Buffered reading from a socket, with zero-copy-ish relaying to another socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self._scratch: memoryview | None = None

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """Bytes up to and including the blank line; None on clean EOF before any byte."""
        start = 0
        while True:
            idx = self.buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                head = bytes(self.buf[: idx + 4])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _ProtocolError("header block too large")
            start = max(0, len(self.buf) - 3)
            if not self._fill():
                if self.buf:
                    raise _ProtocolError("connection closed inside a header block")
                return None

    def read_line(self) -> bytes:
        start = 0
        while True:
            idx = self.buf.find(b"\r\n", start)
            if idx >= 0:
                line = bytes(self.buf[: idx + 2])
                del self.buf[: idx + 2]
                return line
            if len(self.buf) > _MAX_HEAD:
                raise _ProtocolError("line too long")
            start = max(0, len(self.buf) - 1)
            if not self._fill():
                raise _ProtocolError("connection closed inside a line")

    def pump(self, n: int | None, dst: socket.socket | None, count: Callable[[int], None],
             eof_ok: bool = False, before_last: Callable[[], None] | None = None) -> int:
        """Move ``n`` bytes (None: until EOF) to ``dst`` (None: discard); return the count.

        EOF before ``n`` bytes is an error unless ``eof_ok``.  ``before_last`` is called
        right before the piece that completes ``n`` bytes is sent.
        """
        moved = 0
        if self.buf:
            take = len(self.buf) if n is None else min(n, len(self.buf))
            if take:
                data = bytes(self.buf[:take])
                del self.buf[:take]
                count(take)
                moved += take
                if before_last is not None and moved == n:
                    before_last()
                if dst is not None:
                    dst.sendall(data)
        while n is None or moved < n:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_BUF_SIZE))
            want = _BUF_SIZE if n is None else min(n - moved, _BUF_SIZE)
            got = self.sock.recv_into(self._scratch, want)
            if got == 0:
                if n is None or eof_ok:
                    return moved
                raise _ProtocolError(f"connection closed with {n - moved} body bytes missing")
            count(got)
            moved += got
            if before_last is not None and moved == n:
                before_last()
            if dst is not None:
                dst.sendall(self._scratch[:got])
        return moved


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _readable_or_dead(sock: socket.socket) -> bool:
    try:
        r, _, x = select.select([sock], [], [sock], 0)
    except (OSError, ValueError):
        return True
    return bool(r or x)


@dataclass
class _Message:
    raw: bytes
    start_line: str
    headers: Headers

    @classmethod
    def parse(cls, raw: bytes) -> "_Message":
        lines = raw.split(b"\r\n")
        return cls(raw, lines[0].decode("latin-1"), _parse_header_lines(lines[1:]))

    def framing(self) -> tuple[str, int]:
        """("chunked", 0) | ("length", n) | ("none", 0)."""
        te = self.headers.get("transfer-encoding", "")
        if te and "chunked" in te.lower():
            return "chunked", 0
        cl = self.headers.get("content-length")
        if cl is not None:
            try:
                return "length", int(cl.split(",")[0].strip())
            except ValueError as e:
                raise _ProtocolError(f"bad content-length {cl!r}") from e
        return "none", 0

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for t in self.headers.get("connection", "").split(",") if t.strip()}


class _Upstream:
    """One keep-alive connection to the upstream server, owned by one client connection."""

    def __init__(self, proxy: "S3Proxy"):
        self.proxy = proxy
        self.sock: socket.socket | None = None
        self.reader: _Reader | None = None
        self.reused = False

    def get(self) -> tuple[socket.socket, _Reader]:
        if self.sock is not None and (_readable_or_dead(self.sock) or self.reader.buf):
            self.close()
        if self.sock is None:
            sock = socket.create_connection(self.proxy._upstream_addr, timeout=10)
            sock.settimeout(_UPSTREAM_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.proxy._track(sock)
            self.sock, self.reader, self.reused = sock, _Reader(sock), False
        else:
            self.reused = True
        return self.sock, self.reader

    def close(self) -> None:
        if self.sock is not None:
            self.proxy._untrack(self.sock)
            _shutdown(self.sock)
            self.sock.close()
        self.sock = self.reader = None


class _Sink:
    """Sends a response body to the client, counting payload bytes and firing a
    fault registered with ``after_bytes``."""

    def __init__(self, proxy: "S3Proxy", rec: Record, csock: socket.socket, handle: FaultHandle | None):
        self.proxy, self.rec, self.csock, self.handle = proxy, rec, csock, handle
        self.pending = handle is not None

    def finish(self) -> None:
        self.proxy._finish(self.rec)

    def _count(self, n: int) -> None:
        self.rec.response_bytes += n

    def _maybe_fire(self) -> None:
        if self.pending and self.rec.response_bytes >= self.handle.after_bytes:
            self.pending = False
            self.rec.fault = self.handle.fault.name
            if isinstance(self.handle.fault, Reset):
                raise _ResetClient()
            if isinstance(self.handle.fault, Stall):
                self.proxy._stall(self.handle)

    def payload(self, reader: _Reader, n: int | None, last: bool = False) -> None:
        """Relay ``n`` payload bytes (None: until EOF) from upstream to the client.

        With ``last``, these are the last bytes of the response: the record is
        finished right before the final piece goes out, so that a client that has
        the whole response always sees a finished record.
        """
        eof_mode = n is None
        while eof_mode or n > 0:
            if self.pending:
                self._maybe_fire()
            if not self.pending:
                reader.pump(n, self.csock, self._count, before_last=self.finish if last else None)
                return
            room = self.handle.after_bytes - self.rec.response_bytes
            step = room if eof_mode else min(room, n)
            hook = self.finish if last and not eof_mode and step == n else None
            moved = reader.pump(step, self.csock, self._count, eof_ok=eof_mode, before_last=hook)
            if eof_mode and moved < step:
                return  # EOF
            if not eof_mode:
                n -= moved

    def raw(self, data: bytes) -> None:
        self.csock.sendall(data)


class _ResetClient(Exception):
    pass


# ------------------------------------------------------------------------- proxy
class S3Proxy:
    """Recording, fault-injecting reverse proxy in front of ``upstream_endpoint``."""

    def __init__(self, upstream_endpoint: str, host: str = "127.0.0.1", port: int = 0):
        parts = urlsplit(upstream_endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream_endpoint!r}")
        self.upstream_endpoint = upstream_endpoint
        self._upstream_addr = (parts.hostname, parts.port or 80)
        self._host, self._port = host, port
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: list[Record] = []
        self._ids = itertools.count(1)
        self._in_flight: Counter[str] = Counter()
        self._max_in_flight: Counter[str] = Counter()
        self._faults: list[FaultHandle] = []
        self._socks: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self.endpoint: str | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "S3Proxy":
        if self._listener is not None:
            return self
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self._host, self._port))
        lsock.listen(1024)
        lsock.settimeout(0.1)
        self._listener = lsock
        self._stopping.clear()
        host, port = lsock.getsockname()[:2]
        self.endpoint = f"http://{host}:{port}"
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"s3proxy-accept-{port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = _STOP_JOIN_TIMEOUT) -> None:
        """Stop accepting, drop every connection, release stalls; bounded."""
        if self._listener is None:
            return
        self._stopping.set()
        with self._lock:
            for h in self._faults:
                h.released.set()
            socks = list(self._socks)
            self._changed.notify_all()
        for s in socks:
            _shutdown(s)
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        try:
            self._listener.close()
        except OSError:
            pass
        self._listener = None

    def __enter__(self) -> "S3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    # -- records -----------------------------------------------------------------
    def records(self, op: str | None = None) -> list[Record]:
        """Snapshot (copies) of the records, optionally of one operation."""
        with self._lock:
            return [copy.copy(r) for r in self._records if op is None or r.op == op]

    def count(self, op: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._records if op is None or r.op == op)

    def clear(self) -> None:
        """Forget records; max_in_flight restarts from what is in flight now."""
        with self._lock:
            self._records.clear()
            self._max_in_flight = Counter({k: v for k, v in self._in_flight.items() if v})

    def max_in_flight(self, op: str) -> int:
        with self._lock:
            return self._max_in_flight.get(op, 0)

    def in_flight(self, op: str | None = None) -> int:
        with self._lock:
            if op is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(op, 0)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` (re-checked whenever a request starts or ends)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 0.05))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda: self.in_flight() == 0, timeout)

    # -- faults ------------------------------------------------------------------
    def inject(
        self,
        fault: Fault,
        *,
        op: str | None = None,
        match: Callable[[Record], bool] | None = None,
        times: int | None = 1,
        after_bytes: int | None = None,
        after_request_bytes: int | None = None,
    ) -> FaultHandle:
        """Inject ``fault`` for the next ``times`` matching requests (None: unlimited).

        Faults are checked in insertion order; the first match wins.  ``after_bytes``
        (Reset and Stall only) applies the fault after that many response-body bytes
        were sent to the client; ``after_request_bytes`` (Reset and Stall only) once that many
        request-body bytes arrived: a Reset then forwards only the bytes before the piece
        that reached the count (upstream sees a truncated body), a Stall holds that piece.
        """
        if not isinstance(fault, Fault):
            raise TypeError(f"not a fault: {fault!r}")
        if op is not None and op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        if after_bytes is not None and isinstance(fault, Status):
            raise ValueError("after_bytes makes no sense for Status")
        if after_request_bytes is not None and (isinstance(fault, Status) or after_bytes is not None):
            raise ValueError("after_request_bytes is for Reset and Stall, without after_bytes")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        h = FaultHandle(self, fault, op, match, times, after_bytes, after_request_bytes)
        with self._lock:
            self._faults.append(h)
        return h

    def clear_faults(self) -> None:
        with self._lock:
            for h in self._faults:
                h.released.set()
            self._faults.clear()
            self._changed.notify_all()

    def faults(self) -> list[FaultHandle]:
        with self._lock:
            return list(self._faults)

    def _remove_fault(self, h: FaultHandle) -> None:
        with self._lock:
            h.released.set()
            if h in self._faults:
                self._faults.remove(h)
            self._changed.notify_all()

    def _match_fault(self, rec: Record) -> FaultHandle | None:
        with self._lock:
            candidates = list(self._faults)
        for h in candidates:
            if not h.active or (h.op is not None and h.op != rec.op):
                continue
            if h.match is not None:
                try:
                    if not h.match(rec):
                        continue
                except Exception:  # noqa: BLE001 - a broken predicate does not match
                    continue
            with self._lock:
                if not h.active:
                    continue
                h.hits += 1
                if h.times is not None and h.hits >= h.times and not isinstance(h.fault, Stall):
                    # used up: no longer listed (a Stall stays so remove() can release it)
                    if h in self._faults:
                        self._faults.remove(h)
                self._changed.notify_all()
            return h
        return None

    def _stall(self, h: FaultHandle) -> None:
        seconds = h.fault.seconds  # type: ignore[attr-defined]
        deadline = None if seconds is None else time.monotonic() + seconds
        while not h.released.is_set():
            if self._stopping.is_set():
                raise _Abort("proxy stopping")
            wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if wait <= 0:
                break
            h.released.wait(wait)
        if self._stopping.is_set():
            raise _Abort("proxy stopping")

    # -- connections ---------------------------------------------------------------
    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)
            stopping = self._stopping.is_set()
        if stopping:
            _shutdown(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def _accept_loop(self) -> None:
        lsock = self._listener
        while not self._stopping.is_set():
            try:
                conn, _addr = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                time.sleep(0.01)
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name=f"s3proxy-conn-{conn.getpeername()[1]}")
            with self._lock:
                self._threads.add(t)
            self._track(conn)
            t.start()

    def _serve(self, csock: socket.socket) -> None:
        creader = _Reader(csock)
        upstream = _Upstream(self)
        try:
            while not self._stopping.is_set():
                try:
                    head = creader.read_head()
                except (OSError, _ProtocolError):
                    break
                if head is None:
                    break
                try:
                    keep = self._handle(head, creader, csock, upstream)
                except _ResetClient:
                    _reset(csock)
                    break
                except (_Abort, OSError, _ProtocolError):
                    break
                if not keep:
                    break
        finally:
            upstream.close()
            self._untrack(csock)
            _shutdown(csock) if not _linger_set(csock) else None
            try:
                csock.close()
            except OSError:
                pass
            with self._lock:
                self._threads.discard(threading.current_thread())

    # -- one request -------------------------------------------------------------
    def _new_record(self, req: _Message) -> Record:
        method, target, _version = (req.start_line.split(" ", 2) + ["", ""])[:3]
        parts = urlsplit(target)
        path = parts.path or "/"
        segs = path.lstrip("/").split("/", 1)
        bucket = unquote(segs[0]) or None
        key = unquote(segs[1]) if len(segs) > 1 and segs[1] != "" else None
        query: dict[str, str] = {}
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            query.setdefault(k, v)
        op = classify(method, bucket, key, query, req.headers)
        return Record(
            id=0, op=op, method=method, target=target, bucket=bucket, key=key, query=query,
            request_headers=req.headers, range=parse_range(req.headers.get("range")),
            start=time.monotonic(),
        )

    def _handle(self, head: bytes, creader: _Reader, csock: socket.socket, upstream: _Upstream) -> bool:
        req = _Message.parse(head)
        rec = self._new_record(req)
        with self._lock:
            rec.id = next(self._ids)
            self._in_flight[rec.op] += 1
            rec.in_flight_at_start = self._in_flight[rec.op]
            if rec.in_flight_at_start > self._max_in_flight[rec.op]:
                self._max_in_flight[rec.op] = rec.in_flight_at_start
            self._records.append(rec)
            self._changed.notify_all()
        try:
            return self._handle_inner(req, rec, creader, csock, upstream)
        except _ResetClient:
            rec.error = rec.error or "reset by fault"
            raise
        except BaseException as e:
            rec.error = rec.error or f"{type(e).__name__}: {e}"
            raise
        finally:
            self._finish(rec)

    def _finish(self, rec: Record) -> None:
        """Mark the request complete (idempotent).  Called right before the last bytes
        of the response are sent, so the record is final once the client has them."""
        with self._lock:
            if rec.end is None:
                rec.end = time.monotonic()
                self._in_flight[rec.op] -= 1
                self._changed.notify_all()

    def _handle_inner(self, req: _Message, rec: Record, creader: _Reader, csock: socket.socket,
                      upstream: _Upstream) -> bool:
        version = req.start_line.rsplit(" ", 1)[-1].upper()
        conn_tokens = req.connection_tokens()
        client_keep = ("close" not in conn_tokens) and (version == "HTTP/1.1" or "keep-alive" in conn_tokens)
        expects = req.headers.get("expect", "").lower() == "100-continue"
        body_kind, body_len = req.framing()

        handle = self._match_fault(rec)
        late = None  # fault applied to the response body
        late_request = None  # fault applied to the request body
        if handle is not None:
            if handle.after_bytes is not None:
                late = handle
            elif handle.after_request_bytes is not None:
                late_request = handle
            elif isinstance(handle.fault, Reset):
                rec.fault = handle.fault.name
                raise _ResetClient()
            elif isinstance(handle.fault, Stall):
                rec.fault = handle.fault.name
                self._stall(handle)
            elif isinstance(handle.fault, Status):
                rec.fault = handle.fault.name
                if expects:
                    csock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._relay_request_body(creader, None, body_kind, body_len, rec)
                self._send_error(csock, rec, handle.fault, keep=client_keep)
                return client_keep

        if expects:
            csock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        bodiless = body_kind == "none" or (body_kind == "length" and body_len == 0)
        for attempt in (1, 2):
            usock, ureader = upstream.get()
            retry_ok = upstream.reused and bodiless and attempt == 1
            try:
                usock.sendall(req.raw)
            except OSError:
                if not retry_ok:
                    raise
                upstream.close()  # stale keep-alive connection: one fresh try
                continue
            rec.forwarded = True

            upstream_broken = False
            try:
                self._relay_request_body(creader, usock, body_kind, body_len, rec, late_request)
            except OSError as e:
                if isinstance(e, socket.timeout) or self._stopping.is_set():
                    raise
                # upstream stopped reading (early response?); go on and read its answer
                upstream_broken = True

            try:
                resp, status = self._read_response_head(ureader)
            except (OSError, _ProtocolError):
                if not retry_ok or self._stopping.is_set():
                    raise
                upstream.close()
                continue
            break
        rhead = resp.raw
        if handle is not None and isinstance(handle.fault, DropContentRange):
            rec.fault = handle.fault.name
            rhead = re.sub(rb"(?im)^content-range:[^\r\n]*\r\n", b"", rhead)
        rec.status = status
        rec.response_headers = resp.headers

        if req.start_line.upper().startswith("HEAD ") or status in (204, 304):
            kind, length = "none", 0
        else:
            kind, length = resp.framing()
            if kind == "none":
                kind = "eof"
        resp_tokens = resp.connection_tokens()
        upstream_keep = kind != "eof" and "close" not in resp_tokens and not upstream_broken
        keep = client_keep and upstream_keep

        sink = _Sink(self, rec, csock, late)
        if kind == "none" or (kind == "length" and length == 0):
            sink.finish()
        sink.raw(rhead)
        if kind == "length":
            sink.payload(ureader, length, last=True)
        elif kind == "eof":
            sink.payload(ureader, None)
        elif kind == "chunked":
            while True:
                line = ureader.read_line()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    tail = [line]
                    while True:  # trailers up to the blank line
                        t = ureader.read_line()
                        tail.append(t)
                        if t == b"\r\n":
                            break
                    sink.finish()
                    sink.raw(b"".join(tail))
                    break
                sink.raw(line)
                sink.payload(ureader, size)
                crlf = ureader.read_line()
                sink.raw(crlf)
        if not upstream_keep or not keep:
            upstream.close()
        return keep

    @staticmethod
    def _read_response_head(ureader: _Reader) -> tuple[_Message, int]:
        while True:
            rhead = ureader.read_head()
            if rhead is None:
                raise _ProtocolError("upstream closed the connection without a response")
            resp = _Message.parse(rhead)
            try:
                status = int(resp.start_line.split(" ", 2)[1])
            except (IndexError, ValueError) as e:
                raise _ProtocolError(f"bad status line {resp.start_line!r}") from e
            if 100 <= status < 200 and status != 101:
                continue  # 1xx: the client already got our own 100 Continue
            return resp, status

    def _relay_request_body(self, creader: _Reader, dst: socket.socket | None, kind: str,
                            length: int, rec: Record, late: FaultHandle | None = None) -> None:
        def count(n: int) -> None:
            rec.request_bytes += n

        def relay(n: int) -> None:
            nonlocal late
            if late is not None and late.after_request_bytes - rec.request_bytes <= n:
                # the fault's point lies within these bytes: forward up to it, then fire
                first = max(0, late.after_request_bytes - rec.request_bytes)
                creader.pump(first, dst, count)
                n -= first
                handle, late = late, None
                rec.fault = handle.fault.name
                if isinstance(handle.fault, Reset):
                    raise _ResetClient()
                self._stall(handle)
            creader.pump(n, dst, count)

        if kind == "length":
            relay(length)
        elif kind == "chunked":
            while True:
                line = creader.read_line()
                if dst is not None:
                    dst.sendall(line)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        t = creader.read_line()
                        if dst is not None:
                            dst.sendall(t)
                        if t == b"\r\n":
                            return
                relay(size)
                crlf = creader.read_line()
                if dst is not None:
                    dst.sendall(crlf)

    def _send_error(self, csock: socket.socket, rec: Record, fault: Status, keep: bool) -> None:
        resource = "/" + "/".join(p for p in (rec.bucket, rec.key) if p)
        request_id = f"PAILPROXY{rec.id:08d}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{_xml(fault.error_code)}</Code>"
            f"<Message>{_xml(fault.error_message)}</Message>"
            f"<Resource>{_xml(resource)}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        is_head = rec.method.upper() == "HEAD"
        reason = _REASONS.get(fault.code, "Error")
        headers = [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", request_id),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Server", "PailTestProxy"),
            ("Connection", "keep-alive" if keep else "close"),
        ]
        head = f"HTTP/1.1 {fault.code} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        rec.status = fault.code
        rec.response_headers = Headers(headers)
        if not is_head:
            rec.response_bytes += len(body)
        self._finish(rec)
        csock.sendall(head.encode("latin-1") + (b"" if is_head else body))


def _linger_set(sock: socket.socket) -> bool:
    try:
        onoff, _ = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
        return bool(onoff)
    except OSError:
        return False


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_REASONS = {
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
    412: "Precondition Failed", 416: "Requested Range Not Satisfiable",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}
