"""``ChangeWatcher``: deliver store changes to the server on a background thread.

The server builds its immutable routing snapshot in the callback and swaps it
in; this module only decides *when* to call it. It survives store outages:
errors are counted and retried with exponential backoff, and the last snapshot
keeps serving meanwhile. A periodic call with an empty list is the safety-net
re-read, so a missed notification can never leave a replica stale for long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from lockgate.control.store import Change, Store

log = logging.getLogger(__name__)

ChangeCallback = Callable[[Sequence[Change]], None]


class ChangeWatcher:
    """Call ``callback(changes)`` after every change; ``callback([])`` every ``resync_s``."""

    def __init__(
        self,
        store: Store,
        callback: ChangeCallback,
        *,
        start_revision: int | None = None,
        wait_s: float = 1.0,
        resync_s: float = 30.0,
        max_backoff_s: float = 10.0,
        name: str = "lockgate-control-watch",
    ) -> None:
        self._store = store
        self._callback = callback
        self._revision = start_revision
        self._wait_s = wait_s
        self._resync_s = resync_s
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.store_errors = 0
        self.callback_errors = 0

    @property
    def revision(self) -> int | None:
        """The last change revision delivered (None before the first read)."""
        return self._revision

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _deliver(self, changes: Sequence[Change]) -> None:
        try:
            self._callback(changes)
        except Exception:  # a bad callback must not kill the watcher; resync retries
            self.callback_errors += 1
            log.exception("control-plane change callback failed")

    def _run(self) -> None:
        backoff = 0.0
        since_resync = 0.0
        while not self._stop.is_set():
            try:
                if self._revision is None:
                    self._revision = self._store.current_revision()
                changes = self._store.wait_for_changes(self._revision, self._wait_s)
                backoff = 0.0
            except Exception as exc:  # store unreachable: keep the last snapshot, retry
                self.store_errors += 1
                backoff = min(self._max_backoff_s, max(0.1, backoff * 2))
                log.warning("control-plane store unavailable (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                continue
            if changes:
                self._revision = changes[-1].revision
                self._deliver(changes)
                since_resync = 0.0
                continue
            since_resync += self._wait_s
            if since_resync >= self._resync_s:
                since_resync = 0.0
                self._deliver([])
