"""Small servers' accept loops, for the test servers that speak raw sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator


def accepted(listener: socket.socket, stop: threading.Event) -> Iterator[socket.socket]:
    """Connections accepted on ``listener`` until ``stop`` is set; ``listener`` needs a
    short timeout, which bounds how long stopping takes."""
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        yield conn
