"""Ranged GETs over HTTP or HTTPS on Pail's own kept-alive sockets.

Every read of object data goes this way (awscrt keeps HEAD and ListObjectsV2, and every
GET with PAIL_DATA_PATH=crt). Small ranges are sent and read by the trio loop itself: a
random 256 KiB read through awscrt's S3 client cost about 0.5 ms of CPU in awscrt's
threads (most of it the kernel switching between them and the loop), on the loop's socket
about 0.2 ms; four threads of random reads went from 133–153 to 176–222 MB/s on the 2-core
development machine against a local SeaweedFS. A body over THREAD_BODY bytes (a
prefetcher's window) is received by a worker thread straight into the buffer that is
returned: the kernel's copy is the only one, made without the GIL, where awscrt copied
each body again into a Python ``bytes`` from its own buffers. Measured against awscrt
(2026-12-02, rounds alternating in order): a 1 GiB sequential read 514 → 583 MB/s with
1.54 → 1.21 CPU-s in the mount, four parallel readers 410 → 466 MB/s with 8.7 → 6.8.
Over https the sockets speak TLS through Python's ``ssl``.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote, urlsplit

import botocore.session
import trio

from driver import metrics
from driver.config import S3Settings
from driver.s3 import api, options, sigv4

# Larger bodies are received by a worker thread, smaller ones by the loop: a thread's
# round trip costs more than a small body's receive.
THREAD_BODY = 1024 * 1024
# Connections kept open between requests; more are opened when more requests overlap.
# A mount's --max-memory allows 16 prefetch requests of 8 MiB in flight by default.
MAX_IDLE = 32
# Worker threads receiving bodies at once; a body waiting for one stays in its socket.
MAX_RECEIVING = 32
_HEAD_LIMIT = 64 * 1024
_ERROR_BODY_LIMIT = 64 * 1024  # an S3 error answer is a short XML document
_RETRIED_STATUS = {500, 502, 503, 504}
T = TypeVar("T")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# A body's buffer, not zeroed: ``bytearray(n)`` zeroes it, which cost the loop 0.1-0.15
# CPU-s per GiB read (a sequential read 587 -> 625 MB/s without). A body is returned only
# once every byte of it has been received; an answer cut short is an error, its buffer
# dropped (as socket.recv does with its own unfilled bytes).
_unzeroed_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_unzeroed_bytearray.restype = ctypes.py_object
_unzeroed_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


class _Broken(Exception):
    """No usable answer: the connection failed, or what came was not HTTP we can take."""


class SocketGets:
    """Ranged GETs of one bucket over kept-alive connections, http or https."""

    def __init__(self, settings: S3Settings, region: str, session: botocore.session.Session, *, scheme: str, host: str,
                 base_path: str) -> None:
        self._settings = settings
        self._session = session
        self._signer = None if settings.no_sign_request else sigv4.Signer(region)
        self._host = host  # as in the Host header: the port too, when not the default
        address = urlsplit("//" + host)
        self._address = (address.hostname or "", address.port or (443 if scheme == "https" else 80))
        # The system's trust store, as awscrt's, or only --ca-bundle's certificates.
        self._tls = ssl.create_default_context(cafile=settings.ca_bundle) if scheme == "https" else None
        self._base_path = base_path
        self._deadline = settings.request_timeout
        self._connect_timeout = min(settings.connect_timeout, settings.request_timeout)
        self._extra = {"user-agent": settings.user_agent_extra,
                       **{name.lower(): value for name, value in options.headers(settings, "GetObject")}}
        self._idle: list[socket.socket] = []
        self._receivers = trio.CapacityLimiter(MAX_RECEIVING)

    async def get_range(self, key: str, start: int, length: int, *, etag: str) -> bytes | bytearray:
        path = self._base_path + quote(key, safe="/~")
        headers = {"host": self._host, "range": f"bytes={start}-{start + length - 1}", "if-match": etag,
                   **self._extra}
        failure: api.ObjectClientError | None = None
        with metrics.timed_s3_request("GetObject") as status, trio.move_on_after(self._deadline):
            for attempt in range(1, self._settings.max_attempts + 1):
                if attempt > 1:  # full jitter from 200 ms doubling, as awscrt is configured
                    await trio.sleep(random.uniform(0, min(5.0, 0.2 * 2 ** (attempt - 2))))
                try:
                    code, answer, body = await self._exchange(path, headers, length)
                    if code in (200, 206):
                        data = _asked_range(code, answer, body, start, length)
                        status.append(code)
                        return data
                except _Broken as exc:
                    failure = api.Unreachable(f"GetObject {key}: {exc}", operation="GetObject")
                    continue
                failure = api.error_for_status("GetObject", key, code, body)
                if code not in _RETRIED_STATUS:
                    raise failure
            if failure is not None:
                raise failure
        raise api.Unreachable(f"GetObject {key}: no answer within {self._deadline:.0f} s", operation="GetObject")

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def _exchange(self, path: str, headers: dict[str, str],
                        length: int) -> tuple[int, dict[str, str], bytes | bytearray]:
        if self._signer is not None:
            headers = self._signer.sign("GET", path, "", headers, await self._credentials())
        request = (f"GET {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                   + "\r\n").encode("latin-1")
        # At most two turns: a kept connection, then (if the server had closed it) a new one.
        while True:
            reused = self._kept()
            sock = reused or await self._connect()
            reader = _Reader(sock, self._receivers, self._deadline)
            try:
                await _send_all(sock, request)
                code, answer, body, keep = await reader.answer(length)
            except (OSError, _Broken) as exc:
                sock.close()  # no thread has it: its failure is what brought us here
                if reused is not None and reader.received == 0:
                    # The server had closed it before our request arrived, and likely the
                    # other kept ones too (a restart, an idle timeout): send on a new one.
                    self.close()
                    continue
                raise _Broken(str(exc) or type(exc).__name__) from None
            except BaseException:  # cancelled mid-answer: the rest would be read as the next one
                reader.close()
                raise
            if keep and len(self._idle) < MAX_IDLE:
                self._idle.append(sock)
            else:
                sock.close()
            return code, answer, body

    def _kept(self) -> socket.socket | None:
        while self._idle:
            sock = self._idle.pop()
            try:
                # The socket's own bytes, under TLS too (an SSLSocket takes no flags): a
                # TLS alert or a FIN from the server means it closed the connection.
                socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return sock  # nothing to read: open and quiet, as a kept connection should be
            except OSError:
                pass
            sock.close()  # closed by the server, or bytes nobody asked for
        return None

    async def _connect(self) -> socket.socket:
        host, port = self._address
        try:
            with trio.fail_after(self._connect_timeout):
                found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                failure: Exception | None = None
                for family, kind, proto, _, address in found:
                    sock = socket.socket(family, kind, proto)
                    try:
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        await _connect(sock, address)
                        if self._tls is not None:
                            sock = self._tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
                            await _when_ready(sock, sock.do_handshake)
                        return sock
                    except OSError as exc:  # ssl.SSLError too: a certificate not trusted, say
                        sock.close()
                        failure = exc
                    except BaseException:
                        sock.close()
                        raise
        except trio.TooSlowError:
            raise _Broken(f"no connection to {host}:{port} within {self._connect_timeout:g} s") from None
        except OSError as exc:
            raise _Broken(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
        raise _Broken(f"cannot reach {host}:{port}: {getattr(failure, 'strerror', None) or failure}")

    async def _credentials(self) -> sigv4.Credentials:
        found = self._session.get_credentials()
        if found is None:
            raise _Broken("no AWS credentials found")
        refresh_needed = getattr(found, "refresh_needed", None)
        try:
            if refresh_needed is not None and refresh_needed():
                frozen = await trio.to_thread.run_sync(found.get_frozen_credentials)  # may ask STS: not in the loop
            else:
                frozen = found.get_frozen_credentials()
        except Exception as exc:  # expired, and STS or the file failed: botocore's error, a failed attempt
            # Its name only: botocore's messages are not ours to vouch for as free of secrets.
            raise _Broken(f"credentials could not be refreshed ({type(exc).__name__})") from None
        return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def _asked_range(code: int, answer: dict[str, str], body: bytes | bytearray, start: int,
                 length: int) -> bytes | bytearray:
    """The body, if it is the range asked for (S3 shortens a range past the object's end)."""
    if code == 206:
        match = _CONTENT_RANGE.fullmatch(answer.get("content-range", ""))
        last = int(match[2]) if match else -1
        at_the_end = match is not None and match[3] != "*" and last == int(match[3]) - 1
        if (match is None or int(match[1]) != start or last - start + 1 != len(body)
                or (last != start + length - 1 and not at_the_end)):
            raise _Broken(f"a 206 answer without the range asked for ({answer.get('content-range')!r})")
    elif start != 0:  # a 200 is the whole object: the asked range only if it starts at 0
        raise _Broken("a 200 answer to a ranged GET")
    return body


class _Reader:
    """An HTTP/1.1 answer from a non-blocking socket; a large body by a worker thread."""

    def __init__(self, sock: socket.socket, receivers: trio.CapacityLimiter, timeout: float) -> None:
        self._sock = sock
        self._receivers = receivers
        self._timeout = timeout
        self._receiving: _Receiving | None = None
        self._buf = bytearray()
        self.received = 0

    def close(self) -> None:
        """Close the connection now, or, while a worker thread still receives on it, shut
        it down (which ends the thread's wait) and leave the closing to that thread: its
        next call would otherwise find the descriptor's number given to a new socket."""
        if self._receiving is None or self._receiving.abandon():
            self._sock.close()

    async def answer(self, length: int) -> tuple[int, dict[str, str], bytes | bytearray, bool]:
        """Status, headers (lower-case names), body, and whether the connection can be kept."""
        while (end := self._buf.find(b"\r\n\r\n", 0, _HEAD_LIMIT + 4)) < 0:
            if len(self._buf) > _HEAD_LIMIT:
                raise _Broken("answer headers too long")
            await self._fill()
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise _Broken(f"not an HTTP answer: {lines[0][:80]!r}")
        code = int(rest[:3])
        answer: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise _Broken(f"malformed header line: {line[:80]!r}")
            answer[name.strip().lower()] = value.strip()
        limit = length if code in (200, 206) else _ERROR_BODY_LIMIT
        keep = version == "HTTP/1.1" and answer.get("connection", "").lower() != "close"
        if "chunked" in answer.get("transfer-encoding", "").lower():
            body = await self._chunked(limit)
        elif "content-length" in answer:
            size = int(answer["content-length"]) if answer["content-length"].isdigit() else -1
            if not 0 <= size <= limit:
                raise _Broken(f"a {code} answer of {answer['content-length']} bytes, {limit} at most expected")
            body = await self._exactly(size)
        else:  # the body ends when the connection does
            body, keep = await self._until_closed(limit), False
        if self._buf:  # bytes past the answer: nothing we can trust on this connection
            keep = False
        return code, answer, body, keep

    async def _fill(self) -> None:
        chunk = await _recv(self._sock, 65536)
        if not chunk:
            raise _Broken("connection closed before the whole answer")
        self.received += len(chunk)
        self._buf += chunk

    async def _exactly(self, size: int) -> bytearray:
        """The next ``size`` bytes, received into the buffer that is returned: a body is
        copied once, from the kernel (a ``bytes`` of it would be a second copy)."""
        body = _unzeroed_bytearray(None, size)
        have = min(size, len(self._buf))
        body[:have] = self._buf[:have]
        del self._buf[:have]
        view = memoryview(body)
        if size - have > THREAD_BODY:
            self._receiving = _Receiving(self._sock, view[have:], self._timeout)
            await trio.to_thread.run_sync(self._receiving.run, abandon_on_cancel=True, limiter=self._receivers)
            self._receiving = None
            self.received += size - have
            return body
        while have < size:  # straight into the body: no copy through a buffer
            n = await _recv_into(self._sock, view[have:])
            if not n:
                raise _Broken("connection closed before the whole answer")
            self.received += n
            have += n
        return body

    async def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > _HEAD_LIMIT:
                raise _Broken("chunk header too long")
            await self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    async def _chunked(self, limit: int) -> bytes:
        parts = []
        total = 0
        while True:
            try:
                size = int((await self._line()).split(b";")[0], 16)
            except ValueError:
                raise _Broken("malformed chunk size") from None
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise _Broken(f"a chunked answer of over {limit} bytes")
            parts.append(await self._exactly(size))
            if await self._line():
                raise _Broken("malformed chunk end")

    async def _until_closed(self, limit: int) -> bytes:
        while len(self._buf) <= limit:
            chunk = await _recv(self._sock, 65536)
            if not chunk:
                body, self._buf = bytes(self._buf), bytearray()
                return body
            self.received += len(chunk)
            self._buf += chunk
        raise _Broken(f"an answer of over {limit} bytes")


class _Receiving:
    """A body received by a worker thread, which owns the socket until it returns."""

    def __init__(self, sock: socket.socket, view: memoryview, timeout: float) -> None:
        self._sock = sock
        self._view = view
        self._timeout = timeout
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False

    def run(self) -> None:
        """In the worker thread: fill the view, each receive bounded by the timeout."""
        try:
            if isinstance(self._sock, ssl.SSLSocket):  # takes no flags: a TLS record at a time
                self._sock.settimeout(self._timeout)
                flags = 0
            else:
                # Blocking, bounded by the kernel's own receive timeout, and MSG_WAITALL:
                # most bodies in one call, so one turn of the GIL, not one for each time
                # the socket had some bytes. Four parallel readers of 1 GiB, rounds
                # alternating in order: 497 -> 562 MB/s, the mount's CPU 6.2 -> 5.0 s.
                self._sock.setblocking(True)
                seconds = max(self._timeout, 0.001)  # a zero SO_RCVTIMEO would mean none
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                      struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)))
                flags = socket.MSG_WAITALL
            have, size = 0, len(self._view)
            while have < size:
                try:
                    n = self._sock.recv_into(self._view[have:], 0, flags)  # without the GIL
                except BlockingIOError:  # the receive timeout passed with nothing received
                    raise TimeoutError(f"no bytes for {self._timeout:g} s") from None
                if not n:
                    raise _Broken("connection closed before the whole answer")
                have += n
        finally:
            with self._lock:
                self._done = True
                if self._abandoned:
                    self._sock.close()
                else:
                    self._sock.setblocking(False)

    def abandon(self) -> bool:
        """From the loop, when the read is cancelled: True if the thread has returned and
        the caller closes the socket; else the thread is woken and closes it."""
        with self._lock:
            if self._done:
                return True
            self._abandoned = True
        try:
            # The socket's own shutdown, under TLS too: SSLSocket's would drop the TLS
            # state the thread is reading with.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already shut by the server: the thread's receive ends all the same
        return False


# The socket calls, non-blocking, waiting in trio when the kernel has nothing yet.

async def _connect(sock: socket.socket, address) -> None:
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass
    await trio.lowlevel.wait_writable(sock)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await _when_ready(sock, lambda: sock.send(view), sending=True):]


async def _when_ready(sock: socket.socket, call: Callable[[], T], *, sending: bool = False) -> T:
    """``call()`` on the non-blocking ``sock``, waiting in trio for what it needs first.

    Always called before waiting: under TLS, bytes already decrypted are in OpenSSL's
    buffer, not the socket's, and a handshake or a record may need to write to read."""
    while True:
        try:
            return call()
        except BlockingIOError:
            await (trio.lowlevel.wait_writable(sock) if sending else trio.lowlevel.wait_readable(sock))
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)


async def _recv(sock: socket.socket, size: int) -> bytes:
    return await _when_ready(sock, lambda: sock.recv(size))


async def _recv_into(sock: socket.socket, view: memoryview) -> int:
    return await _when_ready(sock, lambda: sock.recv_into(view))
