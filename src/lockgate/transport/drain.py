"""Admission of data-plane calls, and the drain that lets every accepted one finish on SIGTERM.

grpc's own graceful stop is not enough. When ``server.stop(grace)`` begins, gRPC core cancels
every call it has received but not yet handed to the application (its pending queue) and
every call that arrives on an open connection before the client has read the GOAWAY: the
client sees CANCELLED for a request nobody ran (grpc/grpc#41785). Under load that was 4-15
requests per SIGTERM. So the process drains in front of grpc first:

1. ``begin()``: the listening sockets are shut (``transport.ports.stop_listening``: new
   connections are refused by the kernel) and for ``admit_s`` every call that reaches
   lockgate is still served -- the calls gRPC core had already received when the signal came.
2. After that, a new call on an open connection is answered UNAVAILABLE at once ("shutting
   down; not run"), which tells well-behaved clients to go elsewhere; open streams answer
   what they have read and end with UNAVAILABLE.
3. ``wait_quiet()``: once no call is in flight and none has arrived for ``quiet_s``, grpc's
   stop runs with the remaining ``drain_timeout_s`` as its grace; nothing is left for it to
   cancel.

The request path pays one attribute read (``draining``) and an in-flight count per call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from lockgate.errors import Unavailable

#: Calls reaching lockgate this long after SIGTERM are still served: gRPC core received them
#: before the signal, and they waited only for the event loop to pick them up.
ADMIT_S = 0.25
#: Quiet period (no call in flight, none arriving) after which grpc's stop cannot cancel anything.
QUIET_S = 0.1


def shutting_down() -> Unavailable:
    return Unavailable("lockgate is shutting down (SIGTERM): this call was not run; retry on another replica")


class DrainGate:
    """What the inference servicer asks before it runs a call; shared with the process."""

    __slots__ = ("draining", "in_flight", "refused", "admitted_after_signal", "_admit_until", "_last_arrival",
                 "_stream_stoppers", "_clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.draining = False  # read by every call: the only cost while serving
        self.in_flight = 0  # calls (and open streams) being served
        self.refused = 0  # calls answered UNAVAILABLE during the drain
        self.admitted_after_signal = 0
        self._admit_until = 0.0
        self._last_arrival = 0.0
        self._stream_stoppers: set[Callable[[], None]] = set()
        self._clock = clock

    # -- the request side (only when draining) ----------------------------------------
    def admit(self) -> bool:
        """During the drain: True if a call arriving now is still served (see ``ADMIT_S``)."""
        now = self._clock()
        self._last_arrival = now
        if now < self._admit_until:
            self.admitted_after_signal += 1
            return True
        self.refused += 1
        return False

    def register_stream(self, stop: Callable[[], None]) -> None:
        """``stop`` ends an open stream's reading once the drain refuses new work."""
        self._stream_stoppers.add(stop)

    def unregister_stream(self, stop: Callable[[], None]) -> None:
        self._stream_stoppers.discard(stop)

    # -- the process side ---------------------------------------------------------------
    def begin(self, admit_s: float = ADMIT_S) -> None:
        """Start draining: serve what already arrived for ``admit_s``, then refuse."""
        if self.draining:
            return
        now = self._clock()
        self._admit_until = now + admit_s
        self._last_arrival = now
        self.draining = True
        asyncio.get_running_loop().call_later(admit_s, self._stop_streams)

    def _stop_streams(self) -> None:
        for stop in list(self._stream_stoppers):
            stop()

    async def wait_quiet(self, deadline: float, quiet_s: float = QUIET_S, poll_s: float = 0.01) -> bool:
        """Wait until nothing is in flight and nothing arrived for ``quiet_s`` (True), or until
        ``deadline`` (a ``clock()`` value; False)."""
        while True:
            now = self._clock()
            if now >= self._admit_until and self.in_flight == 0 and now - self._last_arrival >= quiet_s:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(poll_s, max(deadline - now, 0.0)))
