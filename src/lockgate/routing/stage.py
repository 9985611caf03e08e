"""The routing step of the request pipeline: policy routing, gates, stats and shadow calls.

Adapts `Router` to the pipeline: gates come from the control plane's in-memory caches
(intersected with what is loaded), every primary request routed by a policy feeds the canary
statistics (a model without a policy has no canary: its requests skip them), and a
mirrored request runs on the shadow version as a detached task after the caller's response
is built, so it can neither change the caller's result nor add to its latency. Shadow tasks
are bounded; a mirror that finds the bound full is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import numpy as np

from lockgate.errors import Unavailable
from lockgate.routing.policy import PolicyBook
from lockgate.routing.router import RouteDecision, Router

if TYPE_CHECKING:
    from lockgate.control.plane import ControlPlane
    from lockgate.serving.repository import LoadedModel

log = logging.getLogger("lockgate.routing")

MAX_SHADOW_IN_FLIGHT = 256


class PolicyRouting:
    def __init__(self, plane: "ControlPlane") -> None:
        self.plane = plane
        self.router = plane.router
        self.shadow_in_flight = 0
        self.shadow_dropped = 0
        self.shadow_failed = 0
        self.shadow_completed = 0
        self._tasks: set[asyncio.Task] = set()

    def route(self, model: "LoadedModel", requested_version: str, routing_key: str | None, request_id: str) -> RouteDecision:
        plane = self.plane
        name = model.name
        versions = model.versions
        if requested_version and requested_version not in versions:
            model.get(requested_version)  # NOT_FOUND naming the loaded versions

        def servable(version: str) -> bool:
            return version in versions and plane.can_serve(name, version)

        def shadowable(version: str) -> bool:
            return version in versions and plane.can_shadow(name, version)

        decision = self.router.route(name, requested_version, routing_key, request_id, servable, shadowable,
                                     configured_default=model.default_version, loaded=versions)
        if decision.version not in versions:
            raise Unavailable(f"model '{name}': the traffic policy routes to version {decision.version}, which is not loaded")
        return decision

    def uses_routing_key(self, model: str) -> bool:
        """Only a sticky policy reads the key: otherwise the pipeline need not look for one."""
        policy = self.plane.book.get(model)
        return policy is not None and policy.sticky

    def after_response(self, model: "LoadedModel", route: RouteDecision, ok: bool, latency_ns: int,
                       inputs: dict[str, np.ndarray] | None, outputs: dict[str, np.ndarray] | None) -> None:
        if route.decision == "default":
            return  # the model had no traffic policy: no canary to judge, no shadow to call
        self.plane.traffic_stats.record(model.name, route.version, latency_ns / 1e6, ok)
        if route.shadow_version is None or not ok or inputs is None or outputs is None:
            return
        if self.shadow_in_flight >= MAX_SHADOW_IN_FLIGHT:
            self.shadow_dropped += 1
            return
        shadow = model.versions.get(route.shadow_version)
        if shadow is None:
            self.shadow_dropped += 1
            return
        self.shadow_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._mirror(model.name, route.version, shadow, inputs, outputs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, model: str, primary: str, shadow, inputs, primary_outputs) -> None:
        try:
            shadow_outputs = await shadow.batcher.submit(inputs, None)
            self.plane.agreements.record(model, primary, shadow.version, primary_outputs, shadow_outputs)
            self.shadow_completed += 1
        except Exception as exc:  # a failing shadow never reaches the caller; it is counted
            self.shadow_failed += 1
            log.debug("shadow call %s/%s failed: %s", model, shadow.version, exc)
        finally:
            self.shadow_in_flight -= 1

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class OpenRouting:
    """Routing without a control plane (an embedded pipeline, tests): no policies, and every
    loaded version may serve. The default version comes from the same `Router` rule."""

    def __init__(self) -> None:
        self.router = Router(PolicyBook())

    def uses_routing_key(self, model: str) -> bool:
        return False

    def route(self, model: "LoadedModel", requested_version: str, routing_key: str | None, request_id: str) -> RouteDecision:
        versions = model.versions
        if requested_version and requested_version not in versions:
            model.get(requested_version)  # NOT_FOUND naming the loaded versions
        return self.router.route(model.name, requested_version, routing_key, request_id, versions.__contains__,
                                 configured_default=model.default_version, loaded=versions)

    def after_response(self, *args: object) -> None:
        return None
