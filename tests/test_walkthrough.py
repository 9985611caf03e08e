"""docs/walkthrough.md cannot go stale: its commands run against a real ``lockgate demo`` server
and print exactly what the document shows (up to times, hashes, tokens and latencies).

The server is started the way ``make demo`` starts it (``lockgate demo --dir demo-repo``), on
free ports, in a scratch directory; the document's commands then run there in bash, one by
one, as a reader would type them. Regenerate the document's outputs with
``LOCKGATE_WALKTHROUGH_UPDATE=1 pytest tests/test_walkthrough.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lockgate.control.validation import CHECK_NAMES
from lockgate_process import free_port, wait_server_ready
from walkthrough_runner import normalise, parse, rewrite, run_step, update_requested

DOC = Path(__file__).resolve().parent.parent / "docs" / "walkthrough.md"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """``lockgate demo --dir demo-repo`` in a scratch directory, as ``make demo`` runs it."""
    home = tmp_path_factory.mktemp("walkthrough")
    port, metrics = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    env.update({"COLUMNS": "200", "LOCKGATE_GRPC_PORT": str(port)})  # the variable, as an operator would set it
    log = home / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lockgate.cli", "demo", "--dir", "demo-repo",
                                 "--metrics-port", str(metrics), "--host", "127.0.0.1"],
                                cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_server_ready(f"127.0.0.1:{port}", proc, log, timeout=120)
        yield home, env, log
    finally:
        proc.terminate()
        proc.wait(60)


def test_walkthrough_commands_print_what_the_document_shows(demo) -> None:
    home, env, log = demo
    document = DOC.read_text(encoding="utf-8")
    steps = parse(document)
    assert len(steps) >= 10, "the walkthrough tells the whole story in about ten commands"
    outputs: list[str] = []
    mismatches: list[str] = []
    for step in steps:
        code, output = run_step(step, home, env)
        outputs.append(output)
        if code != 0:
            mismatches.append(f"line {step.line}: `{step.command}` exited {code}:\n{output}")
        elif normalise(output) != normalise("\n".join(step.expected)):
            mismatches.append(
                f"line {step.line}: `{step.command}` printed\n{output}\n--- the document shows ---\n"
                + "\n".join(step.expected)
            )
    if update_requested():
        DOC.write_text(rewrite(document, outputs), encoding="utf-8")
        pytest.skip(f"{DOC} rewritten from this run")
    assert not mismatches, "\n\n".join(mismatches) + f"\n\nserver log:\n{log.read_text()[-4000:]}"


def test_walkthrough_leaves_the_story_in_the_evidence(demo) -> None:
    """After the walkthrough the exported evidence names who did what to version 2: rita
    registered, validated and carded it, alex (another person) approved it, oscar moved the
    traffic, and version 2 ended up serving everything."""
    home, _, _ = demo
    bundle = json.loads((home / "evidence.json").read_text())
    done = {(e["actor"], e["action"]) for e in bundle["audit_entries"] if e["subject"].endswith("/2")}
    assert {("rita", "model.register"), ("rita", "model.validate"), ("rita", "model.card"),
            ("alex", "model.approve")} <= done, done
    traffic = {(e["actor"], e["action"]) for e in bundle["audit_entries"] if e["action"].startswith("traffic.")}
    assert {("oscar", "traffic.set"), ("oscar", "traffic.canary.started"), ("oscar", "traffic.canary.promoted")} <= traffic
    report = [r for r in bundle["validation_reports"] if r["version"] == "2"][-1]["body"]
    assert [c["name"] for c in report["checks"]] == list(CHECK_NAMES)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses.pop("provenance") == "not_applicable"  # the demo's versions are not signed
    assert set(statuses.values()) == {"passed"}, report["checks"]
    assert bundle["chain"]["ok"]
    state = {v["version"]: v["state"] for v in bundle["versions"]}
    assert state == {"1": "approved", "2": "serving"}, state
