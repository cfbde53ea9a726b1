"""Pail's own GETs (driver.s3.direct) against a scripted HTTP server on 127.0.0.1: kept
connections, connections the server closed, error answers, answers that are not the range
asked for, silence and cancellation, of bodies the loop receives and of larger ones a
worker thread does. Reads through a real mount and S3 server,
retries and faults included, are tested in tests/mount."""

from __future__ import annotations

import functools
import os
import socket
import threading

import botocore.credentials
import botocore.exceptions
import botocore.session
import pytest
import trio

from driver.config import S3Settings
from driver.s3 import api
from driver.s3.direct import THREAD_BODY, SocketGets, _Receiving
from tests.support.listening import accepted
from tests.support.tls import TlsFront, certificates

SECRET = "not-a-real-secret-but-kept-out-of-errors"
ETAG = '"0123456789abcdef"'
BIG = os.urandom(THREAD_BODY * 3)  # a body a worker thread receives


class ScriptedServer:
    """Answers the n-th request with the n-th of ``answers``: bytes to send and keep the
    connection, ("close", bytes) to send and close it, None to close without answering,
    ("hang", bytes) to send and then say nothing more, or ("stall", bytes) to send, say
    nothing more and count in ``released`` when the client lets the connection go."""

    def __init__(self, answers: list) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.released = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        for conn in accepted(self._listener, self._stop):
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                request, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(request)
                answer = self.answers.pop(0) if self.answers else None
                if answer is None:
                    return
                if isinstance(answer, tuple):
                    how, data = answer
                    conn.sendall(data)
                    if how == "hang":
                        self._stop.wait()  # until the test ends
                    if how == "stall":
                        self._until_released(conn)
                    return
                conn.sendall(answer)

    def _until_released(self, conn: socket.socket) -> None:
        try:
            while not self._stop.is_set() and conn.recv(65536):
                pass
        except OSError:
            pass
        if not self._stop.is_set():
            self.released += 1

    def close(self) -> None:
        self._stop.set()
        for conn in self._open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._listener.close()


@pytest.fixture
def server_with():
    servers = []

    def start(*answers) -> ScriptedServer:
        servers.append(ScriptedServer(list(answers)))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def partial(data: bytes, start: int, total: int = 1000, *, extra: str = "") -> bytes:
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{start + len(data) - 1}/{total}\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def error(status: int, code: str, *, chunked: bool = False) -> bytes:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>m</Message></Error>".encode()
    if chunked:
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
        return f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + framed
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def gets(port: int, *, scheme: str = "http", **settings) -> SocketGets:
    session = botocore.session.Session()
    session.set_credentials("AKIDTEST", SECRET)
    s3 = S3Settings(bucket="b", endpoint_url=f"{scheme}://127.0.0.1:{port}", **{"max_attempts": 3, **settings})
    return SocketGets(s3, "us-east-1", session, scheme=scheme, host=f"127.0.0.1:{port}", base_path="/b/")


def gets_with(port: int, credentials, **settings) -> SocketGets:
    """SocketGets whose session gives ``credentials`` (None: none found)."""
    class Session:
        def get_credentials(self):
            return credentials
    return SocketGets(S3Settings(bucket="b", **settings), "us-east-1", Session(), scheme="http",
                      host=f"127.0.0.1:{port}", base_path="/b/")


def run(client: SocketGets, *reads: tuple[int, int]):
    """The reads one after the other: their data, or the error each raised."""
    async def main():
        out = []
        with trio.fail_after(20):  # a bound for the test, not an expectation of speed
            for start, length in reads:
                try:
                    out.append(await client.get_range("dir/a key", start, length, etag=ETAG))
                except api.ObjectClientError as exc:
                    out.append(exc)
        client.close()
        return out
    return trio.run(main)


def test_a_range_past_the_objects_end_comes_shortened(server_with):
    server = server_with(partial(b"89", 8, total=10))
    assert run(gets(server.port), (8, 4)) == [b"89"]


def test_a_range_comes_signed_and_the_connection_is_kept(server_with):
    server = server_with(partial(b"0123", 10), partial(b"456789", 14))
    assert run(gets(server.port), (10, 4), (14, 6)) == [b"0123", b"456789"]
    assert server.connections == 1
    first = server.requests[0].decode()
    assert first.startswith("GET /b/dir/a%20key HTTP/1.1\r\n")
    assert "range: bytes=10-13" in first and f"if-match: {ETAG}" in first and "user-agent: pail" in first
    assert "authorization: AWS4-HMAC-SHA256 Credential=AKIDTEST/" in first and SECRET not in first


def test_a_connection_the_server_closed_after_answering_is_replaced(server_with):
    server = server_with(("close", partial(b"abc", 0)), partial(b"def", 3))
    assert run(gets(server.port), (0, 3), (3, 3)) == [b"abc", b"def"]
    assert server.connections == 2 and len(server.requests) == 2


