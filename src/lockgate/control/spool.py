"""Keep audit entries and window snapshots through a store outage, then replay them.

``ResilientStore(inner, spool_dir)`` wraps any ``Store``:

* **Reads** go to the inner store; when it is down they raise ``StoreError`` (callers
  keep serving on their last snapshot) and mark the store degraded.
* **Audit appends and snapshot puts** that fail with ``StoreError`` are written to a
  local append-only JSON-lines spool (fsync per entry; payload bytes base64) and the
  call succeeds. Once anything is spooled, later appends/puts go to the spool too until
  it is drained, so the replay order is the order in which they were made.
* **Replay** runs on a background thread with exponential backoff. Audit entries are
  re-chained at replay time through ``inner.append_audit(build)`` (new seq, prev_hash,
  time, MAC under the audit key), so the chain verifies; the time the entry was really
  made is kept in ``details["spooled_at"]``. Progress is committed to an offset file
  after each entry, so a crash mid-replay resumes where it stopped (at-least-once for
  that one entry).
* **Spooled lines are MAC'd** with the audit key when written: the spool lives in the
  state directory, and a line someone added there must not become a signed entry at
  replay. A line whose MAC fails is not replayed; it is counted (``rejected_lines``),
  logged, and recorded as an ``audit.spool_rejected`` entry.
* Governance changes (``apply``: registry, records, policies with their audit entries)
  are compare-and-set units that must be durable before they take effect, so they are
  never spooled: while the store is down they raise ``StoreError`` (UNAVAILABLE) and the
  change does not happen. Only what already happened and must not be lost (model
  load/unload events, drift alerts, window snapshots) is spooled.

``degraded`` is True while the inner store is unreachable or the spool is not empty.
A spool left by a previous process is replayed when the wrapper starts.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate.control.audit import Action, canonical_json, signed_builder
from lockgate.control.audit_key import AuditKeyring
from lockgate.errors import StoreError
from lockgate.control.store import (
    Applied,
    AuditBuilder,
    AuditDraft,
    AuditRow,
    Change,
    PolicyRecord,
    RecordKind,
    Store,
    StoredRecord,
    VersionRecord,
    WindowSnapshot,
    Write,
    utc_now_iso,
)

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.jsonl"
OFFSET_FILE = "spool.offset"


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One spooled operation and the byte offset just past it in the spool file."""

    end: int
    record: dict[str, Any]


