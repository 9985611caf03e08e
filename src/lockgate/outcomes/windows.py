"""This replica's share of every outcome window, and the fleet's merged view of them.

``WindowBook`` holds the states this process writes: prediction counts of the rows it served
and label contributions of the labels it joined, under this replica's id. A state is loaded
from the store the first time it is touched (a restarted replica with the same id continues
its rows) and written back in the same transaction as the ledger rows or labels that changed
it, so a stored window never disagrees with the ledger. Updates are staged on copies and
adopted only after the transaction commits.

``merged`` reads every replica's rows of a range of windows and adds them up: the figure any
replica, the leader or the report computes is the fleet's, exactly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lockgate.outcomes.state import OutcomeWindow, merge_windows

if TYPE_CHECKING:
    from lockgate.outcomes.spec import OutcomeSpec
    from lockgate.outcomes.store import OutcomeStore, WindowUpsert

WindowKey = tuple[str, str, int, int]  # model, version, span_ms, window


class WindowBook:
    """The states this replica writes (bounded LRU; anything dropped reloads from the store)."""

    def __init__(self, store: "OutcomeStore", replica: str, capacity: int = 4096) -> None:
        self.store = store
        self.replica = replica
        self.capacity = capacity
        #: Held while a state is staged, written and adopted, so the ledger writer and
        #: feedback joins of this process never interleave on one window.
        self.lock = threading.RLock()
        self._states: OrderedDict[WindowKey, OutcomeWindow] = OrderedDict()

    def _load(self, spec: "OutcomeSpec", version: str, window: int) -> OutcomeWindow:
        key = (spec.model, version, spec.span_ms, window)
        state = self._states.get(key)
        if state is not None and state.fingerprint == spec.fingerprint:
            self._states.move_to_end(key)
            return state
        payload = self.store.window_payload(spec.model, version, spec.span_ms, window, self.replica)
        if payload is not None:
            stored = OutcomeWindow.from_bytes(payload)
            if stored.fingerprint == spec.fingerprint:
                return stored
        return OutcomeWindow.empty(spec, version, window)

    def stage(self, spec: "OutcomeSpec", version: str, window: int, staged: dict[WindowKey, OutcomeWindow]) -> OutcomeWindow:
        """A copy of the state to change (reused within one transaction's ``staged``)."""
        key = (spec.model, version, spec.span_ms, window)
        found = staged.get(key)
        if found is None:
            found = staged[key] = self._load(spec, version, window).copy()
        return found

    def upserts(self, staged: dict[WindowKey, OutcomeWindow]) -> list["WindowUpsert"]:
        return [(m, v, span, w, self.replica, state.to_bytes()) for (m, v, span, w), state in staged.items()]

    def adopt(self, staged: dict[WindowKey, OutcomeWindow]) -> None:
        """After the commit: the staged copies become this replica's states."""
        for key, state in staged.items():
            self._states[key] = state
            self._states.move_to_end(key)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)


@dataclass(frozen=True, slots=True)
class VersionWindows:
    """Every replica's states of one version, merged per window (oldest first)."""

    version: str
    windows: list[OutcomeWindow]

    def total(self) -> OutcomeWindow | None:
        return merge_windows(self.windows)


def merged(store: "OutcomeStore", spec: "OutcomeSpec", version: str | None = None,
           since: float | None = None, until: float | None = None) -> dict[str, VersionWindows]:
    """Per version, the fleet's merged state of each window by prediction time in [since, until)."""
    since_window = int(since // spec.span_s) if since is not None else None
    grouped: dict[tuple[str, int], list[OutcomeWindow]] = {}
    for row in store.windows(spec.model, spec.span_ms, version=version, since_window=since_window):
        if until is not None and row.window * spec.span_s >= until:
            continue
        state = OutcomeWindow.from_bytes(row.payload)
        if state.fingerprint != spec.fingerprint:
            continue  # written under another outcomes layout (the config changed): not comparable
        grouped.setdefault((row.version, row.window), []).append(state)
    out: dict[str, VersionWindows] = {}
    for (v, _), states in sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1])):
        total = merge_windows(states)
        if total is not None:
            out.setdefault(v, VersionWindows(v, [])).windows.append(total)
    return out
