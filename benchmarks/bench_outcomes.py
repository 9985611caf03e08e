"""Outcome governance cost and speed, in one run (issue 17).

1. **Inference with the prediction ledger on vs off.** Two lockgate servers on two
   repositories holding the same batch-1 ``mlp`` model: ``ledger-off`` without an
   ``outcomes:`` section, ``ledger-on`` with one (multiclass, 4 classes, a binned segment
   from an input feature, so the request path copies a column; requests carry no id, so the
   server generates one per request). h2load at 1 and 128 in flight, interleaved (the
   order of the two targets reversed every other repeat); on/off is the median of the
   per-repeat ratios. Target: >= 0.95.
2. **Feedback ingestion.** A server with a ledger of known ids (batch-64 requests); labels go
   through one ``StreamFeedback`` client stream (messages of 4,096 labels), each label new.
   labels/s is the client's wall time from the first message to the summary, median of the
   repeats. On SQLite (target >= 20,000 labels/s) and on PostgreSQL (reported).
3. **Ledger bytes per prediction row on disk** (SQLite ``dbstat``: the ledger table and its
   index, after the ledger is written; and after the labels joined). Target <= 128.

    .venv/bin/python benchmarks/bench_outcomes.py [--levels 1,128] [--repeats 5] [--duration 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np
import yaml

from benchmarks.harness import Cell, Harness, prepare_workload
from benchmarks.models import MLP, write_repository
from benchmarks.servers import LOCKGATE_BIN, REPO_ROOT, RunningServer, install_cleanup, lockgate_target

TARGETS = ("ledger-off", "ledger-on")
GOAL_RATIO = 0.95
GOAL_LABELS_PER_S = 20_000
GOAL_BYTES_PER_ROW = 128
INGEST_ROWS_PER_REQUEST = 64
STREAM_MESSAGE = 4096


def outcomes_section(queue_rows: int = 65_536) -> dict[str, Any]:
    return {
        "task": "multiclass",
        "class_names": ["a", "b", "c", "d"],
        "segments": {"band": {"input": MLP.input_name, "feature": 0, "bins": [-1.0, 0.0, 1.0]}},
        "ledger": {"queue_rows": queue_rows},
    }


def write_repo(root: Path, outcomes: dict[str, Any] | None) -> Path:
    repo = write_repository(root, specs=(MLP,))
    config_path = repo / MLP.name / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    if outcomes is not None:
        config["outcomes"] = outcomes
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return repo


def metric(port: int, family: str, **labels: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics_port(server: RunningServer) -> int:
    argv = server.target.argv
    return int(argv[argv.index("--metrics-port") + 1])


# -- 1: inference A/B ------------------------------------------------------------------------------
def inference_table(cells: dict[tuple[str, str, int], Cell], levels: list[int]) -> tuple[str, dict[str, Any]]:
    lines = ["| config | in flight | req/s (median) | on/off (median of paired repeats) | server CPU µs/request "
             "| CPU off/on (median of paired) | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    goals: dict[str, Any] = {}
    for level in levels:
        off = cells.get(("ledger-off", f"{MLP.name}-unary", level))
        for name in TARGETS:
            cell = cells.get((name, f"{MLP.name}-unary", level))
            if cell is None or off is None:
                continue
            pairs = [r.requests_per_s / o.requests_per_s for r, o in zip(cell.runs, off.runs) if o.requests_per_s]
            cpu = [o.server_cpu_us_per_request / r.server_cpu_us_per_request for r, o in zip(cell.runs, off.runs)
                   if r.server_cpu_us_per_request > 0 and not math.isnan(o.server_cpu_us_per_request)]
            ratio = statistics.median(pairs) if pairs else math.nan
            cpu_ratio = statistics.median(cpu) if cpu else math.nan
            lines.append(f"| {name} | {level} | {cell.median('requests_per_s'):,.0f} | {ratio:.3f} | "
                         f"{cell.median('server_cpu_us_per_request'):.0f} | {cpu_ratio:.3f} | {cell.median('p50_ms'):.3f} | "
                         f"{cell.median('p99_ms'):.2f} | {cell.errors} |")
            if name == "ledger-on":
                goals[f"c={level}"] = {"ratio": ratio, "paired_ratios": pairs, "cpu_ratio": cpu_ratio,
                                       "bound": GOAL_RATIO, "met": None if math.isnan(ratio) else ratio >= GOAL_RATIO}
    return "\n".join(lines), goals


# -- 2 + 3: ingestion and bytes ----------------------------------------------------------------------
async def fill_ledger(port: int, rows: int, prefix: str) -> None:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    data = np.random.default_rng(1).standard_normal((INGEST_ROWS_PER_REQUEST, MLP.input_dim)).astype(np.float32)
    payload = data.tobytes()
    requests = rows // INGEST_ROWS_PER_REQUEST
    todo = iter(range(requests))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            for i in todo:
                req = pb.ModelInferRequest(model_name=MLP.name, id=f"{prefix}-{i}")
                req.inputs.add(name=MLP.input_name, datatype="FP32", shape=list(data.shape))
                req.raw_input_contents.append(payload)
                await stub.ModelInfer(req, timeout=60)

        await asyncio.gather(*(worker() for _ in range(8)))


def wait_rows(store: Any, rows: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = store.count_predictions(MLP.name)
        if n >= rows or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def stream_labels(port: int, prefix: str, requests: range) -> tuple[float, Any]:
    from lockgate._proto.lockgate import feedback_pb2 as fpb
    from lockgate._proto.lockgate import feedback_pb2_grpc as fpb_grpc

    labels = [fpb.Label(request_id=f"{prefix}-{i}", row=r, class_index=(i + r) % 4)
              for i in requests for r in range(INGEST_ROWS_PER_REQUEST)]
    messages = [fpb.FeedbackBatch(model=MLP.name if k == 0 else "", labels=labels[k : k + STREAM_MESSAGE])
                for k in range(0, len(labels), STREAM_MESSAGE)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = fpb_grpc.FeedbackServiceStub(channel)
        start = time.perf_counter()
        summary = stub.StreamFeedback(iter(messages), timeout=600)
        elapsed = time.perf_counter() - start
    return len(labels) / elapsed, summary


def ledger_bytes(db: Path) -> tuple[int, int]:
    """(bytes of the ledger table and its index, rows) from SQLite's dbstat."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        size = conn.execute("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN "
                            "('outcome_predictions', 'outcome_predictions_by_time')").fetchone()[0]
        rows = conn.execute("SELECT COUNT(*) FROM outcome_predictions").fetchone()[0]
    return int(size), int(rows)