class Spool:
    """An fsync'd JSON-lines file plus a committed replay offset. Not thread-safe by itself."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create spool directory {self.directory}: {exc}") from exc
        self.path = self.directory / SPOOL_FILE
        self.offset_path = self.directory / OFFSET_FILE
        self.corrupt_lines = 0  # unreadable lines skipped on replay (counted, logged)
        self._repair()

    def _repair(self) -> None:
        """Cut a torn final line left by a crash mid-write (that entry was never acknowledged)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
            self.corrupt_lines += 1
            log.warning("spool %s: cut an incomplete final line (%d bytes)", self.path, len(data) - keep)

    def append(self, record: Mapping[str, Any]) -> None:
        """Durably add one entry (written and fsync'd before returning)."""
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def committed(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def pending(self) -> list[SpoolEntry]:
        """Entries after the committed offset, in the order they were spooled."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        entries: list[SpoolEntry] = []
        position = self.committed()
        while position < len(data):
            newline = data.find(b"\n", position)
            if newline < 0:  # only while a write is in flight; callers hold the spool's lock
                break
            raw = data[position:newline]
            position = newline + 1
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.corrupt_lines += 1
                log.error("spool %s: skipping an unreadable line at byte %d", self.path, position)
                continue
            entries.append(SpoolEntry(position, record))
        return entries

    def commit(self, offset: int) -> None:
        """Record that everything before ``offset`` was replayed (atomic rename, fsync'd)."""
        tmp = self.offset_path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            handle.write(str(offset))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.offset_path)

    def clear(self) -> None:
        """Everything was replayed: start an empty spool."""
        for path in (self.path, self.offset_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def __len__(self) -> int:
        return len(self.pending())


_SPOOL_MAC_LABEL = "lockgate.spool/1"


def _spool_mac(keyring: AuditKeyring, record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "mac"}
    return keyring.current.mac((_SPOOL_MAC_LABEL + canonical_json(body)).encode("utf-8"))


def _spool_mac_ok(keyring: AuditKeyring, record: Mapping[str, Any]) -> bool:
    mac = record.get("mac")
    if not isinstance(mac, str):
        return False
    body = {k: v for k, v in record.items() if k != "mac"}
    payload = (_SPOOL_MAC_LABEL + canonical_json(body)).encode("utf-8")
    key = keyring.get(str(record.get("key_id", "")))
    return key is not None and key.check(payload, mac)


def _audit_record(row: AuditRow) -> dict[str, Any]:
    return {
        "op": "audit",
        "spooled_at": row.time,
        "actor": row.actor,
        "action": row.action,
        "subject": row.subject,
        "details": row.details,
    }


def _rechain(keyring: AuditKeyring, record: Mapping[str, Any]) -> AuditBuilder:
    """A signed builder that appends the spooled entry after whatever the head is at replay."""
    try:
        details = json.loads(record["details"])
    except ValueError:
        details = {"_undecodable": record["details"]}
    if not isinstance(details, dict):
        details = {"_value": details}
    details["spooled_at"] = record["spooled_at"]
    return signed_builder(keyring.current, str(record["actor"]), str(record["action"]), str(record["subject"]),
                          canonical_json(details))


class ResilientStore:
    """A ``Store`` that survives the inner store's outages (see the module docstring)."""

    def __init__(
        self,
        inner: Store,
        spool_dir: str | Path,
        *,
        keyring: AuditKeyring,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.inner = inner
        self.keyring = keyring
        self.spool = Spool(spool_dir)
        self.rejected_lines = 0  # spooled lines whose MAC failed: never replayed
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._lock = threading.RLock()  # orders spooling against replay and direct writes
        self._spooled = len(self.spool)  # entries waiting (spool is the truth on disk)
        self._down = False
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._drained = threading.Condition()
        self.spooled_total = 0  # entries spooled by this process
        self.replayed_total = 0  # entries replayed by this process
        self.replay_errors = 0
        self._thread = threading.Thread(target=self._run, name="lockgate-spool-replay", daemon=True)
        self._thread.start()
        if self._spooled:
            log.warning("spool %s holds %d entries from before; replaying", self.spool.path, self._spooled)
            self._wakeup.set()

    # -- health ------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        """The inner store was unreachable at the last attempt, or entries wait in the spool."""
        return self._down or self._spooled > 0

    @property
    def pending(self) -> int:
        """Entries spooled and not yet replayed."""
        return self._spooled

    def wait_drained(self, timeout: float) -> bool:
        """Block until the store is reachable and the spool is empty (tests, shutdown)."""
        with self._drained:
            return self._drained.wait_for(lambda: not self.degraded, timeout)

    def _failed(self, exc: StoreError) -> None:
        if not self._down:
            log.warning("control-plane store unavailable, degraded: %s", exc)
        self._down = True
        self._wakeup.set()

    # -- pass-through with outage tracking -----------------------------------
    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = getattr(self.inner, name)(*args, **kwargs)
        except StoreError as exc:
            self._failed(exc)
            raise
        return result

    def create_version(self, record: VersionRecord) -> None:
        self._call("create_version", record)

    def update_version(
        self,
        model: str,
        version: str,
        *,
        state: str,
        expected_state: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        result: VersionRecord = self._call(
            "update_version", model, version, state=state, expected_state=expected_state, metadata=metadata
        )
        return result

    def get_version(self, model: str, version: str) -> VersionRecord | None:
        result: VersionRecord | None = self._call("get_version", model, version)
        return result

    def list_versions(self, model: str | None = None) -> list[VersionRecord]:
        result: list[VersionRecord] = self._call("list_versions", model)
        return result

    def add_record(
        self, kind: RecordKind, model: str, version: str, actor: str, body: Mapping[str, Any]
    ) -> StoredRecord:
        result: StoredRecord = self._call("add_record", kind, model, version, actor, body)
        return result

    def list_records(
        self,
        kind: RecordKind | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> list[StoredRecord]:
        result: list[StoredRecord] = self._call("list_records", kind, model, version)
        return result

    def set_policy(
        self,
        model: str,
        document: Mapping[str, Any],
        actor: str,
        expected_revision: int | None = None,
    ) -> PolicyRecord:
        result: PolicyRecord = self._call("set_policy", model, document, actor, expected_revision)
        return result

    def get_policy(self, model: str) -> PolicyRecord | None:
        result: PolicyRecord | None = self._call("get_policy", model)
        return result

    def list_policies(self) -> list[PolicyRecord]:
        result: list[PolicyRecord] = self._call("list_policies")
        return result

    def policy_history(self, model: str) -> list[PolicyRecord]:
        result: list[PolicyRecord] = self._call("policy_history", model)
        return result

    def current_revision(self) -> int:
        result: int = self._call("current_revision")
        return result

    def changes_since(self, revision: int) -> list[Change]:
        result: list[Change] = self._call("changes_since", revision)
        return result

    def wait_for_changes(self, revision: int, timeout: float) -> list[Change]:
        result: list[Change] = self._call("wait_for_changes", revision, timeout)
        return result

    def audit_head(self) -> AuditRow | None:
        result: AuditRow | None = self._call("audit_head")
        return result

    def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        model: str | None = None,
        since: str | None = None,
        subject: str | None = None,
    ) -> list[AuditRow]:
        result: list[AuditRow] = self._call(
            "audit_entries", after_seq=after_seq, limit=limit, model=model, since=since, subject=subject
        )
        return result

    def apply(self, writes: Sequence[Write], audit: Sequence[AuditDraft] = ()) -> Applied:
        """Governance changes are never spooled: durable now, or refused (``StoreError``).

        Entries still waiting in the spool are replayed first, so the chain keeps the order
        in which things happened.
        """
        with self._lock:
            if self._spooled:
                try:
                    self.replay()
                except StoreError as exc:
                    self._failed(exc)
                    raise
            result: Applied = self._call("apply", writes, audit)
            return result

    def get_snapshots(self, model: str, version: str, window: int) -> list[WindowSnapshot]:
        result: list[WindowSnapshot] = self._call("get_snapshots", model, version, window)
        return result

    def latest_window(self, model: str, version: str) -> int | None:
        result: int | None = self._call("latest_window", model, version)
        return result

    def prune_snapshots(self, before_window: int) -> int:
        result: int = self._call("prune_snapshots", before_window)
        return result

    # -- spooled writes ------------------------------------------------------------
    def _spool(self, record: Mapping[str, Any]) -> None:
        record = {**record, "key_id": self.keyring.current.key_id}
        record["mac"] = _spool_mac(self.keyring, record)
        try:
            self.spool.append(record)
        except OSError as exc:  # neither the store nor the disk: the caller must know
            raise StoreError(f"store unavailable and spool {self.spool.path} not writable: {exc}") from exc
        self._spooled += 1
        self.spooled_total += 1
        self._wakeup.set()

    def append_audit(self, build: AuditBuilder) -> AuditRow:
        """Append to the inner chain, or spool and return the unchained entry (seq 0)."""
        with self._lock:
            if self._spooled == 0 and not self._down:
                try:
                    return self.inner.append_audit(build)
                except StoreError as exc:
                    self._failed(exc)
            provisional = build(None)
            self._spool(_audit_record(provisional))
            # Not in the chain yet: seq 0 and no link say so to whoever looks.
            return AuditRow(0, provisional.time, provisional.actor, provisional.action,
                            provisional.subject, provisional.details, "", "")

    def put_snapshot(self, model: str, version: str, window: int, replica: str, payload: bytes) -> None:
        with self._lock:
            if self._spooled == 0 and not self._down:
                try:
                    self.inner.put_snapshot(model, version, window, replica, payload)
                    return
                except StoreError as exc:
                    self._failed(exc)
            self._spool({
                "op": "snapshot",
                "spooled_at": utc_now_iso(),
                "model": model,
                "version": version,
                "window": int(window),
                "replica": replica,
                "payload": base64.b64encode(bytes(payload)).decode("ascii"),
            })

    # -- replay --------------------------------------------------------------------
    def _apply(self, record: Mapping[str, Any], end: int) -> None:
        if not _spool_mac_ok(self.keyring, record):
            self.rejected_lines += 1
            log.error("spool %s: the entry ending at byte %d does not carry a valid MAC (added to the spool by "
                      "someone without the audit key?); not replayed", self.spool.path, end)
            self.inner.append_audit(signed_builder(
                self.keyring.current, "system:lockgate", Action.SPOOL_REJECTED, "audit",
                canonical_json({"spool": str(self.spool.path), "end_offset": end, "op": str(record.get("op")),
                                "action": str(record.get("action", ""))})))
            return
        op = record.get("op")
        if op == "audit":
            self.inner.append_audit(_rechain(self.keyring, record))
        elif op == "snapshot":
            self.inner.put_snapshot(
                str(record["model"]), str(record["version"]), int(record["window"]),
                str(record["replica"]), base64.b64decode(record["payload"]),
            )
        else:
            self.spool.corrupt_lines += 1
            log.error("spool %s: skipping an entry of unknown kind %r", self.spool.path, op)

    def replay(self) -> int:
        """Probe the inner store and replay the spool in order; returns entries replayed.

        The lock is taken per entry, so callers appending meanwhile wait for one entry at
        most (their entries go to the end of the spool). Raises ``StoreError`` (leaving
        the rest spooled) if the store fails midway.
        """
        self.inner.current_revision()  # probe: raises StoreError while still down
        replayed = 0
        while True:
            with self._lock:
                entries = self.spool.pending()
                if not entries:
                    self.spool.clear()
                    self._spooled = 0
                    self._down = False
                    break
            for entry in entries:
                with self._lock:
                    try:
                        self._apply(entry.record, entry.end)
                    except (KeyError, ValueError, TypeError) as exc:  # malformed entry: count, skip
                        self.spool.corrupt_lines += 1
                        log.error("spool %s: cannot replay entry ending at byte %d: %s",
                                  self.spool.path, entry.end, exc)
                    self.spool.commit(entry.end)
                    replayed += 1
                    self.replayed_total += 1
                    self._spooled = max(0, self._spooled - 1)
        with self._drained:
            self._drained.notify_all()
        if replayed:
            log.info("control-plane store back; replayed %d spooled entries", replayed)
        return replayed

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            if backoff == 0.0:
                self._wakeup.wait()
                self._wakeup.clear()
                if self._stop.is_set():
                    return
            if not self.degraded:
                backoff = 0.0
                continue
            try:
                self.replay()
                backoff = 0.0
            except Exception as exc:  # StoreError while down; anything else: retry too
                self.replay_errors += 1
                self._down = True
                backoff = min(self._max_backoff, max(self._min_backoff, backoff * 2))
                if isinstance(exc, StoreError):
                    log.debug("spool replay failed (%s); next try in %.1fs", exc, backoff)
                else:
                    log.exception("spool replay failed unexpectedly; next try in %.1fs", backoff)
                self._stop.wait(backoff)

    def close(self) -> None:
        """Stop the replay thread (the spool stays on disk) and close the inner store."""
        self._stop.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.inner.close()

    def __enter__(self) -> ResilientStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
