"""A drift window's inputs and outputs are the same requests.

A request's inputs are inspected (and counted) when it arrives; its outputs exist only after
inference, milliseconds or seconds later. Closing a window when the inputs reach
``window_rows`` would leave the outputs of the requests still in flight to the next window
(one run held 0 output rows in a 300-row window and 1,000 in a 2,000-row one). So every
request is stamped with the :class:`Epoch` (window) it was inspected in, and its outputs go
to that epoch's output state, whichever window is open when they arrive:

* **cut** (window due): under the engine's cut lock the input state is taken and reset and a
  new epoch opens; requests inspected from then on belong to it. The closed epoch keeps its
  own output accumulators and waits for its requests;
* **finalise**: once every request of the closed epoch is answered, failed or rejected (or
  ``output_grace_s`` has passed), its output state is taken and the window is evaluated.
  Outputs arriving later are counted (``late``), never added to another window.

The cut lock is held for a few pointer swaps and the inputs' state copy, once per window;
the request path takes it, uncontended, once when inspecting and once when observing outputs.
The counts below travel with the window (``WindowState.accounting``) and add up across
replicas.
"""

from __future__ import annotations

import threading
from typing import Any


class Epoch:
    """One window's requests: their output tensors and how each request ended."""

    __slots__ = ("index", "start", "end", "outputs", "pending", "answered", "rejected", "failed",
                 "late", "closed", "final", "drained", "inputs_state")  # fmt: skip

    def __init__(self, index: int, start: float, outputs: dict[str, Any]) -> None:
        self.index = index
        self.start = start
        self.end: float | None = None
        self.outputs = outputs  # output name -> the engine's per-tensor state for this epoch
        self.pending = 0  # inspected, accepted, outputs not yet observed
        self.answered = 0  # outputs observed in this window
        self.rejected = 0  # refused by validation: inputs counted, never any outputs
        self.failed = 0  # accepted, but inference failed or the caller went away
        self.late = 0  # outputs that came after the window was evaluated (not counted anywhere)
        self.closed = False  # cut: no new request joins it
        self.final = False  # evaluated: its output state is gone
        self.drained = threading.Event()  # set once closed and nothing is pending
        self.inputs_state: dict[str, Any] | None = None

    def settle(self) -> None:
        """A request of this epoch finished (answered or failed); called with the cut lock held."""
        self.pending -= 1
        if self.closed and self.pending <= 0:
            self.drained.set()

    def accounting(self) -> dict[str, int]:
        """Request counts of the window, as they stand at finalisation."""
        return {
            "inspected": self.answered + self.failed + self.rejected + max(self.pending, 0),
            "answered": self.answered,
            "rejected": self.rejected,
            "failed": self.failed,
            "outputs_missing": max(self.pending, 0),
        }
