"""Helpers for multi-replica tests: two ``lockgate serve`` processes on one PostgreSQL store.

Why a separate module: the replica fleet (settings, tokens, leader detection, health and
audit reads) is test scaffolding that several scale-out tests share, and keeping it out of
the test file keeps the scenarios readable.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.control.postgres_store import PostgresStore
from lockgate.control.store import AuditRow
from lockgate_process import LOCKGATE, LockgateProcess

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
FLEET_WINDOW_S = 2.0
LEADER_LEASE_S = 1.0
CANARY_TICK_S = 0.2

ELECTED = "this replica is the leader"
LOST = "leadership lost"


#: The fleet's one audit key (every replica MACs and verifies the shared chain with it);
#: set by ``start_fleet``. Each replica keeps its own checkpoint file beside its state dir.
FLEET: dict[str, Path] = {}


def fleet_key(root: Path) -> Path:
    from lockgate.control.audit_key import AuditKey

    path = root / "fleet-audit.key"
    if not path.exists():
        AuditKey.generate(path)
    FLEET["key"] = path
    return path


def replica_env(replica_id: str) -> dict[str, str]:
    """Scale-out settings for one replica, through the ``LOCKGATE_<FIELD>`` environment."""
    return {
        "LOCKGATE_AUDIT_KEY_FILE": str(FLEET["key"]),
        "LOCKGATE_TOKENS": TOKENS,
        "LOCKGATE_REPLICA_ID": replica_id,
        "LOCKGATE_FLEET_WINDOW_S": str(FLEET_WINDOW_S),
        "LOCKGATE_LEADER_LEASE_S": str(LEADER_LEASE_S),
        "LOCKGATE_CANARY_TICK_S": str(CANARY_TICK_S),
    }


def start_replica(repo: Path, dsn: str, replica_id: str, root: Path) -> LockgateProcess:
    """Start (not wait for) one replica with its own state dir and log."""
    fleet_key(root)
    proc = LockgateProcess(
        repo, args=["--store", dsn], env=replica_env(replica_id),
        state_dir=root / f"state-{replica_id}", log_path=root / f"lockgate-{replica_id}.log",
    )
    FLEET[f"checkpoints-{replica_id}"] = proc.checkpoint_file
    return proc


def start_fleet(repo: Path, dsn: str, root: Path, ids: Iterable[str] = ("A", "B")) -> dict[str, LockgateProcess]:
    procs = {rid: start_replica(repo, dsn, rid, root) for rid in ids}
    try:
        for proc in procs.values():
            proc.wait_ready(120)
    except BaseException:
        for proc in procs.values():
            proc.terminate(10)
        raise
    return procs


@contextmanager
def running_fleet(repo: Path, dsn: str, root: Path, ids: Iterable[str] = ("A", "B")) -> Iterator[dict[str, LockgateProcess]]:
    """``start_fleet`` for a fixture: the replicas are stopped (SIGTERM) when it ends."""
    procs = start_fleet(repo, dsn, root, ids)
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate(30)


def is_leader(proc: LockgateProcess) -> bool:
    """The replica's own word (its log): the last leadership line it wrote says 'elected'."""
    text = proc.log()
    return text.rfind(ELECTED) > text.rfind(LOST)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def leader_of(procs: dict[str, LockgateProcess], timeout: float = 15.0) -> str:
    """The one replica that is leader now (waits for an election)."""
    def one() -> str | None:
        leaders = [rid for rid, p in procs.items() if p.proc.poll() is None and is_leader(p)]
        return leaders[0] if len(leaders) == 1 else None

    return wait_for(one, timeout, 0.1, "exactly one leader")


# ---------------------------------------------------------------------------- admin / health
class Admin:
    def __init__(self, url: str) -> None:
        self.channel = grpc.insecure_channel(url)
        self.stub = pb_grpc.AdminServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.inference = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def call(self, method: str, request: Any, token: str = "tok-a") -> Any:
        return getattr(self.stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)

    def set_weights(self, model: str, **weights: int) -> pb.TrafficStatus:
        return self.call("SetWeights", pb.SetWeightsRequest(model=model, weights={k.lstrip("v"): w for k, w in weights.items()}),
                         token="tok-o")

    def traffic(self, model: str) -> pb.TrafficStatus:
        return self.call("GetTraffic", pb.GetTrafficRequest(model=model), token="tok-v")

    def health_status(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def close(self) -> None:
        self.channel.close()


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------- inference
def infer_request(model: str, rid: str, rows: np.ndarray) -> service_pb2.ModelInferRequest:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    req = service_pb2.ModelInferRequest(model_name=model, id=rid)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=list(rows.shape))
    req.raw_input_contents.append(rows.tobytes())
    return req


@dataclass(frozen=True, slots=True)
class Outcome:
    id: str
    code: grpc.StatusCode | None
    version: str = ""
    message: str = ""


async def send(stub: Any, req: service_pb2.ModelInferRequest) -> Outcome:
    try:
        resp = await stub.ModelInfer(req, timeout=60)
    except grpc.aio.AioRpcError as exc:
        return Outcome(req.id, exc.code(), message=exc.details() or "")
    return Outcome(req.id, None, resp.model_version)


async def fire_async(url: str, requests: list, concurrency: int = 8) -> list[Outcome]:
    results: list[Outcome | None] = [None] * len(requests)
    todo = iter(range(len(requests)))
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            for i in todo:
                results[i] = await send(stub, requests[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results  # type: ignore[return-value]


def fire(url: str, requests: list, concurrency: int = 8) -> list[Outcome]:
    return asyncio.run(fire_async(url, requests, concurrency))


# ---------------------------------------------------------------------------- store reads
def audit_rows(dsn: str, after_seq: int = 0) -> list[AuditRow]:
    with PostgresStore(dsn, pool_size=1) as store:
        return store.audit_entries(after_seq=after_seq)


def audit_head_seq(dsn: str) -> int:
    with PostgresStore(dsn, pool_size=1) as store:
        head = store.audit_head()
    return head.seq if head is not None else 0


def details(row: AuditRow) -> dict[str, Any]:
    return json.loads(row.details)


def verify_cli(dsn: str, replica: str = "A") -> dict[str, Any]:
    """``lockgate audit verify --store <dsn> --json``: the operator's offline check, with the
    fleet's key, against one replica's signed checkpoints."""
    result = subprocess.run([*LOCKGATE, "audit", "verify", "--store", dsn, "--json",
                             "--key-file", str(FLEET["key"]), "--checkpoint-file", str(FLEET[f"checkpoints-{replica}"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"audit verify failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)

