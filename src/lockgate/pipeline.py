"""The request path, written out in order in one place.

    decode  -> protocol.codec        raw/typed contents to numpy, checked against the signature
    route   -> routing (pluggable)   which version serves: pin > sticky key > weights; shadow
    inspect -> governance (plug.)    fused validation + sketches + sampling decision
    batch   -> serving.batcher       merged with concurrent requests into one ORT run
    encode  -> protocol.codec        raw_output_contents, served version, route decision
    record  -> outcomes (pluggable)  the prediction queued for the ledger (written off the path)
    explain -> explain (pluggable)   only for requests with ``lockgate_explain``: attributions
                                     from a pool of its own, added as extra outputs

The pipeline knows nothing about gRPC: it takes a decoded protobuf request plus a small
context and returns a protobuf response, raising ``LockgateError`` subclasses on failure.
Routing and governance plug in through two small protocols so each stays in its package.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np

from lockgate.errors import LockgateError
from lockgate.protocol import codec
from lockgate.routing.router import RouteDecision as Route
from lockgate.routing.stage import OpenRouting
from lockgate.serving.repository import LoadedModel, ModelRepository, ModelVersion

if TYPE_CHECKING:
    from lockgate.telemetry.integration import Telemetry
    from lockgate.telemetry.tracing import RequestTrace

ROUTING_KEY_PARAMETER = "routing_key"
# Inputs this large yield the event loop between the request's steps.
LARGE_PAYLOAD_BYTES = 1 << 20
ROUTING_KEY_HEADER = "x-lockgate-routing-key"


class RequestContext:
    """What the transport knows about a request that the data plane needs.

    Metadata is read lazily through ``metadata_source``: copying gRPC's invocation metadata
    costs ~5 µs per request, and most requests (no sticky policy, tracing off) never look.
    """

    __slots__ = ("deadline", "_metadata", "_metadata_source", "trace", "method")

    def __init__(
        self,
        deadline: float | None = None,  # time.monotonic() deadline
        metadata: Mapping[str, str] | None = None,
        trace: "RequestTrace | None" = None,  # the span of a sampled request (None: not sampled)
        method: str = "ModelInfer",
        metadata_source: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.deadline = deadline
        self._metadata = metadata
        self._metadata_source = metadata_source
        self.trace = trace
        self.method = method

    @property
    def metadata(self) -> Mapping[str, str]:
        metadata = self._metadata
        if metadata is None:
            source = self._metadata_source
            metadata = self._metadata = source() if source is not None else {}
        return metadata


class RoutingStage(Protocol):
    def uses_routing_key(self, model: str) -> bool: ...
    def route(self, model: LoadedModel, requested_version: str, routing_key: str | None, request_id: str) -> Route: ...
    def after_response(self, model: LoadedModel, route: Route, ok: bool, latency_ns: int,
                       inputs: dict[str, np.ndarray] | None, outputs: dict[str, np.ndarray] | None) -> None: ...


class OutcomeStage(Protocol):
    def record(self, version: ModelVersion, request_id: str, request: Any, inputs: dict[str, np.ndarray],
               outputs: dict[str, np.ndarray]) -> None: ...


_ID_PREFIX = f"{time.time_ns() // 1_000_000:x}-{secrets.token_hex(6)}-"
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A server-generated request id, unique across processes and restarts: this process's
    start time and 48 random bits, then a counter (no syscall per request, unlike
    ``secrets``). Given to requests without an id when the model records outcomes, and
    returned in the response ``id``, so feedback can name the prediction."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


class GovernanceStage(Protocol):
    def inspect(self, version: ModelVersion, inputs: dict[str, np.ndarray], request_id: str, ctx: RequestContext) -> Any: ...
    def after_inference(self, version: ModelVersion, inspection: Any, inputs: dict[str, np.ndarray],
                        outputs: dict[str, np.ndarray], route: Route, ctx: RequestContext) -> None: ...
    def abandoned(self, version: ModelVersion, inspection: Any) -> None: ...


class ExplainStage(Protocol):
    def admit(self, version: ModelVersion, request: Any, inputs: dict[str, np.ndarray], ctx: RequestContext) -> Any: ...
    async def attach(self, ticket: Any, inputs: dict[str, np.ndarray], response: Any, ctx: RequestContext) -> None: ...


class InferencePipeline:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        routing: RoutingStage | None = None,
        governance: GovernanceStage | None = None,
        outcomes: OutcomeStage | None = None,
        explain: ExplainStage | None = None,
        telemetry: "Telemetry | None" = None,
        limits: codec.Limits = codec.DEFAULT_LIMITS,
    ) -> None:
        self.repository = repository
        self.routing: RoutingStage = routing or OpenRouting()
        self.governance = governance
        self.outcomes = outcomes
        self.explain = explain
        self.limits = limits  # per-request bounds on what the codec decodes and encodes
        self.telemetry = telemetry

    async def infer(self, request: Any, response_type: type, ctx: RequestContext,
                    wrap: Callable[[], tuple[Any, Any]] | None = None) -> Any:
        """Serve one request. ``wrap``, if given, returns ``(outer, response)``: the response is
        filled in place inside ``outer`` (a stream message), which is returned -- no copy."""
        start_ns = time.perf_counter_ns()
        telemetry = self.telemetry
        if telemetry is not None and ctx.trace is None and telemetry.tracing is not None:
            ctx.trace = telemetry.start_request(ctx.method, ctx.metadata, start_ns)
        trace = ctx.trace
        try:
            model = self.repository.get(request.model_name)

            # route
            routing = self.routing
            routing_key = None
            if routing.uses_routing_key(model.name):
                if request.parameters:
                    param = request.parameters.get(ROUTING_KEY_PARAMETER)
                    if param is not None:
                        routing_key = str(codec.parameter_value(param))
                if routing_key is None:
                    routing_key = ctx.metadata.get(ROUTING_KEY_HEADER)
            request_id = request.id
            if not request_id and model.config.outcomes is not None:
                request_id = new_request_id()  # feedback names the prediction by it
            route = routing.route(model, request.model_version, routing_key, request_id)
            version = model.get(route.version)
        except BaseException as exc:  # NOT_FOUND / PERMISSION_DENIED before a version is known
            # counted per model (version ""), so a refused request is never invisible
            self.repository.count_unrouted(request.model_name,
                                           exc.code.lower() if isinstance(exc, LockgateError) else "internal")
            if trace is not None:
                trace.finish(exc, time.perf_counter_ns())
            raise
        if trace is not None:
            trace.set_model(model.name, version.version)
            trace.set_route(route.decision, route.key_hash, route.shadow_version)

        inputs = None
        outputs = None
        inspection = None  # set once governance counted the inputs; None again once it saw the outputs
        ticket = None  # a place in the explain queue, for requests that ask for attributions
        served = False  # the model answered (an explanation may still fail after that)
        explain_refused = False
        explain_ns = 0
        ok = False
        reason = "cancelled"  # unless an error below names it: the caller went away mid-request
        error: BaseException | None = None
        try:
            # decode
            inputs = codec.decode_inputs(request, version.signature, self.limits)
            output_names = codec.requested_outputs(request, version.signature)
            # explain: admission only, before any work; one cheap test for every other request
            if request.parameters and self.explain is not None:
                try:
                    ticket = self.explain.admit(version, request, inputs, ctx)
                except LockgateError:
                    explain_refused = True  # refused before any work: not the version's failure
                    raise
            # inspect
            inspection = self.governance.inspect(version, inputs, request_id, ctx) if self.governance else None
            # batch + run
            batcher = version.batcher
            # A large payload costs tens of ms per copy on the event loop (decode, run, encode):
            # other calls (a liveness probe) are answered between its steps, not after all of them.
            large = sum(a.nbytes for a in inputs.values()) >= LARGE_PAYLOAD_BYTES
            if large:
                await asyncio.sleep(0)
            # the lone-request path without a coroutine; submit() queues the rest
            outputs = None if large else batcher.run_now(inputs, ctx.deadline, trace)
            if outputs is None:
                outputs = await batcher.submit(inputs, ctx.deadline, trace)
            if large:
                await asyncio.sleep(0)
            # encode
            if wrap is None:
                outer = response = response_type(model_name=model.name, model_version=version.version, id=request_id)
            else:
                outer, response = wrap()
                response.model_name = model.name
                response.model_version = version.version
                response.id = request_id
            codec.encode_outputs(response, outputs, output_names, self.limits.max_output_bytes)
            response.parameters["lockgate_route"].string_param = route.decision
            if self.governance is not None:
                answered, inspection = inspection, None
                self.governance.after_inference(version, answered, inputs, outputs, route, ctx)
            if self.outcomes is not None:
                self.outcomes.record(version, request_id, request, inputs, outputs)  # queued, not written here
            if ticket is not None:
                served = True
                explain_start = time.perf_counter_ns()
                try:
                    await self.explain.attach(ticket, inputs, response, ctx)
                finally:
                    explain_ns = time.perf_counter_ns() - explain_start
            ok = True
            return outer
        except LockgateError as exc:
            error = exc
            reason = exc.reason
            raise
        except Exception as exc:
            error = exc
            reason = "internal"
            raise
        finally:
            if inspection is not None:  # inspected, never answered: its drift window must not wait
                self.governance.abandoned(version, inspection)  # type: ignore[union-attr]
            # the model's latency: an explanation's time is its own (canary p99 must not see it)
            elapsed = time.perf_counter_ns() - start_ns - explain_ns
            # counters, route decisions and (when metrics attached them) histograms, in C
            version.stats.record_request(ok, elapsed, reason, route.decision,
                                         trace.trace_id_hex if trace is not None else None)
            if ticket is not None:
                ticket.abandon()
            if not explain_refused:  # an explain failure is not the version's: canaries judge the inference
                self.routing.after_response(model, route, ok or served, elapsed, inputs, outputs)
            if trace is not None:
                trace.finish(error, start_ns + elapsed)
            # The raised error's traceback holds this frame (the request, its arrays): keeping
            # the error here too would make a cycle that only a full GC frees.
            error = None
