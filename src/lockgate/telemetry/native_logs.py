"""Lines that native code (grpc's C core, ONNX Runtime) writes straight to file descriptor 2,
turned into log records, so that ``serve --json`` writes only JSON lines.

grpc's core logs through absl to fd 2 in glog's format (``E1203 13:16:57.600281 16469
file.cc:186] message``), past Python's logging: during a drain it logs "Closing acceptor" for
each listening socket shut (``transport.ports.stop_listening``), which a log shipper reading
JSON lines would choke on. ``capture_native_stderr`` points fd 2 at a pipe; a thread reads it
and hands every line to the ``native`` logger (glog's level letter becomes the record's level),
while Python's own handler writes to the original stderr. A line that already is a JSON object
(a worker process's log, which inherits fd 2) is passed through unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from typing import IO

_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([^\]]+)\] ?(.*)$")
_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}

log = logging.getLogger("native")


def record_of(line: str) -> tuple[int, str]:
    """(level, message) of one native line; glog's source location is kept in the message."""
    found = _GLOG.match(line)
    if found is None:
        return logging.WARNING, line
    letter, source, message = found.groups()
    return _LEVELS[letter], f"{message} ({source.strip()})"


class NativeStderr:
    """fd 2 redirected into a pipe read by a thread (see the module docstring)."""

    def __init__(self) -> None:
        self.original_fd = os.dup(2)
        self.stream: IO[str] = os.fdopen(os.dup(self.original_fd), "w", buffering=1, encoding="utf-8",
                                         errors="replace")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if pending:
            self._emit(pending.decode("utf-8", errors="replace"))
        os.close(self._read_fd)

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        if line.lstrip().startswith("{"):  # already a JSON log line (a worker's)
            self.stream.write(line + "\n")
            return
        level, message = record_of(line)
        log.log(level, "%s", message)

    def close(self, timeout: float = 2.0) -> None:
        """Give fd 2 back and log what is left in the pipe (at exit)."""
        if self.original_fd < 0:
            return
        os.dup2(self.original_fd, 2)  # closes this process's write end of the pipe
        os.close(self.original_fd)
        self.original_fd = -1
        self._thread.join(timeout)


_captured: NativeStderr | None = None


def capture_native_stderr() -> NativeStderr:
    """Redirect fd 2 once per process; returns the capture (its ``stream`` is the real stderr)."""
    global _captured
    if _captured is None:
        _captured = NativeStderr()
    return _captured
