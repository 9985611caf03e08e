"""Signed checkpoints of the audit chain's head, kept where the database writer cannot reach.

A keyed chain stops a database writer from rewriting or forging entries, but not from
deleting the newest ones, or all of them: what is left is still a valid, shorter chain.
So the head (seq and hash) is checkpointed, MAC'd with the audit key, to three places
the database does not control:

* an append-only JSON-lines file (``audit_checkpoint_file``, outside ``state_dir``;
  ``chattr +a`` it where the file system allows);
* a log line (``lockgate.audit``: ``audit checkpoint {...}``) for the log pipeline;
* the ``lockgate_audit_head`` gauge, which Prometheus keeps as history.

``audit verify`` reads the file by default and checks every checkpoint against the chain:
an entry at a checkpointed seq must carry the checkpointed hash (rewritten otherwise), and
the chain must reach the newest checkpoint (truncated otherwise). A checkpoint is written
every ``every`` entries this process appends, every ``interval_s`` seconds while the head
moved (entries from other workers or replicas included), at start and at shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lockgate.control.audit_key import AuditKey, AuditKeyring
from lockgate.control.store import AuditRow, utc_now_iso

log = logging.getLogger("lockgate.audit")

FORMAT = "lockgate.audit.checkpoint/v1"
GENESIS_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The chain head at one moment, MAC'd: ``mac`` covers every other field."""

    seq: int
    hash: str
    time: str
    key_id: str
    mac: str = ""

    def payload(self) -> bytes:
        return json.dumps([FORMAT, self.seq, self.hash, self.time, self.key_id], separators=(",", ":")).encode()

    @classmethod
    def sign(cls, key: AuditKey, seq: int, head_hash: str, time: str | None = None) -> Checkpoint:
        unsigned = cls(int(seq), head_hash, time or utc_now_iso(), key.key_id)
        return cls(unsigned.seq, unsigned.hash, unsigned.time, unsigned.key_id, key.mac(unsigned.payload()))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True, separators=(",", ":"))


@dataclass(slots=True)
class CheckpointRead:
    """What a checkpoint file holds: the checkpoints that authenticate, and every problem."""

    path: Path
    exists: bool
    checkpoints: list[Checkpoint] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def newest(self) -> Checkpoint | None:
        return max(self.checkpoints, key=lambda c: c.seq, default=None)


class CheckpointLog:
    """The append-only checkpoint file (one JSON object per line, fsync'd per line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, checkpoint: Checkpoint) -> None:
        """One line with ``O_APPEND`` (workers sharing the file never interleave a line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (checkpoint.to_json() + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, keyring: AuditKeyring) -> CheckpointRead:
        """Every line, MAC-checked: a line that does not authenticate is a problem, never skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return CheckpointRead(self.path, exists=False)
        result = CheckpointRead(self.path, exists=True)
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
                checkpoint = Checkpoint(int(doc["seq"]), str(doc["hash"]), str(doc["time"]), str(doc["key_id"]),
                                        str(doc["mac"]))
            except (ValueError, KeyError, TypeError):
                result.problems.append(f"checkpoint file {self.path} line {number} is not a checkpoint (corrupted)")
                continue
            key = keyring.get(checkpoint.key_id)
            if key is None:
                result.problems.append(
                    f"checkpoint file {self.path} line {number} was signed with key {checkpoint.key_id}, "
                    "which is not configured")
            elif not key.check(checkpoint.payload(), checkpoint.mac):
                result.problems.append(
                    f"checkpoint file {self.path} line {number} (seq {checkpoint.seq}) has an invalid MAC (forged or modified)")
            else:
                result.checkpoints.append(checkpoint)
        return result


HeadReader = Callable[[], AuditRow | None]


class Checkpointer:
    """Writes a signed checkpoint every ``every`` appended entries and every ``interval_s``.

    ``appended`` is called by the audit trail after each commit; the background thread
    reads the store's head (``head``), so entries appended by other processes are
    checkpointed too. A checkpoint that cannot be written is logged and counted
    (``failures``): the entries it would cover are already committed.
    """

    def __init__(
        self,
        log_file: CheckpointLog,
        key: AuditKey,
        head: HeadReader,
        *,
        every: int = 100,
        interval_s: float = 10.0,
    ) -> None:
        self.file = log_file
        self.key = key
        self._head = head
        self.every = max(1, int(every))
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()
        self._since = 0
        self.last: Checkpoint | None = None
        self.written = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def appended(self, row: AuditRow) -> None:
        if row.seq <= 0:  # spooled, not in the chain yet: the replay's entry is checkpointed
            return
        with self._lock:
            self._since += 1
            due = self._since >= self.every
        if due:
            self.write(row.seq, row.hash)

    def write(self, seq: int, head_hash: str) -> Checkpoint | None:
        """Sign and record (seq, hash) now: file, log line, metric."""
        with self._lock:
            if self.last is not None and seq <= self.last.seq:
                self._since = 0
                return self.last
            checkpoint = Checkpoint.sign(self.key, seq, head_hash)
            try:
                self.file.append(checkpoint)
            except OSError as exc:
                self.failures += 1
                log.error("audit checkpoint at seq %d could not be written to %s: %s", seq, self.file.path, exc)
                return None
            self.last = checkpoint
            self.written += 1
            self._since = 0
        log.info("audit checkpoint %s", checkpoint.to_json())
        return checkpoint

    def write_head(self) -> Checkpoint | None:
        """Checkpoint the store's current head (seq 0 for an empty chain)."""
        head = self._head()
        return self.write(head.seq if head is not None else 0, head.hash if head is not None else GENESIS_HASH)

    # -- background ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lockgate-audit-checkpoint", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                head = self._head()
            except Exception as exc:  # store down: the next tick tries again
                log.debug("audit checkpoint skipped: %s", exc)
                continue
            if head is not None and (self.last is None or head.seq > self.last.seq):
                self.write(head.seq, head.hash)

    def close(self) -> None:
        """Stop the thread and write a last checkpoint of the head (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            self.write_head()
        except Exception as exc:
            log.warning("final audit checkpoint not written: %s", exc)
