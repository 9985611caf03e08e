"""The cost of the keyed audit chain and its checkpoints, before vs after, in one run (issue 15).

*Before* is the control plane as it was at ``--baseline-ref`` (plain SHA-256 chain, one
transaction per append; a policy change published first, then persisted and audited in two
more transactions), extracted with ``git archive`` and run from a temporary directory. *After*
is this tree: HMAC-SHA256 entries, a signed checkpoint every 100 entries and every 10 s, and a
policy change persisted and audited in one transaction before it is published (SQLite groups
concurrent callers' units into one commit).

Measured in separate worker processes, the two variants alternating cell by cell and repeat by
repeat (the order reversed every other repeat); each figure is the median over the repeats,
the ratio the median of per-repeat after/before ratios.

* audit appends/s, SQLite (``synchronous = FULL``) and PostgreSQL (the tests' throwaway
  cluster: ``fsync = off``, so its figures show lockgate's own cost, not the disk's), with one
  and with 8 writer threads;
* audited policy changes/s on SQLite (``PolicyChanges.set_weights`` through the control plane,
  each thread on its own model): goal >= 1,000/s.

    .venv/bin/python benchmarks/bench_audit.py [--repeats 3] [--seconds 2] [--threads 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_REF = "f2129a6"  # the last commit before issue 15's governance changes
GOAL_POLICY_CHANGES = 1000.0


# ------------------------------------------------------------------------------ worker side
def _trail(store: Any, work: Path) -> Any:
    """This tree's keyed trail with a checkpointer, or the baseline's plain one."""
    from lockgate.control.audit import AuditTrail

    try:
        from lockgate.control.audit_key import AuditKey, AuditKeyring
        from lockgate.control.checkpoint import CheckpointLog, Checkpointer
    except ImportError:  # the baseline: no keys, no checkpoints
        return AuditTrail(store)
    key = AuditKey(os.urandom(32))
    log_file = CheckpointLog(work / "checkpoints.jsonl")
    trail = AuditTrail(store, AuditKeyring(key), None, log_file)
    trail.checkpoints = Checkpointer(log_file, key, store.audit_head, every=100, interval_s=10.0)
    trail.checkpoints.start()
    return trail


def _open_store(kind: str, work: Path, dsn: str) -> Any:
    if kind == "sqlite":
        from lockgate.control.sqlite_store import SQLiteStore

        return SQLiteStore(work / "state")
    from lockgate.control.postgres_store import PostgresStore

    return PostgresStore(dsn, pool_size=16)


def _run_threads(threads: int, seconds: float, one: Any) -> float:
    """Call ``one(thread_index, i)`` in ``threads`` threads for ``seconds``; operations per second."""
    stop = threading.Event()
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def loop(index: int) -> None:
        barrier.wait()
        i = 0
        while not stop.is_set():
            one(index, i)
            i += 1
        counts[index] = i

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def worker_appends(kind: str, threads: int, seconds: float, dsn: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = _open_store(kind, work, dsn)
        trail = _trail(store, work)
        trail.append("bench", "bench.warmup", "m/1", {})
        rate = _run_threads(threads, seconds, lambda n, i: trail.append(
            "bench", "bench.event", f"m{n}/1", {"i": i, "note": "an audited event of ordinary size"}))
        if getattr(trail, "checkpoints", None) is not None:
            trail.checkpoints.close()
        store.close()
        return rate


def worker_policy(threads: int, seconds: float) -> float:
    from lockgate.control.auth import Authenticator
    from lockgate.control.plane import ControlPlane
    from lockgate.control.sqlite_store import SQLiteStore

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = SQLiteStore(work / "state")
        kwargs: dict[str, Any] = {"repository_root": work / "repo", "authenticator": Authenticator([]),
                                  "require_approval": False}
        try:
            plane = ControlPlane(store, audit=_trail(store, work), **kwargs)
        except TypeError:  # the baseline builds its own trail
            plane = ControlPlane(store, **kwargs)
        models = [f"m{n}" for n in range(threads)]
        plane._loaded = {m: frozenset({"1", "2"}) for m in models}
        for model in models:
            plane.changes.set_weights(model, {"1": 100}, actor="bench")

        def change(n: int, i: int) -> None:
            plane.changes.set_weights(models[n], {"1": 1 + i % 99, "2": 99 - i % 99}, actor="bench")

        rate = _run_threads(threads, seconds, change)
        checkpoints = getattr(plane.audit, "checkpoints", None)
        if checkpoints is not None:
            checkpoints.close()
        store.close()
        return rate


# ------------------------------------------------------------------------------ driver side
def baseline_tree(ref: str, into: Path) -> Path:
    """``src/`` of ``ref`` (git archive), importable with PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref, "src/lockgate"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"cannot extract the baseline {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def measure(variant_path: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": f"{variant_path}{os.pathsep}{REPO_ROOT}"}
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{run.stderr}")
    return float(json.loads(run.stdout.strip().splitlines()[-1])["rate"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--worker", nargs="*")
    args = parser.parse_args()
    if args.worker is not None:
        mode, *rest = args.worker
        if mode == "append":
            rate = worker_appends(rest[0], int(rest[1]), float(rest[2]), rest[3] if len(rest) > 3 else "")
        else:
            rate = worker_policy(int(rest[0]), float(rest[1]))
        print(json.dumps({"rate": rate}))
        return

    threads = [int(t) for t in args.threads.split(",")]
    cells: list[tuple[str, list[str]]] = []
    for t in threads:
        cells.append((f"audit appends/s, SQLite, {t} thread(s)", ["append", "sqlite", str(t), str(args.seconds)]))
    pg = None
    if not args.no_postgres:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from pg_server import PgServer

        pg = PgServer().__enter__()
        for t in threads:
            cells.append((f"audit appends/s, PostgreSQL, {t} thread(s)", ["append", "pg", str(t), str(args.seconds)]))
    for t in threads:
        cells.append((f"audited policy changes/s, SQLite, {t} thread(s)", ["policy", str(t), str(args.seconds)]))

    results: dict[str, dict[str, list[float]]] = {name: {"before": [], "after": []} for name, _ in cells}
    ratios: dict[str, list[float]] = {name: [] for name, _ in cells}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            variants = {"before": baseline_tree(args.baseline_ref, Path(tmp)), "after": REPO_ROOT / "src"}
            for repeat in range(args.repeats):
                order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
                for name, cell in cells:
                    got = {}
                    for variant in order:
                        cell_args = list(cell)
                        if cell[0] == "append" and cell[1] == "pg":
                            cell_args.append(pg.create_database())  # type: ignore[union-attr]
                        got[variant] = measure(variants[variant], cell_args)
                        results[name][variant].append(got[variant])
                    ratios[name].append(got["after"] / got["before"])
                    print(f"repeat {repeat + 1}: {name}: before {got['before']:,.0f}, after {got['after']:,.0f}",
                          file=sys.stderr, flush=True)
    finally:
        if pg is not None:
            pg.__exit__(None, None, None)

    print(f"\nbaseline: {args.baseline_ref}; medians of {args.repeats} repeats x {args.seconds:g} s\n")
    print("| | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for name, _ in cells:
        before = statistics.median(results[name]["before"])
        after = statistics.median(results[name]["after"])
        print(f"| {name} | {before:,.0f} | {after:,.0f} | {statistics.median(ratios[name]):.2f} |")
    best = max(statistics.median(results[name]["after"]) for name, _ in cells if name.startswith("audited policy"))
    verdict = "met" if best >= GOAL_POLICY_CHANGES else "MISSED"
    print(f"\naudited policy changes/s on SQLite, best thread count: {best:,.0f} (goal >= {GOAL_POLICY_CHANGES:,.0f}: {verdict})")


if __name__ == "__main__":
    main()
