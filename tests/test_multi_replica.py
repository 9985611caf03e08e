"""Scale-out end to end: two real ``lockgate serve`` replicas sharing one real PostgreSQL.

Covers issue 6's required tests: policy propagation (LISTEN/NOTIFY), concurrent audit
appends (one linear chain), merged drift (the leader's merge equals one process seeing
every row, and a drift seen half on each replica is alerted once), a PostgreSQL outage
under load (no failed request, degraded health, spooled audit entries replayed in order),
and leader failover during a canary. The replicas are shared by the tests (starting two
gateways is the expensive part); each test scopes its audit checks to what it did.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.drift import evaluate, load_windows
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import ReferenceProfile, build_profile
from lockgate.governance.state import merge_all
from lockgate_process import LockgateProcess
from pg_server import PgServer
from replica_helpers import (
    FLEET_WINDOW_S,
    LEADER_LEASE_S,
    NOT_SERVING,
    SERVING,
    Admin,
    Outcome,
    audit_head_seq,
    audit_rows,
    details,
    fire,
    infer_request,
    is_leader,
    leader_of,
    send,
    start_fleet,
    verify_cli,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

WIDTH = 4
PLAIN = "max_batch_size: 32\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n" \
        "governance: {mode: flag, sampling: {rate: 0.0}}\n"
DRIFT_GOVERNANCE = ("governance: {mode: flag, sampling: {rate: 0.0}, "
                    "drift: {window_rows: 1000000, min_rows: 50, keep_windows: 1000}}\n")
DRIFT_CONFIG = "max_batch_size: 32\ndynamic_batching: {max_queue_delay_us: 0}\n" + DRIFT_GOVERNANCE
AUX_MODELS = ("aux1", "aux2", "aux3", "aux4")


def mlp(seed: int):
    return mlp_model([WIDTH, 8, 3], seed=seed, input_name="INPUT0", output_name="OUTPUT0")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    """This module's own PostgreSQL: the outage test stops and restarts it."""
    with PgServer() as server:
        yield server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "models"
    for name, seeds in (("route", (1, 2)), ("route_b", (3, 4)), ("canary", (5, 6))):
        for number, seed in enumerate(seeds, start=1):
            write_model(root, name, number, mlp(seed), PLAIN)
    for i, name in enumerate(AUX_MODELS):
        write_model(root, name, 1, mlp(10 + i), PLAIN)
    write_model(root, "drift", 1, mlp(20), DRIFT_CONFIG)
    reference = np.random.default_rng(0).standard_normal((4000, WIDTH)).astype(np.float32)
    build_profile(reference, model="drift", version="1", input_name="INPUT0").save(
        ReferenceProfile.path_for(root, "drift", "1"))
    return root


@pytest.fixture(scope="module")
def dsn(pg: PgServer) -> str:
    return pg.create_database()


@pytest.fixture(scope="module")
def fleet(repo: Path, dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LockgateProcess]]:
    procs = start_fleet(repo, dsn, tmp_path_factory.mktemp("replicas"))
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate(30)


@pytest.fixture(scope="module")
def admins(fleet: dict[str, LockgateProcess]) -> Iterator[dict[str, Admin]]:
    clients = {rid: Admin(proc.url) for rid, proc in fleet.items()}
    yield clients
    for client in clients.values():
        client.close()


def failures(outcomes: list[Outcome]) -> Counter:
    return Counter((o.code, o.message) for o in outcomes if o.code is not None)


