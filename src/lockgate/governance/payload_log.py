"""Rotating JSON-lines payload log behind a bounded queue.

``submit`` never blocks: it redacts nothing and serialises nothing on the caller's thread,
it only ``put_nowait``s the record; when the queue is full the record is dropped and
``dropped`` counts it. A single writer thread redacts (names listed in ``redact`` match
input/output names, feature names and top-level record fields), serialises and writes,
rotating ``payloads.jsonl`` -> ``payloads.jsonl.1`` ... when a file would pass ``max_bytes``
and keeping at most ``max_files`` files in all.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lockgate.telemetry.logs import CauseLog

log = logging.getLogger("lockgate.governance.payload_log")

REDACTED = "[REDACTED]"
_STOP = object()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            # JSON has no NaN/Inf: write them as strings so the record stays valid JSON.
            return _jsonable(value.tolist())
        if value.dtype.kind in "SO":
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.ravel().tolist()]
        return value.tolist()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class Redactor:
    """Removes configured tensors, features and fields from a record before it is written."""

    def __init__(self, names: Iterable[str], feature_names: Mapping[str, list[str]] | None = None) -> None:
        self.names = frozenset(names)
        # tensor -> indices of its features to blank
        self.features: dict[str, list[int]] = {
            tensor: [j for j, n in enumerate(names_) if n in self.names] for tensor, names_ in (feature_names or {}).items()
        }

    def tensor(self, name: str, array: np.ndarray) -> Any:
        if name in self.names:
            return REDACTED
        columns = self.features.get(name)
        if columns and array.ndim >= 1 and array.shape[-1] > max(columns):
            out = np.asarray(array, dtype=object).copy()
            out[..., columns] = REDACTED
            return _jsonable(out.tolist())
        return _jsonable(np.asarray(array))

    def attributions(self, name: str, array: np.ndarray, features: list[str] | None = None) -> Any:
        """Attributions of input ``name`` (rows x features x outputs): redacted like that input,
        a redacted feature's column blanked on the feature axis. ``features`` names the columns
        when they are not the input's own (a configured subset)."""
        if name in self.names:
            return REDACTED
        columns = [j for j, n in enumerate(features) if n in self.names] if features else self.features.get(name)
        if columns and array.ndim == 3 and array.shape[1] > max(columns):
            out = np.asarray(array, dtype=object).copy()
            out[:, columns, :] = REDACTED
            return _jsonable(out.tolist())
        return _jsonable(np.asarray(array))

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in record.items():
            if key in self.names:
                out[key] = REDACTED
            elif key in ("inputs", "outputs") and isinstance(value, Mapping):
                out[key] = {name: self.tensor(name, np.asarray(array)) for name, array in value.items()}
            elif key == "attributions" and isinstance(value, Mapping):
                explanation = record.get("explanation")
                features = explanation.get("features") if isinstance(explanation, Mapping) else None
                out[key] = {name: self.attributions(name, np.asarray(array), features) for name, array in value.items()}
            else:
                out[key] = _jsonable(value)
        return out


class PayloadLog:
    """Non-blocking writer of payload records to rotating JSON-lines files."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_files: int = 10,
        queue_size: int = 1024,
        redactor: Redactor | None = None,
        filename: str = "payloads.jsonl",
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.redactor = redactor or Redactor(())
        self.path = self.directory / filename
        self.submitted = 0
        self.written = 0
        self.dropped = 0  # queue full
        self.failed = 0  # could not serialise or write
        # A full or read-only disk fails every record: counted, one warning per cause a while.
        self.events = CauseLog(log)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._counter_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"payload-log:{self.directory}", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> bool:
        """Queue a record without blocking; False (and ``dropped`` += 1) if it cannot be."""
        if self._closed:
            self._count_drop()
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count_drop()
            return False
        with self._counter_lock:
            self.submitted += 1
        return True

    def _count_drop(self) -> None:
        with self._counter_lock:  # exact even when several threads drop at once
            self.dropped += 1

    def stats(self) -> dict[str, int]:
        return {
            "submitted": self.submitted,
            "written": self.written,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": self._queue.qsize(),
        }

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (tests, shutdown)."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # ------------------------------------------------------------ writer thread
    def _run(self) -> None:
        handle = None
        size = 0
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                if isinstance(item, threading.Event):
                    if handle is not None:
                        handle.flush()
                    item.set()
                    continue
                try:
                    line = (json.dumps(self.redactor.record(item), separators=(",", ":")) + "\n").encode()
                except (TypeError, ValueError) as exc:
                    self.failed += 1
                    self.events.record("serialize_failed", "payload record could not be serialised: %s", exc)
                    continue
                try:
                    if handle is None:
                        self.directory.mkdir(parents=True, exist_ok=True)
                        handle = self.path.open("ab")
                        size = handle.tell()
                    if size and size + len(line) > self.max_bytes:
                        handle.close()
                        self._rotate()
                        handle = self.path.open("ab")
                        size = 0
                    handle.write(line)
                    size += len(line)
                    self.written += 1
                    if self._queue.empty():
                        handle.flush()
                except OSError as exc:
                    self.failed += 1
                    self.events.record("write_failed", "payload log write failed in %s: %s; records are dropped "
                                       "and counted (lockgate_payload_dropped_total{reason=\"write_failed\"})",
                                       self.directory, exc.strerror or exc)
                    if handle is not None:
                        try:
                            handle.close()
                        except OSError:
                            pass
                    handle = None
        finally:
            if handle is not None:
                handle.close()

    def _rotate(self) -> None:
        keep = self.max_files - 1  # rotated files besides the live one
        if keep <= 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self.path.with_name(f"{self.path.name}.{keep}")
        oldest.unlink(missing_ok=True)
        for i in range(keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