def test_a_kept_connection_closed_as_the_request_arrives_is_not_a_failed_attempt(server_with):
    # The second request reaches a connection the server then drops without a byte: the
    # request goes again on a new connection, and the one attempt of max_attempts=1 suffices.
    server = server_with(partial(b"abc", 0), None, partial(b"def", 3))
    assert run(gets(server.port, max_attempts=1), (0, 3), (3, 3)) == [b"abc", b"def"]
    assert server.connections == 2 and len(server.requests) == 3


def test_error_answers_in_chunks_or_not_become_the_errors_of_their_code(server_with):
    server = server_with(error(404, "NoSuchKey", chunked=True), error(412, "PreconditionFailed"),
                         error(403, "AccessDenied", chunked=True), partial(b"ok", 0))
    missing, changed, refused, data = run(gets(server.port), (0, 2), (0, 2), (0, 2), (0, 2))
    assert isinstance(missing, api.NoSuchKey) and missing.status == 404
    assert isinstance(changed, api.PreconditionFailed) and changed.code == "PreconditionFailed"
    assert isinstance(refused, api.AccessDenied)
    assert data == b"ok"
    assert server.connections == 1  # each error answer was read whole: the connection stayed usable


def test_server_errors_are_retried_up_to_max_attempts(server_with):
    server = server_with(error(503, "SlowDown"), error(500, "InternalError"), partial(b"late", 0),
                         error(503, "SlowDown"), error(503, "SlowDown"), error(503, "SlowDown"))
    late, failed = run(gets(server.port), (0, 4), (0, 4))
    assert late == b"late"
    assert type(failed) is api.ObjectClientError and failed.status == 503 and failed.code == "SlowDown"
    assert len(server.requests) == 6


@pytest.mark.parametrize("answer", [
    partial(b"0123", 5),  # another range
    partial(b"01", 4),  # shorter than asked, not at the object's end
    b"HTTP/1.1 206 Partial Content\r\nContent-Length: 4\r\n\r\n0123",  # no Content-Range
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n0123",  # the whole object, for a range at 4
    b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 4-7/8\r\nContent-Length: 104857600\r\n\r\n0123",
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 206 Partial Content\r\nX-Padding: " + b"x" * 70_000,  # headers with no end in sight
    partial(b"0123", 4, extra="X-Padding: " + "x" * 70_000 + "\r\n"),  # headers past the limit, then an end
    b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a chunk size that is not hex
])
def test_an_answer_that_is_not_the_range_asked_for_is_an_error(server_with, answer):
    server = server_with(*[answer] * 3)
    [failed] = run(gets(server.port), (4, 4))
    assert isinstance(failed, api.Unreachable)
    assert len(server.requests) == 3  # retried like any failure, then reported


def test_a_silent_server_is_an_error_within_the_request_timeout(server_with):
    server = server_with(("hang", b""))
    [failed] = run(gets(server.port, request_timeout=1.0), (0, 4))
    assert isinstance(failed, api.Unreachable) and "no answer within 1 s" in str(failed)


def test_a_read_cancelled_mid_answer_does_not_leave_the_rest_for_the_next(server_with):
    half = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-7/8\r\nContent-Length: 8\r\n\r\n0123"
    server = server_with(("hang", half), partial(b"4567", 4))
    client = gets(server.port, request_timeout=5.0)

    async def main():
        with trio.move_on_after(0.5):
            await client.get_range("k", 0, 8, etag=ETAG)
            raise AssertionError("half an answer was taken for a whole one")
        data = await client.get_range("k", 4, 4, etag=ETAG)
        client.close()
        return data
    assert trio.run(main) == b"4567"
    assert server.connections == 2


def test_large_bodies_come_whole_and_their_connection_is_kept_for_the_loop(server_with):
    server = server_with(partial(BIG, 0, total=len(BIG)), partial(BIG[5:], 5, total=len(BIG)),
                         partial(b"abc", 0, total=len(BIG)))
    client = gets(server.port)

    async def main():
        with trio.fail_after(20):
            out = [await client.get_range("k", 0, len(BIG), etag=ETAG),
                   await client.get_range("k", 5, len(BIG) - 5, etag=ETAG),
                   await client.get_range("k", 0, 3, etag=ETAG)]
        kept = [sock.getblocking() for sock in client._idle]
        client.close()
        return out, kept
    out, kept = trio.run(main)
    assert out == [BIG, BIG[5:], b"abc"]
    assert server.connections == 1
    assert kept == [False]  # non-blocking again, as the loop needs it