def ingest(harness: Harness, work: Path, backend: str, rows: int, repeats: int, dsn: str | None) -> dict[str, Any]:
    from lockgate.control.store import open_store
    from lockgate.outcomes.store import OutcomeStore

    repo = write_repo(work / f"repo-ingest-{backend}", outcomes_section(queue_rows=1 << 20))
    state = work / f"state-ingest-{backend}"
    target = lockgate_target(repo, state, name=f"ingest-{backend}", extra_args=("--store", dsn) if dsn else ())
    server = harness.start(target, [MLP.name])
    if server is None:
        return {"error": harness.failures.get((target.name, "start"))}
    per_repeat = rows // repeats // INGEST_ROWS_PER_REQUEST
    started = time.perf_counter()
    asyncio.run(fill_ledger(server.port, per_repeat * repeats * INGEST_ROWS_PER_REQUEST, "p"))
    store = OutcomeStore(open_store(dsn or str(state / "lockgate.db")))  # type: ignore[arg-type]
    try:
        written = wait_rows(store, per_repeat * repeats * INGEST_ROWS_PER_REQUEST)
    finally:
        store.close()
    fill_s = time.perf_counter() - started
    result: dict[str, Any] = {"backend": backend, "ledger_rows": written, "fill_rows_per_s": written / fill_s}
    if dsn is None:
        size, counted = ledger_bytes(state / "lockgate.db")
        result["bytes_per_row_unlabeled"] = size / max(counted, 1)
    rates, summaries = [], []
    for k in range(repeats):
        rate, summary = stream_labels(server.port, "p", range(k * per_repeat, (k + 1) * per_repeat))
        rates.append(rate)
        summaries.append({"received": summary.received, "accepted": summary.accepted, "unknown": summary.unknown,
                          "duplicate": summary.duplicate})
        harness.log(f"{backend}: {rate:,.0f} labels/s ({summary.accepted} accepted of {summary.received})")
    result.update(labels_per_s=statistics.median(rates), runs=rates, summaries=summaries,
                  dropped=metric(metrics_port(server), "lockgate_outcome_dropped_total"))
    if dsn is None:
        size, counted = ledger_bytes(state / "lockgate.db")
        result["bytes_per_row_labeled"] = size / max(counted, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--ingest-rows", type=int, default=196_608, help="ledger rows labeled (split over 3 repeats)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL ingestion figure")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    if not LOCKGATE_BIN.exists():
        print(f"{LOCKGATE_BIN} not found", file=sys.stderr)
        return 2
    install_cleanup()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-outcomes-") as tmp:
        work = Path(tmp)
        repos = {"ledger-off": write_repo(work / "repo-off", None), "ledger-on": write_repo(work / "repo-on", outcomes_section())}
        workload = prepare_workload(MLP, repos["ledger-on"] / MLP.name / "1" / "model.onnx", work)
        with Harness(work / "logs", args.duration) as harness:
            for name in TARGETS:
                harness.start(lockgate_target(repos[name], work / f"state-{name}", name=name), [MLP.name])
            cells = harness.run([n for n in TARGETS if n in harness.servers], [workload], levels, args.repeats, alternate=True)
            healthy = harness.recheck([workload])
            on = harness.servers.get("ledger-on")
            recorded = dropped = math.nan
            if on is not None:
                time.sleep(1.0)  # the writer's last batch
                recorded = metric(metrics_port(on), "lockgate_outcome_predictions_total")
                dropped = metric(metrics_port(on), "lockgate_outcome_dropped_total")
            table, goals = inference_table(cells, levels)
            result.update(cells=[c.as_dict() for c in cells.values()], goals=goals, healthy_after=healthy,
                          ledger_recorded=recorded, ledger_dropped=dropped)
            for name in list(harness.servers):
                harness.servers.pop(name).stop()
            ingestion = {"sqlite": ingest(harness, work, "sqlite", args.ingest_rows, 3, None)}
            if not args.no_postgres:
                sys.path.insert(0, str(REPO_ROOT / "tests"))
                from pg_server import PgServer

                with PgServer() as pg:
                    ingestion["postgresql"] = ingest(harness, work, "postgresql", args.ingest_rows, 3, pg.create_database())
            result["ingestion"] = ingestion
    print(f"\nPrediction ledger on vs off, {MLP.name} batch-1 unary, {args.repeats} repeats x {args.duration:g} s; "
          f"ledger rows recorded during the run: {recorded:,.0f}, dropped: {dropped:,.0f}\n")
    print(table)
    sqlite_result = ingestion["sqlite"]
    lines = ["| measure | value | target | met |", "|---|---:|---:|---|"]
    for level, goal in goals.items():
        lines.append(f"| inference req/s ledger on / off ({level}) | {goal['ratio']:.3f} | >= {GOAL_RATIO} | "
                     f"{'yes' if goal['met'] else '**no**'} |")
    for backend, r in ingestion.items():
        if "labels_per_s" in r:
            bound = f">= {GOAL_LABELS_PER_S:,}" if backend == "sqlite" else "reported"
            met = ("yes" if r["labels_per_s"] >= GOAL_LABELS_PER_S else "**no**") if backend == "sqlite" else "-"
            lines.append(f"| feedback labels/s, one client stream ({backend}; median of {len(r['runs'])}) | "
                         f"{r['labels_per_s']:,.0f} | {bound} | {met} |")
    for key in ("bytes_per_row_unlabeled", "bytes_per_row_labeled"):
        if key in sqlite_result:
            value = sqlite_result[key]
            lines.append(f"| ledger bytes per prediction row on disk, SQLite ({key.split('_')[-1]}) | {value:.1f} | "
                         f"<= {GOAL_BYTES_PER_ROW} | {'yes' if value <= GOAL_BYTES_PER_ROW else '**no**'} |")
    summary = "\n".join(lines)
    print("\n" + summary)
    result["markdown"] = table + "\n\n" + summary
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"outcomes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out_file}")
    errors = sum(c.errors for c in cells.values())
    return 1 if errors or not all(healthy.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
