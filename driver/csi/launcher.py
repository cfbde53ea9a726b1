"""Mount processes forked from a process that has already imported what a mount runs.

A mount process started afresh spends most of its start importing botocore, awscrt, trio
and pyfuse3 (about 0.6 of a NodePublishVolume's 0.85 s here). The node server therefore
starts one launcher, ``python -m driver.csi.launcher``, which imports them once and then
forks a mount process for each request on a socket pair: the command line the node server
would have run, its environment, and the pipe it answers on (passed as fd 3).

A forked mount process must look like one started afresh: the node server finds its
mounts again by their command lines (``mounts._process_serves``), and people read ``ps``
and ``/proc/PID/environ``. So it writes its command line and environment over the
launcher's, in the memory the kernel reads them from (`ProcessText`), which the launcher
was started with room for. A mount whose command line or environment would not fit, and
every mount while no launcher answers, is started afresh as before.

The launcher starts no thread, so a fork of it is safe. It exits when the node server
closes its end of the socket, and never logs: what goes wrong is the node server's to say.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence

import structlog

log = structlog.get_logger("pail.csi.launcher")

READY_FD = 3  # where a forked mount process finds the pipe it answers on
ROOM = 8192  # bytes of command line, and of environment beyond the launcher's own, a mount may have
HELLO_TIMEOUT = 30.0  # seconds the launcher may take to import
REPLY_TIMEOUT = 10.0  # seconds to fork
RETRY_AFTER = 60.0  # seconds before starting another launcher after one that never answered
_MESSAGE_MAX = 1 << 20
_ROOM_VARIABLE = "PAIL_LAUNCHER_ROOM"
_MODULE = "driver.csi.launcher"


class LauncherLost(Exception):
    """A request went to the launcher and no answer came: a mount process may have been
    forked or not, so starting one afresh could make two."""


class Launcher:
    """The node server's end: starts the launcher, and asks it for mount processes.
    Thread-safe: publishes of different targets launch at once."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._room: tuple[int, int] | None = None  # bytes of command line and environment, once imported
        self._failed_at = float("-inf")

    def start(self) -> None:
        """Start the launcher without waiting for it to import."""
        with self._lock:
            self._start()

    def launch(self, command: Sequence[str], env: Mapping[str, str], ready: int) -> int | None:
        """The pid of a mount process forked to run ``command`` (``python -m driver ...``,
        with ``--ready-fd 3``) in ``env``, answering on ``ready``; None when the launcher
        cannot (the caller starts the process afresh); LauncherLost when it was asked and
        did not answer."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                if self._process is not None:
                    self._fail("the launcher exited", status=self._process.returncode)
                self._start()  # for the next publish: this one does not wait for its imports
                return None
            try:
                arg_room, env_room = self._hello()
                if len(_strings(command)) > arg_room or len(_strings(_environ(env))) > env_room:
                    log.info("mount process started afresh: its command line or environment is too long "
                             "for the launcher", command_bytes=len(_strings(command)))
                    return None
            except (OSError, ValueError, KeyError, TypeError) as exc:  # TimeoutError is an OSError
                self._fail(str(exc))
                return None
            request = json.dumps({"argv": list(command), "env": dict(env)}).encode()
            try:
                socket.send_fds(self._socket, [request], [ready])
            except OSError as exc:
                self._fail(str(exc))
                return None
            try:
                reply = self._receive(REPLY_TIMEOUT)
                if "pid" in reply:
                    return int(reply["pid"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._fail(str(exc))
                raise LauncherLost(str(exc)) from None
            # It did not fork (fork failed, say for memory) and still serves.
            log.warning("mount launcher could not fork; starting the mount afresh", reason=reply.get("error"))
            return None

    def close(self) -> None:
        """Stop the launcher; the mount processes it forked go on."""
        with self._lock:
            self._stop()

    # -- under the lock ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._process is not None or time.monotonic() - self._failed_at < RETRY_AFTER:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**self._env, _ROOM_VARIABLE: "x" * ROOM}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", _MODULE, str(theirs.fileno()), "x" * ROOM], env=env,
                stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()], start_new_session=True, close_fds=True)
        except OSError as exc:
            ours.close()
            self._fail(f"cannot start the launcher: {exc}")
            return
        finally:
            theirs.close()
        self._socket = ours
        self._room = None

    def _hello(self) -> tuple[int, int]:
        if self._room is None:
            hello = self._receive(HELLO_TIMEOUT)
            self._room = int(hello["arg_room"]), int(hello["env_room"])
            log.info("mount launcher ready", pid=self._process.pid if self._process else None)
        return self._room

    def _receive(self, timeout: float) -> dict:
        assert self._socket is not None
        if not select.select([self._socket], [], [], timeout)[0]:
            raise TimeoutError(f"the launcher did not answer within {timeout:.0f} s")
        message = self._socket.recv(_MESSAGE_MAX)
        if not message:
            raise ValueError("the launcher exited")
        return json.loads(message)

    def _fail(self, reason: str, **details) -> None:
        log.warning("mount launcher failed; mount processes start afresh", reason=reason, **details)
        if self._room is None:  # it never answered: another started at once would likely fail too
            self._failed_at = time.monotonic()
        self._stop()

    def _stop(self) -> None:
        if self._socket is not None:
            self._socket.close()  # the launcher exits when it reads the end
            self._socket = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None


class ProcessText:
    """Where the kernel keeps a process's command line and environment: strings at the top
    of its stack, put there by exec and read again for ``/proc/PID/cmdline`` and
    ``/proc/PID/environ`` (``ps`` reads them there). Writing over them changes what they
    show; nothing in the process reads them after its start (Python keeps copies, and the
    C library's environment is made anew by ``_become``)."""

    def __init__(self, arg_start: int, arg_end: int, env_start: int, env_end: int) -> None:
        self.arg_start, self.arg_end, self.env_start, self.env_end = arg_start, arg_end, env_start, env_end

    @classmethod
    def of_this_process(cls) -> ProcessText:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        # Fields 48-51 of proc(5); the list starts at field 3, the one after the name.
        return cls(*(int(value) for value in fields[45:49]))

    def write_argv(self, argv: Sequence[str]) -> None:
        _fill(self.arg_start, self.arg_end, _strings(argv))

    def write_environ(self, environ: Sequence[str]) -> None:
        """Only once the C library's environment no longer points at these strings."""
        _fill(self.env_start, self.env_end, _strings(environ))


def _strings(items: Sequence[str]) -> bytes:
    return b"".join(os.fsencode(item) + b"\0" for item in items)


def _environ(env: Mapping[str, str]) -> list[str]:
    return [f"{name}={value}" for name, value in env.items()]


def _fill(start: int, end: int, data: bytes) -> None:
    if len(data) > end - start:
        raise ValueError("no room")
    ctypes.memmove(start, data, len(data))
    ctypes.memset(start + len(data), 0, end - start - len(data))


# -- the launcher process ------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    text = ProcessText.of_this_process()
    if text.arg_start == 0:  # /proc hides the addresses here: children could not look like mounts
        return 1
    # Its own environment stays as it is: the C library reads it from those strings.
    text.write_argv([sys.executable, "-m", _MODULE])
    os.environ.pop(_ROOM_VARIABLE, None)
    # Children are reaped by the kernel: the node server watches them through /proc.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    import encodings.idna  # noqa: F401  (a mount's first HTTP connection imports it)

    import driver.cli
    import driver.mount  # noqa: F401
    from driver import credentials

    credentials.load_models()
    control.send(json.dumps({"arg_room": text.arg_end - text.arg_start,
                             "env_room": text.env_end - text.env_start}).encode())
    command = _serve(control, text)
    if command is None:
        return 0
    return driver.cli.main(command[3:])


def _serve(control: socket.socket, text: ProcessText) -> list[str] | None:
    """Fork a mount process per request until the node server goes. Returns only in a
    forked child, with the command line it runs (or None in the launcher, at the end)."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, _MESSAGE_MAX, 1)
        except OSError:
            return None
        if not message:
            return None
        try:
            request = json.loads(message)
            argv, env = list(request["argv"]), dict(request["env"])
            if argv[:3] != [sys.executable, "-m", "driver"] or len(fds) != 1:
                raise ValueError("not a mount process's command line")
            pid = os.fork()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            if not _answer(control, {"error": str(exc)}):
                return None
            continue
        if pid == 0:
            try:
                control.close()
                _become(argv, env, fds[0], text)
                return argv
            except BaseException:
                traceback.print_exc()
                os._exit(1)  # never back into the launcher's loop
        os.close(fds[0])
        if not _answer(control, {"pid": pid}):
            return None


def _answer(control: socket.socket, reply: dict) -> bool:
    """False when the node server is gone."""
    try:
        control.send(json.dumps(reply).encode())
    except OSError:
        return False
    return True


def _become(argv: list[str], env: dict[str, str], ready: int, text: ProcessText) -> None:
    """Make this fresh fork what ``subprocess.Popen(argv, env=env, start_new_session=True,
    stdin=DEVNULL, pass_fds=[3])`` would have started."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if ready != READY_FD:
        os.dup2(ready, READY_FD)
        os.close(ready)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # No closerange as Popen does before exec: the launcher holds no descriptor besides
    # these and its socket (closed by now), and one a native library held would be pulled
    # from under it here, where no exec starts the process over.
    os.environ.clear()  # through unsetenv: the C library lets go of the strings overwritten next
    os.environ.update(env)
    text.write_argv(argv)
    text.write_environ(_environ(env))
    sys.argv = [argv[0], *argv[3:]]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
