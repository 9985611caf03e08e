"""``serve --json``: lines native code writes to fd 2 (grpc's core, in glog's format) become
JSON records of the ``native`` logger; JSON lines (a worker's) pass through unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import logging, os
from lockgate.transport.server import configure_logging
configure_logging("info", "json")
logging.getLogger("lockgate.test").info("from python")
os.write(2, b"E1203 13:16:57.600281   16469 posix_engine_listener.cc:186] Closing acceptor. Failed accept4: Invalid argument\n")
os.write(2, b'{"time": "t", "level": "INFO", "logger": "worker", "pid": 1, "message": "a worker line"}\n')
os.write(2, b"plain native text\n")
"""


def test_native_stderr_lines_become_json_records() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    by_message = {r["message"]: r for r in records}
    assert by_message["from python"]["logger"] == "lockgate.test"
    grpc = by_message["Closing acceptor. Failed accept4: Invalid argument (posix_engine_listener.cc:186)"]
    assert grpc["logger"] == "native" and grpc["level"] == "ERROR"
    assert by_message["a worker line"]["logger"] == "worker"
    assert by_message["plain native text"]["level"] == "WARNING"
