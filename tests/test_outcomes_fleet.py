"""Outcomes on a fleet: two real replicas sharing one real PostgreSQL.

A prediction served by replica A is labeled through replica B (the join runs in the shared
ledger), a label sent to both replicas at once is accepted exactly once, and the leader's
merged window equals the state one process computes from every row.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from conftest import write_model
from lockgate._proto.lockgate import feedback_pb2 as fpb
from lockgate._proto.lockgate import feedback_pb2_grpc as fpb_grpc
from lockgate.control.postgres_store import PostgresStore
from lockgate.outcomes.fairness import fairness
from lockgate.outcomes.quality import quality
from lockgate.outcomes.service import compile_spec
from lockgate.outcomes.state import OutcomeWindow
from lockgate.outcomes.store import OutcomeStore
from lockgate.outcomes.windows import merged
from lockgate_process import LockgateProcess
from pg_server import PgServer
from replica_helpers import leader_of, running_fleet, wait_for
from test_outcomes_server import label, linear_classifier, predict_all

pytestmark = pytest.mark.timeout(600)

CONFIG = """max_batch_size: 64
dynamic_batching: {max_queue_delay_us: 0}
outcomes:
  task: binary
  class_names: [deny, approve]
  segments:
    gender: {parameter: gender, categories: [f, m]}
  protected: [gender]
  fairness: {min_group_size: 10}
  windows: {seconds: 3600}
"""
TOKEN = (("authorization", "Bearer tok-a"),)


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with PgServer() as server:
        yield server.create_database()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outcome-fleet") / "models"
    write_model(root, "fleet", 1, linear_classifier([[0, 2], [0, 1]], [0, 0]), CONFIG)
    return root


@pytest.fixture(scope="module")
def fleet(repo: Path, dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LockgateProcess]]:
    with running_fleet(repo, dsn, tmp_path_factory.mktemp("outcome-replicas")) as procs:
        yield procs


def send(url: str, labels: list, model: str = "fleet") -> fpb.FeedbackSummary:
    with grpc.insecure_channel(url) as channel:
        return fpb_grpc.FeedbackServiceStub(channel).SendFeedback(
            fpb.FeedbackBatch(model=model, labels=labels), metadata=TOKEN, timeout=120)


def test_label_joins_across_replicas_and_the_leaders_merge_equals_one_process(
        fleet: dict[str, LockgateProcess], dsn: str, repo: Path) -> None:
    rng = np.random.default_rng(4)
    rows = 5
    served: dict[str, list] = {}
    inputs: dict[str, list[np.ndarray]] = {}
    genders: dict[str, list[str]] = {}
    for rid in ("A", "B"):
        inputs[rid] = [rng.standard_normal((rows, 2)).astype(np.float32) for _ in range(200)]
        genders[rid] = [str(rng.choice(["f", "m"])) for _ in range(200)]
        served[rid] = asyncio.run(predict_all(fleet[rid].url, "fleet", inputs[rid], [{"gender": g} for g in genders[rid]],
                                              ids=[f"{rid}-{i}" for i in range(200)]))
    outcome_store = OutcomeStore(PostgresStore(dsn, pool_size=2))
    try:
        wait_for(lambda: outcome_store.count_predictions("fleet") == 2000, 60, what="both replicas' ledger rows")
        truth = {rid: [(x[:, 0] + 0.5 * rng.standard_normal(rows) > 0).astype(int) for x in inputs[rid]] for rid in inputs}

        def labels_of(rid: str, part: slice) -> list:
            return [label(f"{rid}-{i}", r, bool(truth[rid][i][r])) for i in range(200)[part] for r in range(rows)]

        # A's predictions labeled through B and B's through A
        assert send(fleet["B"].url, labels_of("A", slice(0, 150))).accepted == 750
        assert send(fleet["A"].url, labels_of("B", slice(0, 150))).accepted == 750
        # the same labels sent to both replicas at once: each accepted exactly once
        results: dict[str, fpb.FeedbackSummary] = {}
        race = labels_of("A", slice(150, 200)) + labels_of("B", slice(150, 200))
        threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, send(fleet[r].url, race))) for r in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["A"].accepted + results["B"].accepted == 500
        assert results["A"].duplicate + results["B"].duplicate == 500
        assert outcome_store.count_predictions("fleet", labeled=True) == 2000

        # one process seeing every row
        config = yaml.safe_load((repo / "fleet" / "config.yaml").read_text())["outcomes"]
        spec = compile_spec("fleet", config, [("OUTPUT0", (-1, 2))], [("INPUT0", (-1, 2))])
        expected = OutcomeWindow.empty(spec, "1", 0)
        for rid in ("A", "B"):
            for i, (_, _, out) in enumerate(served[rid]):
                p = out[:, 1].astype(np.float64)
                pred = (p >= 0.5).astype(np.int64)
                cells = np.full(rows, spec.segments[0].code_of_text(genders[rid][i]), np.int64)
                expected.add_predictions(cells, pred)
                expected.add_labels(spec, cells, truth[rid][i], pred, p, np.zeros(rows))
        states = merged(outcome_store, spec)["1"].windows
        assert len(states) == 1 and states[0].replicas >= 2  # rows from both replicas in one window
        stored = states[0]
        for name in ("predicted", "confusion", "hist", "calib_count", "calib_hit", "scored"):
            assert np.array_equal(stored[name], expected[name]), name
        np.testing.assert_allclose(stored["loss"], expected["loss"], rtol=1e-12)
        np.testing.assert_allclose(stored["calib_conf"], expected["calib_conf"], rtol=1e-12)
        leader = leader_of(fleet)
        with grpc.insecure_channel(fleet[leader].url) as channel:
            report = json.loads(fpb_grpc.FeedbackServiceStub(channel).GetOutcomes(
                fpb.OutcomesRequest(model="fleet"), metadata=TOKEN, timeout=60).report_json)
        total = report["versions"]["1"]["total"]
        ours = quality(expected, spec)
        assert total["quality"]["predictions"] == ours["predictions"] == 2000
        assert total["quality"]["labeled"] == 2000
        for metric in ("accuracy", "precision", "recall", "f1", "specificity", "log_loss", "brier", "auc", "ece"):
            assert total["quality"]["metrics"][metric]["value"] == pytest.approx(ours["metrics"][metric]["value"], abs=1e-12), metric
        assert total["quality"]["metrics"]["confusion_matrix"] == ours["metrics"]["confusion_matrix"]
        theirs = total["fairness"][0]["summary"]
        mine = fairness(expected, spec)[0]["summary"]
        for key in ("demographic_parity_difference", "equalized_odds_difference", "tpr_gap", "fpr_gap"):
            assert theirs[key]["value"] == pytest.approx(mine[key]["value"], abs=1e-12), key
    finally:
        outcome_store.close()
