"""A relay that makes the local S3 server look distant (``--latency-ms`` and
``--connection-mbs`` of bench.seq_read and bench.compare).

A local server answers a GET within a millisecond and sends it as fast as the CPU copies;
S3 seen from a node answers after tens of milliseconds and sends each connection's
response at around 100 MB/s, so a client's speed there depends on how many requests it
keeps in flight. The relay listens on 127.0.0.1, forwards each client connection to the
server on a connection of its own, holds the first bytes of every response until
``latency`` after the request's first bytes, and paces each connection's responses to
``rate`` bytes per second. Requests, upload bodies included, pass at once. It does not
parse HTTP: a request is whatever the client sends after the previous response started,
which holds for clients that wait for a response before the next request (all measured
here). Its threads cost CPU of their own, in the benchmark's process, alike for every
client measured through it.
"""

from __future__ import annotations

import socket
import threading
import time

from bench.system import MB

_BUFFER = 1 << 20


class DistantRelay:
    def __init__(self, upstream: str, *, latency: float, rate: float | None) -> None:
        host, _, port = upstream.split("://", 1)[-1].rpartition(":")
        self._upstream = (host, int(port))
        self._latency = latency
        self._rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def __enter__(self) -> "DistantRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)
            self._sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self._upstream, timeout=30)
            except OSError:
                _close(client)  # the client sees its connection closed, as from a dead server
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, server))
            asked: list[float] = []  # when the request being answered began
            threading.Thread(target=self._requests, args=(client, server, asked), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, asked), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, asked: list[float]) -> None:
        try:
            while data := client.recv(1 << 16):
                if not asked:
                    asked.append(time.monotonic())
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(server)

    def _responses(self, server: socket.socket, client: socket.socket, asked: list[float]) -> None:
        buffer = bytearray(_BUFFER)
        view = memoryview(buffer)
        started, sent = time.monotonic(), 0
        try:
            while n := server.recv_into(buffer):
                if asked:  # the first bytes of a response
                    _sleep_until(asked.pop() + self._latency)
                    started, sent = time.monotonic(), 0
                sent += n
                if self._rate:
                    _sleep_until(started + sent / self._rate)
                client.sendall(view[:n])
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)
            with self._lock:
                self._sockets.difference_update((client, server))


class Via:
    """The server as the clients see it: everything of ``server``, at the relay's endpoint."""

    def __init__(self, server, endpoint: str) -> None:
        self._server = server
        self.endpoint = endpoint

    def __getattr__(self, name: str):
        return getattr(self._server, name)

    def client(self, **config):
        return self._server.client(endpoint_url=self.endpoint, **config)


def add_arguments(parser) -> None:
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="read through a relay that starts each response this late (default 0: no relay)")
    parser.add_argument("--connection-mbs", type=float, default=0.0,
                        help="with the relay: MB/s of each connection (default 0: unlimited)")


def settings(parser, args) -> dict | None:
    """The relay's settings from the parsed options, or None without a relay."""
    if args.latency_ms < 0 or args.connection_mbs < 0:
        parser.error("--latency-ms and --connection-mbs must not be negative")
    if args.latency_ms == 0 and args.connection_mbs == 0:
        return None
    return {"latency_ms": args.latency_ms, "connection_mbs": args.connection_mbs}


def start(server, distant: dict) -> tuple[DistantRelay, Via]:
    relay = DistantRelay(server.endpoint, latency=distant["latency_ms"] / 1000,
                         rate=distant["connection_mbs"] * MB or None)
    return relay, Via(server, relay.endpoint)


def describe(distant: dict) -> str:
    rate = f"{distant['connection_mbs']:g}" if distant["connection_mbs"] else "unlimited"
    return f"through a relay: {distant['latency_ms']:g} ms to each response, {rate} MB/s per connection"


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