def cancel_mid_body(server: ScriptedServer, client: SocketGets) -> bytes:
    """A large read cancelled half-way, then a small one: its data."""
    async def main():
        # The worker thread's receive would wait 60 s: only letting it go ends it sooner.
        with trio.fail_after(10):
            with trio.move_on_after(0.5):
                await client.get_range("k", 0, len(BIG), etag=ETAG)
                raise AssertionError("half a body was taken for a whole one")
            data = await client.get_range("k", 0, 3, etag=ETAG)
            while not server.released:
                await trio.sleep(0.01)
        client.close()
        return data
    return trio.run(main)


def test_a_large_read_cancelled_mid_body_lets_its_connection_go_at_once(server_with):
    half = partial(BIG, 0, total=len(BIG))[:-len(BIG) // 2]
    server = server_with(("stall", half), partial(b"abc", 0, total=len(BIG)))
    assert cancel_mid_body(server, gets(server.port, request_timeout=60.0)) == b"abc"
    assert server.connections == 2


@pytest.mark.parametrize("body", [b"0123456789", BIG], ids=["small", "large"])
def test_an_answer_cut_short_is_never_taken_for_the_body(server_with, body):
    # Bodies are received into buffers not zeroed first: only a whole one may be returned.
    cut = ("close", partial(body, 0, total=len(body))[:-3])
    server = server_with(cut, cut, partial(body, 0, total=len(body)), cut, cut)
    assert run(gets(server.port), (0, len(body))) == [body]
    [failed] = run(gets(server.port, max_attempts=2), (0, len(body)))
    assert isinstance(failed, api.Unreachable) and "closed before the whole answer" in str(failed)
    assert len(server.requests) == 5  # two cut short, one whole; then two more cut short


def test_a_large_body_that_stops_coming_is_an_error_within_the_request_timeout(server_with):
    half = partial(BIG, 0, total=len(BIG))[:-len(BIG) // 2]
    server = server_with(("stall", half), ("stall", half), ("stall", half))
    [failed] = run(gets(server.port, request_timeout=1.0), (0, len(BIG)))
    assert isinstance(failed, api.Unreachable)


def test_a_body_receiver_stops_on_its_own_receive_timeout_and_hands_the_socket_back():
    """The worker thread's own bound, behind the request's deadline (which cancels first
    in a read): a body that stops coming is a TimeoutError, the bytes that came are kept,
    and the socket is non-blocking again for the loop."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    view = memoryview(bytearray(64 * 1024))
    receiving = _Receiving(ours, view, timeout=0.2)
    outcome = []

    def receive():
        try:
            receiving.run()
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(exc)

    try:
        theirs.sendall(b"x" * 1000)  # then nothing, and the connection stays open
        worker = threading.Thread(target=receive, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the receive timeout did not end the receive"
        [failed] = outcome
        assert isinstance(failed, TimeoutError) and "no bytes for 0.2 s" in str(failed)
        assert bytes(view[:1000]) == b"x" * 1000
        assert not ours.getblocking()
    finally:
        theirs.close()
        ours.close()


def test_no_server_is_an_error_naming_the_address_and_not_the_secret():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    [failed] = run(gets(port, max_attempts=2), (0, 4))
    assert isinstance(failed, api.Unreachable)
    assert f"127.0.0.1:{port}" in str(failed) and SECRET not in str(failed)


def test_a_connection_never_accepted_is_an_error_after_the_connect_timeout():
    # A listener whose one-place accept queue is taken drops further SYNs, as a firewalled
    # address does: connect() neither succeeds nor fails.
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued.connect(("127.0.0.1", port))
        [failed] = run(gets(port, connect_timeout=0.3, request_timeout=10.0, max_attempts=2), (0, 4))
    assert isinstance(failed, api.Unreachable)
    assert f"no connection to 127.0.0.1:{port} within 0.3 s" in str(failed)


def test_credentials_due_for_a_refresh_are_refreshed_outside_the_loop(server_with):
    # A refresh may ask STS or read a file: the loop that serves every FUSE request must not wait on it.
    class Refreshing:
        threads: list[threading.Thread] = []

        def refresh_needed(self) -> bool:
            return True

        def get_frozen_credentials(self):
            self.threads.append(threading.current_thread())
            return botocore.credentials.ReadOnlyCredentials("AKIDNEW", SECRET, "the-session-token")

    server = server_with(partial(b"abc", 0))
    assert run(gets_with(server.port, Refreshing()), (0, 3)) == [b"abc"]
    assert Refreshing.threads and threading.main_thread() not in Refreshing.threads
    request = server.requests[0].decode()
    assert "Credential=AKIDNEW/" in request and "x-amz-security-token: the-session-token" in request


def test_credentials_that_cannot_be_refreshed_are_an_error_of_the_read_and_nothing_is_sent(server_with):
    # Expired, and STS (or the credentials file) failing: botocore raises its own error,
    # which must end this read with an ObjectClientError, not escape into the mount's loop.
    def refresh():
        raise botocore.exceptions.CredentialRetrievalError(provider="sts", error_msg="STS is down")

    expired = botocore.credentials.RefreshableCredentials.create_from_metadata(
        {"access_key": "AKIDOLD", "secret_key": SECRET, "token": "t", "expiry_time": "2020-01-01T00:00:00Z"},
        refresh_using=refresh, method="sts-assume-role")

    server = server_with(partial(b"abc", 0))
    [failed] = run(gets_with(server.port, expired, max_attempts=2), (0, 3))
    assert isinstance(failed, api.Unreachable)
    assert "credentials could not be refreshed (CredentialRetrievalError)" in str(failed)
    assert SECRET not in str(failed) and server.requests == []


def test_after_one_kept_connection_proves_closed_the_others_are_not_tried(server_with):
    # Three kept connections the server then drops as requests arrive (a restarted server):
    # one is tried, then a new connection; an attempt never walks the whole pool.
    server = server_with(*[partial(b"abc", 0)] * 3)
    client = gets(server.port, max_attempts=1)

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(functools.partial(client.get_range, "k", 0, 3, etag=ETAG))
        with pytest.raises(api.Unreachable):
            await client.get_range("k", 0, 3, etag=ETAG)
        client.close()
    trio.run(main)
    assert server.connections == 4
    assert len(server.requests) == 3 + 2


def test_an_answer_without_a_length_ends_with_its_connection(server_with):
    server = server_with(("close", b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 4-7/8\r\n\r\n4567"),
                         partial(b"0123", 0))
    assert run(gets(server.port), (4, 4), (0, 4)) == [b"4567", b"0123"]
    assert server.connections == 2  # the first could not be kept: its end was its body's


def test_no_credentials_is_an_error_and_sends_nothing(server_with):
    server = server_with(partial(b"abc", 0))
    [failed] = run(gets_with(server.port, None, max_attempts=2), (0, 3))
    assert isinstance(failed, api.Unreachable) and "no AWS credentials found" in str(failed)
    assert server.requests == []


# Over TLS: the scripted server behind a TLS front whose certificate a private authority signed.

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return certificates(tmp_path_factory.mktemp("certs"))


def test_ranges_over_tls_come_on_one_kept_connection(server_with, certs):
    server = server_with(partial(b"abc", 0), partial(b"def", 3))
    with TlsFront(f"http://127.0.0.1:{server.port}", certs) as front:
        client = gets(front.port, scheme="https", ca_bundle=str(certs.ca))
        assert run(client, (0, 3), (3, 3)) == [b"abc", b"def"]
    assert front.handshakes == 1
    assert b"host: 127.0.0.1:%d" % front.port in server.requests[0]


def test_large_bodies_over_tls_come_whole_on_one_kept_connection(server_with, certs):
    server = server_with(partial(BIG, 0, total=len(BIG)), partial(b"abc", 0, total=len(BIG)))
    with TlsFront(f"http://127.0.0.1:{server.port}", certs) as front:
        client = gets(front.port, scheme="https", ca_bundle=str(certs.ca))
        assert run(client, (0, len(BIG)), (0, 3)) == [BIG, b"abc"]
    assert front.handshakes == 1


def test_a_large_read_over_tls_cancelled_mid_body_lets_its_connection_go_at_once(server_with, certs):
    half = partial(BIG, 0, total=len(BIG))[:-len(BIG) // 2]
    server = server_with(("stall", half), partial(b"abc", 0, total=len(BIG)))
    with TlsFront(f"http://127.0.0.1:{server.port}", certs) as front:
        client = gets(front.port, scheme="https", ca_bundle=str(certs.ca), request_timeout=60.0)
        assert cancel_mid_body(server, client) == b"abc"
    assert front.handshakes == 2


def test_a_tls_connection_the_server_closed_is_replaced(server_with, certs):
    server = server_with(("close", partial(b"abc", 0)), partial(b"def", 3))
    with TlsFront(f"http://127.0.0.1:{server.port}", certs) as front:
        client = gets(front.port, scheme="https", ca_bundle=str(certs.ca))
        assert run(client, (0, 3), (3, 3)) == [b"abc", b"def"]
    assert front.handshakes == 2


def test_a_certificate_no_trusted_authority_signed_is_an_error_and_nothing_is_sent(server_with, certs):
    server = server_with(partial(b"abc", 0))
    with TlsFront(f"http://127.0.0.1:{server.port}", certs) as front:
        [failed] = run(gets(front.port, scheme="https", max_attempts=1), (0, 3))
    assert isinstance(failed, api.Unreachable)
    assert "certificate verify failed" in str(failed)
    assert server.requests == []
