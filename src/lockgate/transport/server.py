"""Process wiring: build the grpc.aio server, serve, and drain on SIGTERM.

``serve()`` runs one process. ``run()`` runs ``--workers N`` processes sharing the port with
SO_REUSEPORT (the kernel spreads connections across them) and forwards signals, because one
Python process cannot use more than one core for protocol work.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from lockgate._descriptor_pool import POOL
from lockgate.config import ServerSettings
from lockgate.control.auth import Authenticator
from lockgate.control.leader import LocalLeader, elector_for
from lockgate.control.plane import ControlPlane
from lockgate.control.provenance import ProvenanceGate
from lockgate.control.spool import ResilientStore
from lockgate.control.store import Store, open_store
from lockgate.explain.service import ExplainService
from lockgate.governance.fleet import FleetDrift
from lockgate.governance.stage import GovernanceStage
from lockgate.pipeline import InferencePipeline
from lockgate.routing.stage import PolicyRouting
from lockgate.serving.repository import ModelRepository
from lockgate.telemetry.integration import Telemetry
from lockgate.transport.grpc.admin import AdminService, add_admin_service
from lockgate.transport.grpc.call_metadata import MetadataCapture
from lockgate.telemetry.json_logs import JsonLogFormatter, wrap_native_stderr
from lockgate.telemetry.logs import CauseLog
from lockgate.telemetry.metrics import Sample
from lockgate.transport.drain import DrainGate
from lockgate.transport.ports import PortClaim, PortInUse, check_free, claim, stop_listening
from lockgate.transport.grpc.inference import InferenceService, add_inference_service

log = logging.getLogger("lockgate.server")

INFERENCE_SERVICE = "inference.GRPCInferenceService"
CONTROL_HEALTH_SERVICE = "lockgate.control"


def tune_gc() -> None:
    """Move everything loaded so far (sessions, protobuf pools, modules) out of the collector's
    view, and collect the young generation less often. The request path allocates many
    short-lived objects; with the defaults, periodic full passes over the loaded heap showed up
    as ~10 µs per request and in p99."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def open_control_store(settings: ServerSettings) -> Store:
    """SQLite for one machine; PostgreSQL for a fleet, wrapped so that an outage spools
    audit entries and drift snapshots to local disk instead of failing them."""
    store = open_store(settings.store_location())
    if settings.is_shared_store():
        store = ResilientStore(store, settings.spool_dir or settings.state_dir / "spool")
    return store


