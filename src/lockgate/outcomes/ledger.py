"""The prediction ledger: every served prediction recorded off the request path.

The request path (``record``) does O(1) work per request with small constants and nothing
else: it keeps references to the prediction output and to the inputs segments read (no
copy: a numpy fancy-index copy measured ~5 µs, several times the rest), reads the segment
parameters, appends one tuple to a deque and counts. It never blocks, never touches the
store, never takes a lock. Each model has a budget in rows (``ledger.queue_rows``) and in the
bytes the queue holds on to (``ledger.queue_bytes``); a request that would exceed either is
dropped and counted (``queue_full``).

One writer thread per process turns the queue into ledger rows in batches, vectorised per
model: request-id hashes and row keys, predicted class and score, segment cells, window
prediction counts; then one transaction per batch inserts the rows and writes this
replica's window states. A reused request id (or a hash collision) keeps its first
prediction and counts the rest (``duplicate_id``); a store that stays down past the retries
drops the batch and counts it (``store_unavailable``). Every drop is visible in
``lockgate_outcome_dropped_total{model,version,reason}``; nothing is silent.

The same thread runs retention (age and row cap) every ``retention.check_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

import numpy as np

from lockgate.errors import StoreError
from lockgate.outcomes.spec import OutcomeSpec, request_hash, row_keys
from lockgate.outcomes.store import KeyConflict
from lockgate.protocol.codec import parameter_value

if TYPE_CHECKING:
    from lockgate.outcomes.store import OutcomeStore
    from lockgate.outcomes.windows import WindowBook, WindowKey
    from lockgate.outcomes.state import OutcomeWindow

log = logging.getLogger("lockgate.outcomes.ledger")

#: Attempts (with backoff) before a batch the store refuses is dropped and counted.
WRITE_ATTEMPTS = 6
DROP_REASONS = ("queue_full", "duplicate_id", "not_finite", "store_unavailable", "shutdown")


class VersionRecorder:
    """What the request path needs for one loaded version, and its counters.

    ``enqueued`` is only written by the request path (event-loop thread) and ``consumed``
    only by the writer thread, so their difference is the backlog without a lock.
    """

    __slots__ = ("spec", "version", "output", "columns", "column_inputs", "parameters", "queue_rows", "queue_bytes",
                 "batch_rows", "enqueued", "consumed", "bytes_in", "bytes_out", "written", "dropped", "series")

    def __init__(self, spec: OutcomeSpec, version: str) -> None:
        self.spec = spec
        self.version = version
        self.output = spec.output
        self.columns = tuple((name, list(cols)) for name, (_, cols) in spec.input_columns.items())
        self.column_inputs = tuple(name for name, _ in self.columns)
        self.parameters = tuple(name for _, name in spec.parameter_segments)
        self.queue_rows = spec.config.ledger.queue_rows
        self.queue_bytes = spec.config.ledger.queue_bytes
        self.batch_rows = spec.config.ledger.batch_rows
        self.enqueued = 0
        self.consumed = 0
        self.bytes_in = 0  # written by the request path only
        self.bytes_out = 0  # written by the writer only
        self.written = 0
        self.dropped: dict[str, int] = {reason: 0 for reason in DROP_REASONS}
        self.series: int | None = None

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def backlog(self) -> int:
        return self.enqueued - self.consumed


class PredictionLedger:
    """The bounded queue and its writer thread (see the module docstring)."""

    def __init__(self, store: "OutcomeStore", book: "WindowBook") -> None:
        self.store = store
        self.book = book
        self._queue: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushed = threading.Condition()
        self._recorders: dict[tuple[str, str], VersionRecorder] = {}
        self._retention_due: dict[str, float] = {}
        self.write_errors = 0
        self.retention_errors = 0
        #: model -> predictions retention evicted (age or row cap): not drops, but never silent either.
        self.evicted: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="lockgate-outcome-ledger", daemon=True)
        self._thread.start()

    # -- versions ------------------------------------------------------------------------
    def attach(self, recorder: VersionRecorder) -> None:
        self._recorders[(recorder.model, recorder.version)] = recorder

    def detach(self, recorder: VersionRecorder) -> None:
        if self._recorders.get((recorder.model, recorder.version)) is recorder:
            del self._recorders[(recorder.model, recorder.version)]

    def recorders(self) -> list[VersionRecorder]:
        return list(self._recorders.values())

    # -- request path ------------------------------------------------------------------------
    def record(self, rec: VersionRecorder, request_id: str, request: Any, inputs: dict[str, np.ndarray],
               outputs: dict[str, np.ndarray]) -> None:
        """Queue one served request's predictions (see the module docstring for the cost)."""
        out = outputs[rec.output]
        rows = out.shape[0] if out.ndim else 1
        size = out.nbytes
        columns = None
        if rec.column_inputs:
            columns = [inputs[name] for name in rec.column_inputs]
            for array in columns:
                size += array.nbytes
        if rec.enqueued - rec.consumed + rows > rec.queue_rows or rec.bytes_in - rec.bytes_out + size > rec.queue_bytes:
            rec.dropped["queue_full"] += rows
            return
        params = None
        if rec.parameters:
            given = request.parameters
            if given:
                params = tuple(parameter_value(given[name]) if name in given else None for name in rec.parameters)
        self._queue.append((rec, request_id, time.time(), out, columns, params, rows, size))
        rec.enqueued += rows
        rec.bytes_in += size
        if rec.enqueued - rec.consumed >= rec.batch_rows:
            self._wake.set()

    # -- writer ----------------------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is written (or dropped)."""
        targets = {key: rec.enqueued for key, rec in self._recorders.items()}
        if all(self._recorders[k].consumed >= n for k, n in targets.items() if k in self._recorders):
            return True
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._flushed:
            while True:
                if all(rec.consumed >= targets.get(key, 0) for key, rec in list(self._recorders.items())):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._flushed.wait(min(remaining, 0.05))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the writer."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        while self._queue:  # the store never came back: count what is left
            item = self._queue.popleft()
            item[0].dropped["shutdown"] += item[6]
            item[0].bytes_out += item[7]
            item[0].consumed += item[6]

    def _run(self) -> None:
        try:
            self.store.tune_writer()
        except Exception:  # noqa: BLE001 -- a slower writer, not a broken one
            log.exception("outcome ledger: tuning the writer connection failed")
        while not self._stop.is_set():
            recorders = list(self._recorders.values())
            interval = min((r.spec.config.ledger.flush_interval_s for r in recorders), default=1.0)
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self._drain()
                self._retention(time.time())
            except Exception:  # never let the writer die: count and go on
                self.write_errors += 1
                log.exception("outcome ledger writer failed")
        self._drain()

    def _drain(self) -> None:
        while self._queue:
            batch: dict[VersionRecorder, list[tuple]] = defaultdict(list)
            taken = 0
            limit = max((rec.batch_rows for rec in self._recorders.values()), default=4096)
            while self._queue and taken < limit:
                item = self._queue.popleft()
                batch[item[0]].append(item)
                taken += item[6]
            self._write(batch)
            with self._flushed:
                self._flushed.notify_all()

    def _write(self, batch: dict[VersionRecorder, list[tuple]]) -> None:
        rows: list[tuple] = []
        counts: dict[int, int] = {}
        built: list[tuple[VersionRecorder, int, dict[str, np.ndarray]]] = []
        try:
            for rec, items in batch.items():
                if rec.series is None:
                    rec.series = self.store.series_id(rec.model, rec.version)
                columns = _columns(rec, items)
                built.append((rec, sum(item[6] for item in items), columns))
        except StoreError:
            self._drop_all(batch, "store_unavailable")
            return
        for rec, _, columns in built:
            rows.extend(_ledger_rows(rec.series, columns, rec.spec.classification))  # type: ignore[arg-type]
            counts[rec.series] = counts.get(rec.series, 0) + len(columns["key"])  # type: ignore[index]
        delay = 0.05
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                self._commit(built, rows, counts)
                break
            except StoreError as exc:
                if attempt == WRITE_ATTEMPTS or self._stop.is_set():
                    log.warning("outcome ledger: dropping %d rows, the store is unavailable: %s", len(rows), exc)
                    for rec, n, _ in built:
                        rec.dropped["store_unavailable"] += n
                    break
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        for rec, n, _ in built:
            rec.bytes_out += sum(item[7] for item in batch[rec])
            rec.consumed += n

    def _commit(self, built: list[tuple[VersionRecorder, int, dict[str, np.ndarray]]], rows: list[tuple],
                counts: dict[int, int]) -> None:
        with self.book.lock:
            try:
                staged = self._stage(built)
                self.store.write_predictions(rows, counts, self.book.upserts(staged))
            except KeyConflict:
                existing = self.store.existing_keys([r[0] for r in rows])
                for rec, _, columns in built:
                    keep = np.array([int(k) not in existing for k in columns["key"]], dtype=bool)
                    rec.dropped["duplicate_id"] += int((~keep).sum())
                    for name in list(columns):
                        columns[name] = columns[name][keep]
                rows[:] = [r for r in rows if r[0] not in existing]
                for series in counts:
                    counts[series] = sum(1 for r in rows if r[1] == series)
                staged = self._stage(built)
                self.store.write_predictions(rows, counts, self.book.upserts(staged), skip_existing=True)
            self.book.adopt(staged)
        for rec, _, columns in built:
            rec.written += len(columns["key"])

    def _stage(self, built: list[tuple[VersionRecorder, int, dict[str, np.ndarray]]]) -> dict["WindowKey", "OutcomeWindow"]:
        staged: dict[WindowKey, OutcomeWindow] = {}
        for rec, _, columns in built:
            spec = rec.spec
            windows = columns["time"] // spec.span_ms
            for window in np.unique(windows):
                mask = windows == window
                state = self.book.stage(spec, rec.version, int(window), staged)
                state.add_predictions(columns["cell"][mask], columns["predicted"][mask] if spec.classification else None)
        return staged

    def _drop_all(self, batch: dict[VersionRecorder, list[tuple]], reason: str) -> None:
        for rec, items in batch.items():
            n = sum(item[6] for item in items)
            rec.dropped[reason] += n
            rec.bytes_out += sum(item[7] for item in items)
            rec.consumed += n

    # -- retention -------------------------------------------------------------------------------------
    def _retention(self, now: float) -> None:
        for rec in list(self._recorders.values()):
            spec = rec.spec
            due = self._retention_due.get(spec.model, 0.0)
            if now < due:
                continue
            retention = spec.config.retention
            self._retention_due[spec.model] = now + retention.check_interval_s
            now_ms = int(now * 1000)
            try:
                evicted = self.store.evict(
                    spec.model, older_than_ms=now_ms - int(retention.max_age_s * 1000), max_rows=retention.max_rows,
                    now_ms=now_ms, tombstone_ms=int((retention.remember_expired_s or retention.max_age_s) * 1000),
                    history_before_ms=now_ms - int(retention.history_s * 1000), span_ms=spec.span_ms,
                )
                self.evicted[spec.model] = self.evicted.get(spec.model, 0) + evicted
            except StoreError as exc:
                self.retention_errors += 1
                log.warning("outcome retention of model %s deferred: %s", spec.model, exc)

    def run_retention(self) -> None:
        """Run retention for every model now (tests, the CLI)."""
        self._retention_due.clear()
        self._retention(time.time())


