"""One drift status for a fleet of replicas sharing a store.

Windows are aligned to the wall clock (window ``w`` covers ``[w*T, (w+1)*T)``), so every
replica closes the same window at the same time without talking to the others. At each
boundary every replica takes its engines' window state and ships the serialised bytes to the
store (spooled locally if the store is down). The leader waits a grace period, merges the
snapshots of all replicas (exact counts and moments: the state merges by addition and Chan's
formula) and evaluates drift once, so each alert reaches the audit trail and the canary
analysis exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from lockgate.errors import StoreError
from lockgate.governance.stage import ENGINE_KEY
from lockgate.governance.state import WindowState, merge_all

if TYPE_CHECKING:
    from lockgate.control.store import Store
    from lockgate.governance.drift import DriftReport
    from lockgate.governance.stage import GovernanceStage
    from lockgate.serving.repository import ModelVersion

log = logging.getLogger("lockgate.governance.fleet")


class FleetDrift:
    def __init__(self, store: "Store", stage: "GovernanceStage", *, replica_id: str, window_s: float,
                 grace_s: float | None = None, keep_windows: int = 100) -> None:
        self.store = store
        self.stage = stage
        self.replica_id = replica_id
        self.window_s = window_s
        self.grace_s = grace_s if grace_s is not None else min(5.0, window_s / 2)
        self.keep_windows = keep_windows
        self.shipped = 0
        self.ship_errors = 0
        self.merged = 0
        self.reports: dict[tuple[str, str], "DriftReport"] = {}

    def window_of(self, t: float) -> int:
        return int(t // self.window_s)

    async def _sleep_until(self, t: float, stop: asyncio.Event) -> bool:
        """Sleep until wall time ``t``; False if asked to stop first."""
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, t - time.time()))
            return False
        except asyncio.TimeoutError:
            return True

    # -- every replica ---------------------------------------------------------------------
    def adopt(self, version: "ModelVersion") -> None:
        """Repository preparer (after the governance one): a version loaded at any time,
        not only at start, leaves window closing to the fleet schedule. Left local, its
        engine would close windows itself on every replica, so rows would never be shipped
        and each replica would alert on its own share."""
        engine = version.extensions.get(ENGINE_KEY)
        if engine is not None:
            engine.local_windows = False

    def ship(self, window: int) -> int:
        """Take every engine's window and put it in the store; returns how many were shipped."""
        count = 0
        for (model, version), engine in self.stage.engines().items():
            # the window's inputs and the outputs of the same requests: wait (briefly) for
            # the requests still in flight, within the leader's grace period
            state = engine.take_window(wait_s=min(engine.config.drift.output_grace_s, self.grace_s / 2))
            if state.rows == 0:
                continue
            try:
                self.store.put_snapshot(model, version, window, self.replica_id, state.to_bytes())
                count += 1
            except StoreError:
                self.ship_errors += 1  # ResilientStore spools instead of raising; plain stores may not
                log.exception("window %d of %s/%s could not be shipped", window, model, version)
        self.shipped += count
        return count

    async def ship_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            boundary = (self.window_of(time.time()) + 1) * self.window_s
            if not await self._sleep_until(boundary, stop):
                return
            await asyncio.to_thread(self.ship, self.window_of(boundary) - 1)

    # -- leader only ---------------------------------------------------------------------------
    def merge(self, window: int) -> list["DriftReport"]:
        """Merge every replica's snapshot of ``window`` per version and evaluate it once."""
        reports = []
        for (model, version), engine in self.stage.engines().items():
            snapshots = self.store.get_snapshots(model, version, window)
            if not snapshots:
                continue
            merged: WindowState = merge_all([WindowState.from_bytes(s.payload) for s in snapshots])
            report = engine.monitor.close_window(merged)
            self.merged += 1
            if report is not None:
                self.reports[(model, version)] = report
                reports.append(report)
        if window > self.keep_windows:
            self.store.prune_snapshots(window - self.keep_windows)
        return reports

    async def merge_loop(self, stop: asyncio.Event) -> None:
        """Merge each closed window once. Windows whose merge failed (store down) are caught up
        when the store returns, oldest first, up to ``keep_windows`` back."""
        pending_from: int | None = None
        while not stop.is_set():
            boundary = (self.window_of(time.time()) + 1) * self.window_s
            if not await self._sleep_until(boundary + self.grace_s, stop):
                return
            last = self.window_of(boundary) - 1
            first = max(pending_from if pending_from is not None else last, last - self.keep_windows)
            for window in range(first, last + 1):
                try:
                    await asyncio.to_thread(self.merge, window)
                except StoreError:
                    log.warning("fleet drift merge of window %d deferred: store unavailable", window)
                    pending_from = window
                    break
                except Exception:
                    log.exception("fleet drift merge of window %d failed", window)
            else:
                pending_from = None