# ------------------------------------------------------------------------------ propagation
def test_policy_set_on_a_is_applied_by_b_within_a_second(fleet, admins) -> None:
    a, b = admins["A"], admins["B"]
    for target in ("1", "2", "1"):
        published = a.set_weights("route", **{f"v{target}": 100})
        t0 = time.monotonic()
        status = wait_for(
            lambda: (s := b.traffic("route")).revision >= published.revision and s,
            timeout=5.0, interval=0.01, what=f"replica B to apply revision {published.revision}",
        )
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"replica B applied the policy after {elapsed:.2f}s (limit 1 s)"
        assert status.revision == published.revision
        assert [(w.version, w.weight) for w in status.weights if w.weight] == [(target, 100)]
        rows = np.ones((1, WIDTH), np.float32)
        outcomes = fire(fleet["B"].url, [infer_request("route", f"p{target}-{i}-{published.revision}", rows)
                                         for i in range(40)])
        assert not failures(outcomes)
        assert {o.version for o in outcomes} == {target}, Counter(o.version for o in outcomes)


# ------------------------------------------------------------------------------ concurrent audit
def test_concurrent_audit_appends_form_one_linear_chain(fleet, admins, dsn) -> None:
    before = audit_head_seq(dsn)
    rounds = 12
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def weights(rid: str, model: str) -> None:
        try:
            barrier.wait(30)
            for i in range(rounds):
                admins[rid].set_weights(model, **({"v1": 100} if i % 2 else {"v2": 100}))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def cards(rid: str, version: str) -> None:
        try:
            barrier.wait(30)
            for i in range(rounds):
                card = {**DEMO_CARD, "owner": f"team-{rid}-{i}"}
                admins[rid].call("SetModelCard", pb.SetModelCardRequest(model="route_b", version=version,
                                                                        card_json=json.dumps(card)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=weights, args=("A", "route")), threading.Thread(target=weights, args=("B", "route_b")),
               threading.Thread(target=cards, args=("A", "1")), threading.Thread(target=cards, args=("B", "2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors

    rows = audit_rows(dsn, after_seq=before)
    assert [r.seq for r in rows] == list(range(before + 1, before + 1 + len(rows))), "the chain has gaps"
    for prev, row in zip(rows, rows[1:]):
        assert row.prev_hash == prev.hash, f"entry {row.seq} does not link to {prev.seq}"
    cards_made = Counter(r.subject for r in rows if r.action == "model.card")
    assert cards_made == {"route_b/1": rounds, "route_b/2": rounds}, cards_made
    per_model = Counter(r.subject for r in rows if r.actor == "olga" and r.action.startswith("traffic."))
    assert per_model == {"route": rounds, "route_b": rounds}, per_model
    result = verify_cli(dsn)
    assert result["ok"] and result["checked"] == result["head_seq"] >= before + 4 * rounds, result


# ------------------------------------------------------------------------------ merged drift
def drift_reference(repo: Path, chunks: list[np.ndarray]):
    """One process (no threads) seeing every row, with the server's config and profile."""
    governance = yaml.safe_load(DRIFT_GOVERNANCE)["governance"]
    config = GovernanceConfig.model_validate(governance)
    profile = ReferenceProfile.load_if_present(repo, "drift", "1")
    assert profile is not None
    engine = GovernanceEngine("drift", "1", config, ["INPUT0"], profile, input_shapes={"INPUT0": [-1, WIDTH]},
                              background=False)
    try:
        for i, chunk in enumerate(chunks):
            engine.inspect({"INPUT0": chunk}, f"ref-{i}")
        state = engine.take_window()
    finally:
        engine.close(final_window=False)
    return state, evaluate(state, profile, config.drift), profile, config


def test_drift_merged_across_replicas_equals_one_process(fleet, admins, dsn, repo) -> None:
    before = audit_head_seq(dsn)
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((180, WIDTH)).astype(np.float32)
    rows[:, 0] += 4.0  # feature 0 drifts far from the N(0, 1) reference; the others do not
    chunks = [rows[i:i + 5] for i in range(0, len(rows), 5)]
    to_a, to_b = chunks[0::2], chunks[1::2]  # half of the drifted rows on each replica

    # Send everything inside one fleet window: start just after a boundary.
    wait_for(lambda: 0.05 < time.time() % FLEET_WINDOW_S < 0.4, FLEET_WINDOW_S + 1, 0.01, "a window start")
    sent_at = time.time()

    async def both() -> list[Outcome]:
        a = fire_chunks(fleet["A"].url, to_a, "a")
        b = fire_chunks(fleet["B"].url, to_b, "b")
        return [o for part in await asyncio.gather(a, b) for o in part]

    outcomes = asyncio.run(both())
    done_at = time.time()
    assert not failures(outcomes)
    window = int(sent_at // FLEET_WINDOW_S)
    assert int(done_at // FLEET_WINDOW_S) == window, "sending took longer than one fleet window"

    # Each replica shipped its half of that window to the store.
    def snapshots() -> dict[str, int]:
        with psycopg.connect(dsn) as conn:
            found = conn.execute("SELECT replica, length(payload) FROM snapshots WHERE model = 'drift' "
                                 "AND version = '1' AND window_id = %s", (window,)).fetchall()
        return {replica: size for replica, size in found}

    assert set(wait_for(lambda: len(snapshots()) == 2 and snapshots(), 15, 0.2, "both replicas' snapshots")) == {"A", "B"}

    # The leader merged and evaluated it once: one governance.drift entry naming feature 0.
    def drift_entries() -> list:
        return [r for r in audit_rows(dsn, after_seq=before) if r.action == "governance.drift" and r.subject == "drift/1"]

    wait_for(drift_entries, 20, 0.2, "the leader's drift alert")
    leader = leader_of(fleet)
    time.sleep(2 * FLEET_WINDOW_S)  # another merge round must not alert again
    alerts = drift_entries()
    assert len(alerts) == 1, [details(a) for a in alerts]
    alert = details(alerts[0])
    assert alert["status"] == "DRIFT" and alert["rows"] == len(rows), alert
    drifted = {f["index"] for f in alert["features"] if f["status"] == "DRIFT"}
    assert 0 in drifted, alert["features"]

    # What the leader evaluated equals one process seeing every row.
    windows = [w for w in load_windows(fleet[leader].state_dir, "drift", "1", last=None) if w.rows]
    assert len(windows) == 1, [(w.start, w.rows) for w in windows]
    merged = merge_all(windows)
    assert merged.windows == 2, "the leader's window should merge two replicas' snapshots"
    reference, ref_report, profile, config = drift_reference(repo, chunks)
    live, ref = merged.tensors["INPUT0"], reference.tensors["INPUT0"]
    assert merged.rows == reference.rows == len(rows)
    for key in ("count", "nan", "inf", "below", "above", "bins", "min", "max"):
        np.testing.assert_array_equal(getattr(live, key), getattr(ref, key), err_msg=key)
    np.testing.assert_allclose(live.sum, ref.sum, rtol=1e-9)
    np.testing.assert_allclose(live.m2, ref.m2, rtol=1e-9)
    report = evaluate(merged, profile, config.drift)
    assert report.status == ref_report.status == "DRIFT"
    live_features = {(f.tensor, f.index): f for f in report.features}
    for expected in ref_report.features:
        got = live_features[(expected.tensor, expected.index)]
        assert got.status == expected.status and got.rows == expected.rows
        for stat in ("psi", "js", "ks", "mean"):
            assert getattr(got, stat) == pytest.approx(getattr(expected, stat), rel=1e-9, abs=1e-12), stat
        assert got.wasserstein == pytest.approx(expected.wasserstein, rel=1e-6)  # KLL is exact below k rows


async def fire_chunks(url: str, chunks: list[np.ndarray], tag: str) -> list[Outcome]:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return list(await asyncio.gather(*(send(stub, infer_request("drift", f"{tag}-{i}", c))
                                           for i, c in enumerate(chunks))))


# ------------------------------------------------------------------------------ outage
class Load:
    """Steady inference on every replica from a background thread until stopped."""

    def __init__(self, urls: list[str], model: str, clients_per_url: int = 3) -> None:
        self.urls = urls
        self.model = model
        self.clients = clients_per_url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        rows = np.full((1, WIDTH), 0.5, np.float32)

        async def client(url: str, n: int) -> None:
            async with grpc.aio.insecure_channel(url) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                i = 0
                while not self._stop.is_set():
                    self.outcomes.append(await send(stub, infer_request(self.model, f"{self.model}-{n}-{i}", rows)))
                    i += 1
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(client(url, k * 100 + n) for k, url in enumerate(self.urls) for n in range(self.clients)))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def unload(proc: LockgateProcess, model: str) -> None:
    with grpc.insecure_channel(proc.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # The fleet has tokens: unloading needs the 'load' permission (alice is admin).
        stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=model), timeout=60,
                                   metadata=(("authorization", "Bearer tok-a"),))


def test_postgres_outage_under_load(fleet, admins, dsn, pg) -> None:
    before = audit_head_seq(dsn)
    for admin in admins.values():
        assert admin.health_status("lockgate.control") == SERVING
    with Load([p.url for p in fleet.values()], "route") as load:
        time.sleep(0.5)
        stopped_at = time.time()
        pg.stop("fast")
        try:
            for rid, admin in admins.items():
                wait_for(lambda: admin.health_status("lockgate.control") == NOT_SERVING, 15, 0.1,
                         f"replica {rid} to report lockgate.control NOT_SERVING")
                assert admin.health_status("") == SERVING
            # Audited actions during the outage: A unloads three models in order, B one.
            for model in AUX_MODELS[:3]:
                unload(fleet["A"], model)
            unload(fleet["B"], AUX_MODELS[3])
            time.sleep(1.5 * FLEET_WINDOW_S)  # at least one window boundary: snapshots are spooled too
            for admin in admins.values():
                assert admin.health_status("") == SERVING
                assert admin.health_status("lockgate.control") == NOT_SERVING
        finally:
            restarted_at = time.time()
            pg.start()
        for rid, admin in admins.items():
            wait_for(lambda: admin.health_status("lockgate.control") == SERVING, 30, 0.1,
                     f"replica {rid} to replay its spool and report SERVING")
        time.sleep(0.3)
    outcomes = load.outcomes
    assert len(outcomes) > 100, len(outcomes)
    assert not failures(outcomes), failures(outcomes)

    rows = audit_rows(dsn, after_seq=before)
    unloads = [r for r in rows if r.action == "model.unload"]
    assert sorted(r.subject for r in unloads) == [f"{m}/1" for m in AUX_MODELS], [r.subject for r in unloads]
    assert all("spooled_at" in details(r) for r in unloads), [r.details for r in unloads]
    from_a = [r for r in unloads if r.subject != f"{AUX_MODELS[3]}/1"]
    assert [r.subject for r in from_a] == [f"{m}/1" for m in AUX_MODELS[:3]], "spooled entries replayed out of order"
    spooled_at = [details(r)["spooled_at"] for r in from_a]
    assert spooled_at == sorted(spooled_at)
    result = verify_cli(dsn)
    assert result["ok"], result

    # Window snapshots made during the outage reached the store too, from both replicas.
    first, last = int(stopped_at // FLEET_WINDOW_S), int(restarted_at // FLEET_WINDOW_S) - 1
    with psycopg.connect(dsn) as conn:
        shipped = conn.execute("SELECT DISTINCT replica FROM snapshots WHERE model = 'route' "
                               "AND window_id BETWEEN %s AND %s", (first, last)).fetchall()
    assert {r[0] for r in shipped} == {"A", "B"}, (first, last, shipped)


# ------------------------------------------------------------------------------ failover
def test_leader_killed_during_canary_other_replica_finishes_it(fleet, admins, dsn) -> None:
    leader = leader_of(fleet)
    follower = next(rid for rid in fleet if rid != leader)
    admin = admins[follower]
    admin.set_weights("canary", v1=100)
    wait_for(lambda: admins[leader].traffic("canary").weights and
             [(w.version, w.weight) for w in admins[leader].traffic("canary").weights if w.weight] == [("1", 100)],
             5, 0.05, "the leader to apply the stable policy")
    before = audit_head_seq(dsn)
    guardrails = pb.Guardrails(min_requests=5, max_error_rate=0.5,
                               disable=["max_disagreement", "max_p99_ratio", "max_error_ratio"])
    started = admin.call("StartCanary", pb.StartCanaryRequest(
        model="canary", version="2", steps=(30, 60, 100), interval_s=1.5, failure_limit=3, guardrails=guardrails),
        token="tok-o")
    assert started.canary.state == "progressing"

    def canary_entries(action: str) -> list:
        return [r for r in audit_rows(dsn, after_seq=before) if r.subject == "canary" and r.action == action]

    with Load([p.url for p in fleet.values()], "canary", clients_per_url=2) as load_both:
        wait_for(lambda: canary_entries("traffic.canary.advanced"), 30, 0.1, "the leader's first analysis")
        assert is_leader(fleet[leader])
        fleet[leader].proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        fleet[leader].proc.wait(10)
    with Load([fleet[follower].url], "canary", clients_per_url=3) as load_follower:
        wait_for(lambda: is_leader(fleet[follower]), 10, 0.05, f"replica {follower} to take over")
        takeover_s = time.monotonic() - killed_at
        final = wait_for(lambda: (s := admin.traffic("canary")).canary.state in ("promoted", "rolled_back") and s,
                         45, 0.1, "the canary to settle on the new leader")
    assert takeover_s < 4 * LEADER_LEASE_S + 2, f"takeover took {takeover_s:.1f}s"
    assert not failures(load_follower.outcomes), failures(load_follower.outcomes)
    assert not [o for o in load_both.outcomes if o.code not in (None, grpc.StatusCode.UNAVAILABLE)]

    decisions = canary_entries("traffic.canary.promoted") + canary_entries("traffic.canary.rolled_back")
    assert len(decisions) == 1, [(r.seq, r.action) for r in decisions]
    assert final.canary.state == decisions[0].action.rsplit(".", 1)[1]
    assert len(canary_entries("traffic.canary.started")) == 1
    steps = [details(r)["step"] for r in canary_entries("traffic.canary.advanced")]
    assert steps == sorted(set(steps)), f"a canary step was analysed twice: {steps}"
    if final.canary.state == "promoted":
        assert [(w.version, w.weight) for w in final.weights if w.weight] == [("2", 100)]
    assert verify_cli(dsn)["ok"]


# ------------------------------------------------------------------------------ shutdown
def test_sigterm_ships_the_open_window_and_releases_leadership(fleet, dsn) -> None:
    """Runs last: stops the surviving replica. Its open window's rows reach the store
    (for the leader to merge) instead of being evaluated alone, and the lease is released."""
    from lockgate.governance.state import WindowState

    alive = [rid for rid, p in fleet.items() if p.proc.poll() is None]
    assert alive, "no replica left running"
    rid = alive[0]
    proc = fleet[rid]
    assert is_leader(proc)
    sent_from = int(time.time() // FLEET_WINDOW_S)
    rows = np.random.default_rng(3).standard_normal((60, WIDTH)).astype(np.float32)
    outcomes = fire(proc.url, [infer_request("drift", f"term-{i}", rows[i:i + 5]) for i in range(0, 60, 5)])
    assert not failures(outcomes)
    before_files = {p.name for p in (proc.state_dir / "drift" / "drift" / "1").glob("window-*.bin")}
    assert proc.terminate(60) == 0
    with psycopg.connect(dsn) as conn:
        payloads = conn.execute("SELECT payload FROM snapshots WHERE model = 'drift' AND version = '1' "
                                "AND replica = %s AND window_id >= %s", (rid, sent_from)).fetchall()
    assert sum(WindowState.from_bytes(bytes(p[0])).rows for p in payloads) == len(rows)
    after_files = {p.name for p in (proc.state_dir / "drift" / "drift" / "1").glob("window-*.bin")}
    assert after_files == before_files, "the replica closed its partial window locally on shutdown"
    assert "lost leadership: released" in proc.log_path.read_text(errors="replace")