def _columns(rec: VersionRecorder, items: list[tuple]) -> dict[str, np.ndarray]:
    """The queued requests of one version as ledger columns (vectorised)."""
    spec = rec.spec
    counts = np.array([item[6] for item in items], dtype=np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    single = total == len(items)  # batch-1 requests: no repeats needed
    hashes = np.array([request_hash(item[1]) for item in items], dtype=np.uint64)
    times = np.array([item[2] for item in items], dtype=np.float64)
    if single:
        keys = row_keys(hashes, np.zeros(total, dtype=np.uint64))
        times = (times * 1000).astype(np.int64)
    else:
        row_index = np.arange(total, dtype=np.int64) - np.repeat(starts, counts)
        keys = row_keys(np.repeat(hashes, counts), row_index)
        times = np.repeat((times * 1000).astype(np.int64), counts)
    out = np.concatenate([item[3] for item in items]).astype(np.float64).reshape(total, -1)
    columns: dict[str, np.ndarray] = {"key": keys, "time": times}
    finite = np.isfinite(out).all(axis=1)
    if spec.task == "regression":
        columns["predicted"] = np.zeros(total, dtype=np.int64)
        columns["score"] = out[:, 0]
    elif spec.kind == "label":
        label = out[:, 0]
        finite &= (label >= 0) & (label < spec.n_classes) & (label == np.floor(label))
        columns["predicted"] = np.where(finite, label, 0).astype(np.int64)
        columns["score"] = np.full(total, np.nan)
    elif spec.task == "binary":
        p = out[:, spec.positive] if out.shape[1] == 2 else out[:, 0]
        negative = 1 - spec.positive
        columns["predicted"] = np.where(p >= spec.threshold, spec.positive, negative).astype(np.int64)
        columns["score"] = p
    else:
        columns["predicted"] = np.argmax(out, axis=1).astype(np.int64)
        columns["score"] = out.max(axis=1)
        columns["probs"] = out.astype(np.float32)
    columns["cell"] = _cells(spec, items, counts, total)
    # One prediction per key: a request id reused inside the batch keeps its first rows.
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(total, dtype=bool)
    keep[first] = True
    rec.dropped["duplicate_id"] += int(total - keep.sum())
    rec.dropped["not_finite"] += int((keep & ~finite).sum())
    keep &= finite
    if not keep.all():
        columns = {name: value[keep] for name, value in columns.items()}
    return columns


def _cells(spec: OutcomeSpec, items: list[tuple], counts: np.ndarray, total: int) -> np.ndarray:
    cells = np.zeros(total, dtype=np.int64)
    if not spec.segments:
        return cells
    for position, (name, (segment_indices, columns)) in enumerate(spec.input_columns.items()):
        values = np.concatenate([item[4][position] for item in items])[:, list(columns)].astype(np.float64)
        for j, index in enumerate(segment_indices):
            cells += spec.segments[index].codes_of_values(values[:, j]) * spec.strides[index]
    for position, (index, _) in enumerate(spec.parameter_segments):
        segment = spec.segments[index]
        codes = np.empty(total, dtype=np.int64)
        start = 0
        for item, n in zip(items, counts):
            value = item[5][position] if item[5] is not None else None
            if segment.per_row and value is not None:
                parts = str(value).split(",")
                codes[start : start + n] = [segment.code_of_text(p) for p in parts] if len(parts) == n else segment.missing
            else:
                codes[start : start + n] = segment.code_of_text(value)
            start += n
        cells += codes * spec.strides[index]
    return cells


def _ledger_rows(series: int, columns: dict[str, np.ndarray], classification: bool) -> list[tuple]:
    keys = columns["key"].tolist()
    n = len(keys)
    times = columns["time"].tolist()
    predicted = columns["predicted"].tolist() if classification else [None] * n
    scores = [None if s != s else s for s in columns["score"].tolist()]  # NaN -> NULL
    cells = columns["cell"].tolist()
    probs = columns.get("probs")
    if probs is not None:  # slices of one buffer: cheaper than a numpy row view per row
        flat, step = probs.tobytes(), probs.shape[1] * probs.itemsize
        blobs: list[bytes | None] = [flat[i : i + step] for i in range(0, len(flat), step)]
    else:
        blobs = [None] * n
    return list(zip(keys, [series] * n, times, predicted, scores, blobs, cells))
