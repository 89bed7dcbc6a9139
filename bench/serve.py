"""A server in a child process on 127.0.0.1, for the tests and the benchmarks: start it on a free port,
wait until it answers ready, keep draining its output, stop it.

    with serve([PUSHGATEWAY, "--web.listen-address={host}:{port}"], ready_path="/-/ready") as s:
        ...  # s.url, s.port, s.proc, s.output()
    with gate_proxy(["--model", "m.onnx", "--no-shield"]) as s:  # `python -m gate proxy ... --host --port`
        ...

The child's stdout and stderr (merged) are read by a background thread the whole time, so a chatty
child never blocks on a full pipe nor dies on a closed one; ``output()`` returns what it wrote (and
``log=`` keeps a copy on disk). A child that exits before it is ready, or is not ready in time, raises
:class:`ServerError` with the end of its output. Only loopback: the host is always 127.0.0.1, and the
readiness probe ignores any proxy settings in the environment.

Standard library only: the benchmarks and the tests both import it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
# never through an HTTP proxy from the environment: the probe goes to 127.0.0.1 directly
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The child server exited before it was ready, or was not ready in time."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class _Output:
    """Everything a child writes, kept in memory: all of it up to ``head`` + ``tail`` bytes, else the first
    ``head`` and the last ``tail`` bytes (and a note of how much was left out between)."""

    def __init__(self, head: int = 256 * 1024, tail: int = 4 * 1024 * 1024) -> None:
        self._head, self._tail = bytearray(), bytearray()
        self._head_max, self._tail_max = head, tail
        self._dropped = 0
        self._lock = threading.Lock()

    def add(self, chunk: bytes) -> None:
        with self._lock:
            room = self._head_max - len(self._head)
            if room > 0:
                self._head += chunk[:room]
                chunk = chunk[room:]
            self._tail += chunk
            if len(self._tail) > self._tail_max:
                cut = len(self._tail) - self._tail_max
                del self._tail[:cut]
                self._dropped += cut

    def text(self) -> str:
        with self._lock:
            gap = f"\n[... {self._dropped} bytes of output left out ...]\n".encode() if self._dropped else b""
            return bytes(self._head + gap + self._tail).decode(errors="replace")


class Server:
    """A started child server (see the module docstring). Use :func:`serve`, which always stops it."""

    def __init__(self, command: Sequence[str] | Callable[[int], Sequence[str]], *, port: int | None = None,
                 ready_path: str = "/v2/health/ready", timeout: float = 90.0, log: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 name: str | None = None) -> None:
        self.port = free_port() if port is None else port
        self.url = f"http://{HOST}:{self.port}"
        if callable(command):
            self.command = [str(a) for a in command(self.port)]
        else:
            self.command = [str(a).replace("{host}", HOST).replace("{port}", str(self.port)) for a in command]
        self.name = name or Path(self.command[0]).name
        self.log = Path(log) if log is not None else None
        self._out = _Output()
        self._log_file = open(self.log, "wb") if self.log is not None else None  # noqa: SIM115 -- closed in stop()
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=None if env is None else dict(env), cwd=cwd)
        except BaseException:
            if self._log_file is not None:
                self._log_file.close()
            raise
        self._reader = threading.Thread(target=self._drain, name=f"{self.name} output", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(ready_path, timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ output
    def _drain(self) -> None:
        pipe = self.proc.stdout
        assert pipe is not None
        with pipe:
            while chunk := pipe.read1(65536):
                self._out.add(chunk)
                if self._log_file is not None:
                    self._log_file.write(chunk)
                    self._log_file.flush()

    def output(self) -> str:
        """What the child has written to stdout and stderr so far."""
        return self._out.text()

    def _failure(self, what: str) -> ServerError:
        if self.proc.poll() is not None:
            self._reader.join(5)  # the child is gone: its last words are in the pipe
        text = self.output()
        where = f" (whole output in {self.log})" if self.log is not None else ""
        if not text.strip():
            return ServerError(f"{self.name} {what}{where}; it wrote nothing")
        tail = text[-6000:]
        return ServerError(f"{self.name} {what}{where}; its output{' ends' if len(tail) < len(text) else ''}:\n"
                           f"{tail}")

    # ------------------------------------------------------------------ readiness
    def ready(self, path: str = "/v2/health/ready", timeout: float = 1.0) -> bool:
        """Does ``GET path`` answer 200 now?"""
        try:
            with _OPENER.open(self.url + path, timeout=timeout) as r:
                return r.status == 200
        except (OSError, http.client.HTTPException, ValueError):  # refused, reset, 503 (HTTPError), timeout
            return False

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._failure(f"exited with code {self.proc.returncode} before it was ready")
            if self.ready(path):
                return
            if time.monotonic() > deadline:
                raise self._failure(f"did not answer 200 on {path} within {timeout:g}s")
            time.sleep(0.1)

    # ------------------------------------------------------------------ process statistics (Linux /proc)
    def rss_kib(self) -> int:
        """Resident memory of the child now, KiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)  # EOF once the child (and anything it left holding the pipe) is gone
        if self._log_file is not None and not self._reader.is_alive():
            self._log_file.close()


@contextlib.contextmanager
def serve(command: Sequence[str] | Callable[[int], Sequence[str]], **kw) -> Iterator[Server]:
    """Start ``command`` (a function of the port, or a list where "{host}" and "{port}" in the arguments
    become 127.0.0.1 and a free port), wait
    until ``GET ready_path`` answers 200, yield the :class:`Server`, and stop it on the way out."""
    server = Server(command, **kw)
    try:
        yield server
    finally:
        server.stop()


def gate_proxy_command(args: Sequence[str], port: int) -> list[str]:
    """``python -m gate proxy ARGS --host 127.0.0.1 --port PORT``."""
    return [sys.executable, "-m", "gate", "proxy", *map(str, args), "--host", HOST, "--port", str(port)]


@contextlib.contextmanager
def gate_proxy(args: Sequence[str], **kw) -> Iterator[Server]:
    """``gate proxy ARGS`` on 127.0.0.1 and a free port (run from the repository root), ready when
    ``/v2/health/ready`` answers 200."""
    kw.setdefault("cwd", ROOT)
    kw.setdefault("name", "gate proxy")
    with serve(lambda port: gate_proxy_command(args, port), **kw) as server:
        yield server