def prepare_state_dir(settings: ServerSettings) -> None:
    """Create the state directory and say where it is: approvals, drift windows and payloads
    live there, and an operator who cannot find them cannot audit them."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"cannot create the state directory {settings.state_dir}: {exc.strerror or exc}; "
            "pass --state-dir DIR (or set LOCKGATE_STATE_DIR) to a writable place"
        ) from None
    log.info("state directory %s (control-plane store %s)", settings.state_dir.resolve(), settings.store_for_logs())


def load_tokens(settings: ServerSettings) -> Authenticator:
    """The admin principals, and a line saying where they came from (never the tokens)."""
    path = settings.tokens_path()
    authenticator = Authenticator.load(tokens_file=path)
    sources = [str(path)] if path is not None else []
    if os.environ.get("LOCKGATE_TOKENS"):
        sources.append("LOCKGATE_TOKENS")
    if len(authenticator):
        log.info("admin API: %d principal(s) from %s: %s", len(authenticator), " and ".join(sources),
                 ", ".join(authenticator.names))
    else:
        log.info("admin API: no tokens configured (--tokens-file or LOCKGATE_TOKENS): every admin call is refused")
    return authenticator


def _install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.so_reuseport", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    key = Path(tls.key_file).read_bytes()
    cert = Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class GenericHandlersOnly:
    """What the generated ``add_*Servicer_to_server`` helpers see instead of the server: it keeps
    their generic handler and drops the "registered method" copy.

    For every incoming call, grpc.aio's server loop re-arms one pending request per registered
    method and waits on all of them with ``asyncio.wait``: with this gateway's ~35 methods that
    was ~190 µs of profiled time per call (a third of the request's Python). Generic handlers
    share one pending request and are found with one dict lookup in the first handler. Each
    handler is wrapped in ``MetadataCapture``, so a request reads the metadata grpc decoded to
    find it instead of decoding it again.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers([MetadataCapture(handler) for handler in handlers])

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        return None


class Gateway:
    """Everything one serving process owns, started and stopped in order.

    Each part receives what it uses when it is built, or subscribes through the other part's
    hook methods below; nothing reaches into another object's lists.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        prepare_state_dir(settings)
        shared_store = settings.is_shared_store()
        location = settings.store_location()
        self.repository = ModelRepository(settings.model_repository, drain_timeout_s=settings.drain_timeout_s)
        self.control = ControlPlane(
            open_control_store(settings),
            repository_root=settings.model_repository,
            authenticator=load_tokens(settings),
            require_approval=settings.require_approval,
            canary_tick_s=settings.canary_tick_s,
            leader_factory=(lambda elected, lost: elector_for(location, "lockgate/leader", elected, lost,
                                                              lease_s=settings.leader_lease_s))
            if shared_store else LocalLeader,
            provenance=settings.provenance,
        )
        if not settings.require_approval:
            log.warning("require_approval is off: every loaded version may take live traffic (development mode)")
        self.telemetry = Telemetry.from_settings(settings, self.repository)  # opens no port yet
        self.routing = PolicyRouting(self.control)
        self.explain = ExplainService(repository_root=settings.model_repository, state_dir=settings.state_dir,
                                      authenticator=self.control.auth, workers=settings.explain_workers,
                                      nice=settings.explain_nice, cpu_share=settings.explain_cpu_share,
                                      canary_of=self._canary_of)
        self.governance = GovernanceStage(
            repository_root=settings.model_repository, state_dir=settings.state_dir,
            tracing_enabled=self.telemetry.tracing is not None,
            alert_listeners=[self.control.on_drift_event], report_listeners=[self.control.on_drift_report],
            payload_explainer=self.explain.sample,
        )
        self.fleet: FleetDrift | None = None
        if shared_store:
            self.fleet = FleetDrift(self.control.store, self.governance, replica_id=settings.replica(),
                                    window_s=settings.fleet_window_s)
            self.control.add_leader_job(self.fleet.merge_loop)
        self.health = HealthServicer()
        self.repository.set_digester(self.control.digest_for_load)  # signature + digest, one pass
        self.repository.add_verifier(self.control.verify_artifact)
        self.repository.add_version_hooks(self.governance.prepare, self.governance.release)
        if self.fleet is not None:
            self.repository.add_version_hooks(self.fleet.adopt)  # after governance.prepare
        # after governance: explain reads the engine's feature names when it prepares, and (releases
        # running in reverse) logs its pending sampled explanations before the payload log closes
        self.repository.add_version_hooks(self.explain.prepare, self.explain.release)
        self.repository.subscribe(self.control.on_models_changed)
        self.repository.subscribe(self._on_models_changed)
        self.pipeline = InferencePipeline(self.repository, routing=self.routing, governance=self.governance,
                                          explain=self.explain, telemetry=self.telemetry,
                                          limits=settings.limits.for_codec(settings.max_send_message_bytes))
        self.telemetry.register_source("governance", self.governance.metric_samples)
        self.telemetry.register_source("control", self.control.metric_samples)
        self.telemetry.register_source("provenance", self.control.provenance.metric_samples)
        self.telemetry.register_source("explain", self.explain.metric_samples)
        self.control.add_rollback_listener(self.telemetry.rollback)
        self.ready = asyncio.Event()
        self.admin = AdminService(self.control, self.repository)
        self.server = grpc.aio.server(options=server_options(settings))
        self.port = 0
        self.gate = DrainGate()  # admission of data-plane calls (gRPC and HTTP); drained on SIGTERM
        self.http_events = CauseLog(logging.getLogger("lockgate.http"))  # internal, refused_draining
        self.http = self._http_server(settings)
        self.http_port = 0
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task] = []

    def _canary_of(self, model: str) -> tuple[str, str] | None:
        """(stable, canary) of the model's active canary, for the canary-vs-stable importance shift."""
        policy = self.control.book.get(model)
        canary = policy.canary if policy is not None else None
        return (canary.stable, canary.canary) if canary is not None and canary.state.active else None

    def _http_server(self, settings: ServerSettings) -> Any:
        """The REST binding, the admin API over REST and the console, on ``http_port``."""
        if not settings.http_enabled:
            return None
        try:
            from lockgate.transport.http.server import HttpServer
        except ImportError as exc:  # the [http] extra is not installed
            log.warning("HTTP port off: %s (install lockgate[http], or pass --no-http to silence this)", exc)
            return None
        return HttpServer(self.http_app(), host=settings.host, port=settings.http_port, tls=settings.tls,
                          drain_timeout_s=settings.drain_timeout_s)

    def http_app(self) -> Any:
        """The ASGI application of the HTTP port (any ASGI server can carry it)."""
        from lockgate.transport.http.admin import RestAdmin
        from lockgate.transport.http.app import HttpApp
        from lockgate.transport.http.inference import RestInference

        from lockgate.transport.http.console import Console

        settings = self.settings
        rest = RestInference(self.repository, self.pipeline, ready=self.ready, auth=self.control.auth,
                             events=self.http_events)
        key = settings.console_session_key or secrets.token_urlsafe(32)
        console = Console(self.admin, self.control.auth, self.repository, session_key=key.encode(),
                          secure_cookies=settings.tls is not None, state_dir=settings.state_dir,
                          model_repository=settings.model_repository)
        return HttpApp([rest.handle, RestAdmin(self.admin).handle, console.handle],
                       max_body_bytes=settings.max_receive_message_bytes, gate=self.gate, events=self.http_events)

    def _http_samples(self) -> Any:
        """``lockgate_http_events_total{cause}`` at scrape time."""
        for cause, count in self.http_events.counts().items():
            yield Sample("lockgate_http_events", {"cause": cause}, count)

    def _on_models_changed(self, model: str, loaded: list[str], removed: list[str]) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if loaded else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(model, status))

    async def start(self) -> int:
        settings = self.settings
        services = GenericHandlersOnly(self.server)
        self.inference = InferenceService(self.repository, self.pipeline, ready=self.ready,
                                          authenticator=self.control.auth, gate=self.gate)
        add_inference_service(services, self.inference)
        self.telemetry.register_source("grpc", self.inference.metric_samples)
        if self.http is not None:
            self.telemetry.register_source("http", self._http_samples)
        admin_service = add_admin_service(services, self.admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                [INFERENCE_SERVICE, admin_service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME],
                pool=POOL,
            ),
            services,
        )
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{settings.host}:{settings.grpc_port}"
        creds = _credentials(settings)
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise PortInUse(f"cannot bind gRPC port {settings.grpc_port} on {settings.host}: {exc}") from None
        await self.repository.load_all()
        tune_gc()
        await self.control.start()
        loop = asyncio.get_running_loop()
        if self.fleet is not None:
            self._background.append(loop.create_task(self.fleet.ship_loop(self._stopping)))
        self._background.append(loop.create_task(self._watch_store_health()))
        await self.server.start()
        if self.http is not None:
            try:
                self.http_port = await self.http.start()
            except OSError as exc:  # taken since the startup check
                raise PortInUse(f"HTTP port {settings.http_port} on {settings.host} is already in use "
                                f"({exc.strerror})") from None
        try:
            self.telemetry.start()
        except OSError as exc:  # taken since the startup check
            raise PortInUse(f"metrics port {self.telemetry.metrics_port} on {self.telemetry.metrics_host} "
                            f"is already in use ({exc.strerror})") from None
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        log.info("lockgate ready on %s: gRPC %d%s (pid %d)", settings.host, self.port,
                 f", HTTP {self.http_port}" if self.http is not None else "", os.getpid())
        return self.port

    async def _watch_store_health(self) -> None:
        """Health service ``lockgate.control`` reports NOT_SERVING while the store is down.

        The overall service ("") stays SERVING: serving continues on the last policy snapshot,
        and a database outage must not pull every replica out of its load balancer.
        """
        last = None
        while not self._stopping.is_set():
            degraded = self.control.degraded
            if degraded != last:
                status = health_pb2.HealthCheckResponse.NOT_SERVING if degraded else health_pb2.HealthCheckResponse.SERVING
                await self.health.set(CONTROL_HEALTH_SERVICE, status)
                if last is not None:
                    log.warning("control-plane store %s", "unreachable: degraded, spooling writes" if degraded else "reachable again")
                last = degraded
            try:
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Drain: refuse new RPCs, finish every accepted one, then release the models."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.ready.clear()
        await self.health.enter_graceful_shutdown()
        log.info("draining in-flight requests (up to %.0fs)", self.settings.drain_timeout_s)
        await self._drain_calls()
        await self.routing.drain()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.fleet is not None:
            # Ship the open window's rows for the leader to merge; left in the engines, their
            # close() would evaluate (and alert on) this replica's share alone.
            await asyncio.to_thread(self.fleet.ship, self.fleet.window_of(time.time()))
        await self.repository.close()
        await self.explain.close()
        self.governance.close()
        await self.control.close()
        self.telemetry.close()  # flush spans (bounded), close /metrics
        log.info("stopped")

    async def _drain_calls(self) -> None:
        """Every call accepted before SIGTERM gets its real answer (see ``transport.drain``):
        stop listening, serve what already arrived, refuse what comes after with UNAVAILABLE,
        and stop grpc only once nothing is left for it to cancel."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.gate.begin()
        ports = [self.port] + ([self.http_port] if self.http is not None and self.http_port else [])
        shut = sum(stop_listening(port) for port in ports)
        log.info("draining: %d listening socket(s) on port(s) %s shut, new connections are refused "
                 "(grpc logs 'Closing acceptor' for each)", shut, ", ".join(map(str, ports)))
        quiet = await self.gate.wait_quiet(deadline)
        await asyncio.gather(self.server.stop(max(deadline - time.monotonic(), 0.0)),
                             self.http.stop() if self.http is not None else asyncio.sleep(0))
        gate = self.gate
        log.info("drain %s: %d call(s) served after the signal, %d refused with UNAVAILABLE",
                 "complete" if quiet else "timed out", gate.admitted_after_signal, gate.refused)

    async def wait_stopped(self) -> None:
        await self._stopping.wait()


async def serve(settings: ServerSettings) -> None:
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    stop_task: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        log.info("received %s", signal.Signals(signum).name)
        if not stop_task:
            stop_task.append(loop.create_task(gateway.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await gateway.start()
    except PortInUse:
        await gateway.stop()  # release what started (sessions, store) before the one-line exit
        raise
    await gateway.server.wait_for_termination()
    if stop_task:
        await stop_task[0]


def configure_logging(level: str, log_format: str = "text") -> None:
    if log_format == "json":  # native code's stderr lines become JSON too (telemetry.json_logs)
        handler = logging.StreamHandler(wrap_native_stderr())
        handler.setFormatter(JsonLogFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def claim_ports(settings: ServerSettings, workers: int = 1) -> PortClaim:
    """The owner's startup check (single server or supervisor): the metrics ports of every
    worker are free, and the gRPC and HTTP ports are claimed (``transport.ports``). Raises
    ``PortInUse``."""
    metrics = settings.telemetry.metrics
    if metrics.enabled and settings.metrics_port:
        for index in range(workers):
            check_free("metrics", metrics.host or settings.host, settings.metrics_port + index)
    ports = {"gRPC": settings.grpc_port}
    if settings.http_enabled:
        ports["HTTP"] = settings.http_port
    return claim(settings.host, ports)


def _exit_port_in_use(exc: PortInUse) -> None:
    log.error("%s", exc)
    raise SystemExit(2)


def run_single(settings: ServerSettings, *, owns_port: bool = True) -> None:
    """One serving process; ``owns_port=False`` for a worker, whose supervisor claimed its ports."""
    configure_logging(settings.log_level, settings.log_format)
    held = None
    try:
        if owns_port:
            held = claim_ports(settings)
        uv = _install_uvloop()
        log.info("event loop: %s", "uvloop" if uv else "asyncio")
        asyncio.run(serve(settings))
    except PortInUse as exc:
        _exit_port_in_use(exc)
    finally:
        if held is not None:
            held.release()


def _worker_main(settings_json: str, index: int) -> None:
    os.environ["LOCKGATE_WORKER_INDEX"] = str(index)
    run_single(ServerSettings.model_validate_json(settings_json), owns_port=False)


def check_settings(settings: ServerSettings) -> None:
    """Refuse, before anything starts, a configuration that cannot work (``ConfigError``)."""
    ProvenanceGate.check_settings(settings.provenance)


def run(settings: ServerSettings) -> None:
    """Run one process, or ``workers`` processes sharing the port."""
    check_settings(settings)
    if settings.workers <= 1:
        run_single(settings)
        return
    if settings.grpc_port == 0 or (settings.http_enabled and settings.http_port == 0):
        raise SystemExit("--workers > 1 needs a fixed --grpc-port and --http-port: every worker must bind the same ports")
    configure_logging(settings.log_level, settings.log_format)
    try:
        held = claim_ports(settings, settings.workers)  # held until the workers are gone
    except PortInUse as exc:
        _exit_port_in_use(exc)
    ctx = multiprocessing.get_context("spawn")
    # one console session key for every worker: a signed-in browser may reach any of them
    key = settings.console_session_key or secrets.token_urlsafe(32)
    payload = settings.model_copy(update={"workers": 1, "console_session_key": key}).model_dump_json()
    procs = [ctx.Process(target=_worker_main, args=(payload, i), name=f"lockgate-worker-{i}") for i in range(settings.workers)]
    for proc in procs:
        proc.start()
    log.info("started %d workers on port %d: pids %s", len(procs), settings.grpc_port, [p.pid for p in procs])

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    if held is not None:
        held.release()
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise SystemExit(f"workers exited with codes {codes}")
