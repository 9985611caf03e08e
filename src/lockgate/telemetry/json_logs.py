"""``--json`` logs: every line the process writes to stderr is one JSON object.

Python's records get ``JsonLogFormatter``. Native code writes to file descriptor 2 directly:
grpc's C core (e.g. the one "Closing acceptor" line when the drain shuts the listening socket),
ONNX Runtime, a crashing extension. A log shipper that expects JSON would choke on those, and
dropping them would hide real errors, so ``wrap_native_stderr`` points fd 2 at a pipe and a
thread re-emits each line: JSON lines as they are (a worker's own), others as a record of
logger ``native`` (grpc's ``E1203 13:11:22.9 7044 file.cc:186] text`` keeps its level and
source).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import threading
import time
from typing import IO

_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+\s+(\S+:\d+)\]\s?(.*)$")
_ABSL_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) + f".{int(seconds % 1 * 1000):03d}"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def native_line_as_json(line: str, pid: int) -> str:
    """A line that native code wrote, as one JSON log line (a JSON object line is kept)."""
    stripped = line.rstrip("\r\n")
    if stripped.startswith("{") and stripped.endswith("}"):
        return stripped
    entry = {"time": _timestamp(time.time()), "level": "ERROR", "logger": "native", "pid": pid, "message": stripped}
    match = _ABSL_LINE.match(stripped)
    if match:
        entry.update(level=_ABSL_LEVELS[match.group(1)], source=match.group(2), message=match.group(3))
    return json.dumps(entry, ensure_ascii=False)


def wrap_native_stderr() -> IO[str]:
    """Send fd 2 through a re-emitting thread; returns a text stream on the real stderr for
    Python's log handler (its lines need no re-emitting). Restored at exit, after the thread
    has written what was left in the pipe."""
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
    pid = os.getpid()

    def pump() -> None:  # one write per line, so lines of the two writers never interleave
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                if line.strip():
                    os.write(real, (native_line_as_json(line, pid) + "\n").encode("utf-8"))

    thread = threading.Thread(target=pump, name="native-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        os.dup2(real, 2)  # closes the pipe's last write end: the thread sees the end and finishes
        thread.join(timeout=2.0)

    atexit.register(restore)
    return out
