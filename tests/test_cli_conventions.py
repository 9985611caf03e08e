"""CLI conventions over the whole command tree, and ``--json`` of every command on a real server.

The tree checks walk the click command that ``lockgate`` runs (``lockgate.cli.command()``),
so a command added later is held to the same rules without editing this file: every
command has ``--json``; every option has help that states its default (or is required, or a
flag); help shows ``MODEL VERSION`` and no ``<bool>``/``{model}``; command and group help
starts with a capital letter. The ``--json`` test runs each command in process against a
gated ``lockgate serve`` of the demo repository and checks the fields its table shows.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.core import TyperArgument, TyperOption

from drift_traffic import demo_traffic, serve_windows
from lockgate.cli import command
from lockgate.cli_common import UNBOUNDED_WIDTH, make_console, walk
from lockgate.control.validation import CHECK_NAMES
from lockgate.governance.profile import ReferenceProfile
from lockgate_process import LockgateProcess

LOCAL_OPTIONS = {"--help", "--install-completion", "--show-completion"}


def _commands() -> list[tuple[tuple[str, ...], object]]:
    return walk(command())


def _help_text(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    code = command().main(args=[*path, "--help"], prog_name="lockgate", standalone_mode=False)
    assert code in (0, None)
    return capsys.readouterr().out


def test_every_command_has_json() -> None:
    missing = [" ".join(path) for path, cmd in _commands()
               if not any("--json" in getattr(p, "opts", ()) for p in cmd.params)]
    assert not missing, f"commands without --json: {missing}"


def test_every_option_has_help_with_its_default() -> None:
    problems = []
    for path, cmd in _commands():
        for param in cmd.params:
            if not isinstance(param, TyperOption) or set(param.opts) & LOCAL_OPTIONS:
                continue
            name = f"{' '.join(path)} {param.opts[0]}"
            text = param.help or ""
            if not text.strip():
                problems.append(f"{name}: no help")
                continue
            shown = param.show_default is not False and param.default is not None and not callable(param.default)
            if not (param.required or (param.is_flag and not param.secondary_opts) or shown or "[default:" in text):
                problems.append(f"{name}: help does not say what happens without it")
            if not text[0].isupper():
                problems.append(f"{name}: help starts in lower case: {text!r}")
        for param in cmd.params:
            if isinstance(param, TyperArgument) and not (param.help or "").strip():
                problems.append(f"{' '.join(path)} {param.name}: argument without help")
    assert not problems, "\n".join(problems)


def test_group_and_command_help_start_with_a_capital(capsys: pytest.CaptureFixture[str]) -> None:
    root = command()
    lower = []

    def visit(cmd, path):
        text = (cmd.help or "").strip()
        if path and text and not text[0].isupper():
            lower.append(f"{' '.join(path)}: {text[:40]!r}")
        for name, sub in getattr(cmd, "commands", {}).items():
            visit(sub, (*path, name))

    visit(root, ())
    assert not lower, lower


@pytest.mark.parametrize("path", [("models", "approve"), ("traffic", "canary", "start"), ("traffic", "set"), ("serve",)])
def test_help_shows_names_not_typer_placeholders(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help_text(path, capsys)
    for placeholder in ("<bool>", "<str>", "<int>", "<path>", "{model}", "{version}"):
        assert placeholder not in text, (placeholder, text)
    usage = {("models", "approve"): "MODEL VERSION", ("traffic", "canary", "start"): "MODEL VERSION",
             ("traffic", "set"): "MODEL VERSION=WEIGHT..."}
    if path in usage:
        assert f"Usage: lockgate {' '.join(path)} [OPTIONS] {usage[path]}" in text, text


def test_canary_guardrails_show_the_servers_defaults() -> None:
    from lockgate.routing.policy import Guardrails

    defaults = Guardrails()
    start = dict(walk(command()))[("traffic", "canary", "start")]
    helps = {p.opts[0]: p.help or "" for p in start.params if isinstance(p, TyperOption)}
    expected = {"--max-error-rate": f"{defaults.max_error_rate:g}", "--max-p99-ratio": f"{defaults.max_p99_ratio:g}",
                "--max-disagreement": f"{defaults.max_disagreement:g}", "--min-requests": str(defaults.min_requests),
                "--max-error-ratio": "off", "--max-p99-ms": "off", "--failure-limit": "3",
                "--fail-on-drift": "fail-on-drift"}
    for option, value in expected.items():
        assert f"[default: {value}]" in helps[option], (option, helps[option])


def test_output_is_full_width_when_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.table import Table

    monkeypatch.delenv("COLUMNS", raising=False)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    console = make_console()
    assert console.width == UNBOUNDED_WIDTH
    table = Table(title="wide")
    for column in ("a", "b", "c"):
        table.add_column(column)
    cell = "x" * 70
    table.add_row(cell, cell, cell)
    console.print(table)
    text = buffer.getvalue()
    assert text.count(cell) == 3 and "…" not in text  # nothing cut at 80 columns
    assert "\x1b[" not in text  # no colour codes in a pipe
    monkeypatch.setenv("COLUMNS", "120")
    assert make_console().width == 120


# ---------------------------------------------------------------------- --json on a real server
def _exports(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().removeprefix("export ")
        if "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli-json")
    repo = root / "demo-repo"
    built = subprocess.run([sys.executable, "-m", "lockgate.cli", "demo", "--dir", str(repo), "--build-only", "--json"],
                           capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads(built.stdout)
    assert summary["approved_versions"] == ["1"] and summary["candidate_versions"] == ["2"]
    assert {p["name"]: p["role"] for p in summary["people"]} == {"rita": "admin", "alex": "approver",
                                                                 "oscar": "operator", "vera": "viewer"}
    tokens = _exports(Path(summary["tokens_env_file"]))
    with LockgateProcess(repo, gated=True, state_dir=repo / ".lockgate") as proc:
        # Delivered after start, as in the walkthrough: registered by a person, not discovered.
        shutil.copytree(repo / ".candidates" / "credit" / "2", repo / "credit" / "2")
        yield proc, repo, tokens


SEEN: set[tuple[str, ...]] = set()  # commands the tests below ran with --json


def _runner(server: LockgateProcess, capsys: pytest.CaptureFixture[str]):
    def run(*args: str, token: str | None = None, local: bool = False):
        SEEN.add(tuple(args[:3]) if args[:2] == ("traffic", "canary") else tuple(args[:2]))
        return _run(list(args), capsys, None if local else server, token)[1]

    return run


def _run(args: list[str], capsys: pytest.CaptureFixture[str], server: LockgateProcess | None = None,
         token: str | None = None) -> tuple[int, object]:
    argv = [*args, "--json"]
    if server is not None:
        argv += ["--server", server.url]
    if token is not None:
        argv += ["--token", token]
    code = command().main(args=argv, prog_name="lockgate", standalone_mode=False)
    captured = capsys.readouterr()
    assert code in (0, None), f"{args}: exit {code}\n{captured.out}\n{captured.err}"
    return 0, json.loads(captured.out)


def test_every_command_prints_parseable_json_with_the_table_fields(demo_server, capsys, tmp_path: Path) -> None:
    server, repo, t = demo_server
    rita, alex, oscar, vera = t["RITA_TOKEN"], t["ALEX_TOKEN"], t["OSCAR_TOKEN"], t["VERA_TOKEN"]
    run = _runner(server, capsys)

    listed = run("models", "list", token=vera)
    row = next(v for v in listed if v["version"] == "1")
    assert {"model", "version", "state", "can_serve", "loaded", "registered_by", "sha256", "updated_at"} <= set(row)
    assert row["state"] == "approved" and row["registered_by"] == "rita" and row["can_serve"] and row["loaded"]

    registered = run("models", "register", "credit", "2", token=rita)
    assert registered["state"] == "registered" and registered["registered_by"] == "rita" and len(registered["sha256"]) == 64

    report = run("models", "validate", "credit", "2", token=rita)
    assert [c["name"] for c in report["checks"]] == list(CHECK_NAMES)
    assert all(c["detail"] for c in report["checks"])
    assert {c["name"]: c["status"] for c in report["checks"]} == {**dict.fromkeys(CHECK_NAMES, "passed"),
                                                                  "provenance": "not_applicable"}
    signature = next(c for c in report["checks"] if c["name"] == "signature")
    assert signature["data"]["compared_with"] == "version 1, which serves now"

    card = run("models", "card", "credit", "2", "--file", str(repo / "credit" / "2" / "card.yaml"), token=rita)
    assert isinstance(card["card_id"], int) and card["owner"] == "risk-ml@example.com"

    approved = run("models", "approve", "credit", "2", "--reason", "held-out accuracy better", token=alex)
    assert isinstance(approved["approval_id"], int) and approved["state"] == "approved" and approved["can_serve"]

    shown = run("models", "show", "credit", "2", token=vera)
    assert shown["approvals"][-1]["approver"] == "alex" and shown["cards"][-1]["owner"] == "risk-ml@example.com"
    assert shown["validation_reports"] and shown["state"] == "approved"

    loaded = run("models", "load", "credit", "2", token=rita)
    assert loaded["loaded"] and loaded["loaded_versions"] == ["1", "2"]

    traffic = run("traffic", "set", "credit", "1=90", "2=10", token=oscar)
    assert traffic["weights"] == {"1": {"weight": 90, "percent": 90.0}, "2": {"weight": 10, "percent": 10.0}}
    assert {"model", "revision", "sticky", "shadow", "canary", "agreements", "drift"} <= set(traffic)
    assert run("traffic", "show", "credit", token=vera)["revision"] == traffic["revision"]

    shadow = run("traffic", "shadow", "credit", "2", "--percent", "0", token=oscar)
    assert shadow["shadow"] is None

    started = run("traffic", "canary", "start", "credit", "2", "--stable", "1", "--steps", "10,50,100",
                  "--interval", "10m", token=oscar)
    assert started["canary"]["state"] == "progressing" and started["canary"]["steps"] == [10, 50, 100]
    assert started["canary"]["guardrails"]["max_error_rate"] == 0.05
    assert run("traffic", "canary", "pause", "credit", token=oscar)["canary"]["state"] == "paused"
    assert run("traffic", "canary", "resume", "credit", token=oscar)["canary"]["state"] == "progressing"
    assert run("traffic", "canary", "abort", "credit", "--reason", "try again", token=oscar)["canary"]["state"] == "aborted"
    run("traffic", "canary", "start", "credit", "2", "--stable", "1", token=oscar)
    promoted = run("traffic", "canary", "promote", "credit", token=oscar)
    assert promoted["canary"]["state"] == "promoted" and promoted["weights"]["2"]["percent"] == 100.0

    shutil.copytree(repo / "credit" / "2", repo / "credit" / "4")
    run("models", "register", "credit", "4", token=rita)
    run("models", "validate", "credit", "4", token=rita)
    rejected = run("models", "reject", "credit", "4", "--reason", "a copy of 2, not a candidate", token=alex)
    assert rejected["state"] == "retired" and rejected["version"] == "4" and rejected["reason"]

    retired = run("models", "retire", "credit", "1", "--reason", "replaced by 2", token=rita)
    assert retired["state"] == "retired" and retired["version"] == "1"

    me = run("tokens", "whoami", token=vera)
    assert me == {"name": "vera", "role": "viewer", "permissions": ["read"]}
    created = run("tokens", "create", "ci-bot", "--role", "operator", local=True)
    assert created["name"] == "ci-bot" and created["role"] == "operator" and created["token"].startswith("lgt_")
    assert len(created["token_sha256"]) == 64

    verified = run("audit", "verify", token=vera)
    assert verified["ok"] and verified["checked"] == verified["head_seq"] > 0
    entries = run("audit", "log", "--model", "credit", token=vera)
    assert {"seq", "time", "actor", "action", "subject", "details"} <= set(entries[0])
    assert ("alex", "model.approve") in {(e["actor"], e["action"]) for e in entries}
    out = tmp_path / "evidence.json"
    summary = run("audit", "export", "--model", "credit", "--out", str(out), token=vera)
    assert summary["path"] == str(out) and summary["counts"]["approvals"] == 2 and summary["bytes"] == out.stat().st_size
    bundle = run("audit", "export", "--model", "credit", token=vera)
    assert bundle["format"] == "lockgate.evidence/v1" and bundle["chain"]["ok"]

    profile_repo = tmp_path / "repo"
    shutil.copytree(repo / "credit", profile_repo / "credit", ignore=shutil.ignore_patterns("reference_profile.json"))
    built = run("profile", "build", "--model", "credit", "--version", "2", "--data",
                str(profile_repo / "credit" / "2" / "reference_sample.npy"), "--model-repository", str(profile_repo),
                local=True)
    assert built["rows"] == 5000 and built["tensors"]["probabilities"] == ["approve", "review", "decline"]
    assert Path(built["path"]).is_file()

    serve_windows(profile_repo, "2", demo_traffic(1_000, seed=3), ReferenceProfile.load(Path(built["path"])))
    drift = run("drift", "report", "--model", "credit", "--model-repository", str(profile_repo),
                "--store", str(repo / ".lockgate" / "lockgate.db"), local=True)
    assert drift["version_choice"] == "takes 100 of the traffic policy's weight"  # promoted above
    assert drift["provenance"]["version"] == "2" and drift["provenance"]["approver"] == "alex"
    assert drift["status"] == "DRIFT" and drift["window"]["rows"] == 1_000
    assert {"feature", "status", "rule", "statistic", "value", "threshold", "adjusted_p", "rows", "missing_share",
            "new_share"} <= set(drift["summary"][0])



def test_provenance_commands_print_json(demo_server, capsys, tmp_path: Path) -> None:
    from signing_keys import make_key

    server, repo, t = demo_server
    run = _runner(server, capsys)
    pair = make_key(tmp_path, "risk-ml")
    key, pub = pair.private, pair.public
    signed_repo = tmp_path / "repo"
    shutil.copytree(repo / ".candidates" / "credit" / "2", signed_repo / "credit" / "2")
    signed = run("models", "sign", "credit", "2", "--key", str(key), "--model-repository", str(signed_repo), local=True)
    assert Path(signed["signature"]).is_file()
    verified = run("models", "verify", "credit", "2", "--key", str(pub), "--model-repository", str(signed_repo), local=True)
    assert verified["signed"] and verified["manifest_digest"]

    added = run("trust", "add", "risk-ml", "--vendor", "example", "--key", str(pub), "--reason", "our team", token=t["RITA_TOKEN"])
    assert added["name"] == "risk-ml" and added["vendor"] == "example"
    listed = run("trust", "list", token=t["VERA_TOKEN"])
    assert "risk-ml" in {s["name"] for s in listed["signers"]} and "require_signature" in listed
    assert run("trust", "remove", "risk-ml", "--reason", "rotated", token=t["RITA_TOKEN"])["name"] == "risk-ml"

    out = tmp_path / "evidence.json"
    exported = run("audit", "export", "--model", "credit", "--out", str(out), "--sign", str(key), token=t["VERA_TOKEN"])
    assert Path(exported["signature"]).is_file()
    checked = run("audit", "verify-export", str(out), "--key", str(pub), local=True)
    assert checked["ok"] and checked["signature_ok"] and checked["model"] == "credit"


def test_outcome_commands_print_json(demo_server, capsys, tmp_path: Path) -> None:
    """The demo model records outcomes: predictions through tritonclient, labels from a file."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from lockgate.demo import reference_sample

    server, repo, t = demo_server
    run = _runner(server, capsys)
    client = grpcclient.InferenceServerClient(server.url)
    rows = reference_sample(40, seed=3)
    ids = []
    for i in range(0, 40, 8):
        inp = grpcclient.InferInput("features", [8, 8], "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(rows[i:i + 8]))
        response = client.infer("credit", [inp], parameters={"gender": "fmx"[i % 3]})
        ids.append(response.get_response().id)
        served = response.get_response().model_version
    client.close()
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,row,label\n" + "".join(f"{rid},{r},approve\n" for rid in ids for r in range(8)))
    sent = run("feedback", "send", "--model", "credit", "--file", str(labels), token=t["RITA_TOKEN"])
    assert {"received", "accepted", "duplicate", "unknown", "expired", "rejected"} <= set(sent)
    assert sent["received"] == 40 and sent["accepted"] == 40
    report = run("outcomes", "report", "--model", "credit", token=t["VERA_TOKEN"])
    quality = report["versions"][served]["total"]["quality"]
    assert quality["labeled"] >= 40 and report["protected"] == ["gender", "age_band"]


def test_audit_key_seal_status_and_unload_print_json(demo_server, capsys, tmp_path: Path) -> None:
    """The commands of the keyed trail and of this replica, with --json like every other."""
    from test_control_audit import _legacy_store

    server, repo, t = demo_server
    run = _runner(server, capsys)
    key = tmp_path / "keys" / "audit.key"
    made = run("audit", "keygen", "--out", str(key), local=True)
    assert made["file"] == str(key) and len(made["key_id"]) == 16 and key.stat().st_mode & 0o077 == 0
    _legacy_store(tmp_path).close()  # a trail written before audit keys: 5 unkeyed entries
    sealed = run("audit", "seal", "--store", str(tmp_path / "old-state"), "--key-file", str(key), "--actor", "carol",
                 "--reason", "checked the 5 old entries", local=True)
    assert sealed["seal_seq"] == 6 and sealed["legacy_entries"] == 5 and sealed["key_id"] == made["key_id"]
    offline = run("audit", "verify", "--store", str(tmp_path / "old-state"), "--key-file", str(key), local=True)
    assert offline["ok"] and offline["unkeyed_entries"] == 5 and offline["checkpoint_seq"] == 6

    status = run("status", token=t["VERA_TOKEN"])
    assert status["leader"] is True and status["audit_verify_ok"] is True and status["require_approval"] is True
    assert status["audit_head_seq"] >= status["checkpoint_seq"] >= 0 and status["audit_key_id"]

    shutil.copytree(repo / ".candidates" / "credit" / "2", repo / "credit" / "5")
    loaded = run("models", "load", "credit", "5", token=t["RITA_TOKEN"])
    assert loaded["registered"] and loaded["validated"] and "5" in loaded["loaded_versions"]
    unloaded = run("models", "unload", "credit", "5", token=t["RITA_TOKEN"])
    assert unloaded["version"] == "5" and "5" not in unloaded["loaded_versions"]


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = command().main(args=args, prog_name="lockgate", standalone_mode=False)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_keygen_and_seal_refusals_exit_1_with_one_line(tmp_path: Path, capsys) -> None:
    """keygen never overwrites a key; seal refuses a trail already sealed and a broken old
    chain: exit 1, one ``error:`` line naming the status, nothing on stdout, no traceback."""
    from test_control_audit import TRIGGERS, _legacy_store

    key = tmp_path / "audit.key"
    assert _refused(["audit", "keygen", "--out", str(key), "--json"], capsys)[0] in (0, None)
    before = key.read_bytes()
    code, out, err = _refused(["audit", "keygen", "--out", str(key), "--json"], capsys)
    assert code == 1 and out == "" and "FAILED_PRECONDITION" in err and "refusing to overwrite" in err, err
    assert key.read_bytes() == before and "Traceback" not in err

    _legacy_store(tmp_path).close()
    seal = ["audit", "seal", "--store", str(tmp_path / "old-state"), "--key-file", str(key), "--actor", "carol",
            "--reason", "checked", "--json"]
    assert _refused(seal, capsys)[0] in (0, None)
    code, out, err = _refused(seal, capsys)
    assert code == 1 and out == "" and "FAILED_PRECONDITION" in err and "already sealed" in err, err

    broken = tmp_path / "broken"
    broken.mkdir()
    store = _legacy_store(broken)
    store.close()
    conn = sqlite3.connect(store.path, isolation_level=None)  # an attacker's edit, triggers dropped
    for trigger in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    conn.close()
    code, out, err = _refused([*seal[:3], str(broken / "old-state"), *seal[4:]], capsys)
    assert code == 1 and out == "" and "seq 2" in err, err
    code, out, err = _refused(["audit", "seal", "--store", str(tmp_path / "nowhere"), "--key-file", str(key),
                               "--actor", "carol", "--reason", "r"], capsys)
    assert code == 1 and "no control-plane store" in err, err


def test_every_command_was_run_with_json() -> None:
    """Every command of the tree (but demo and serve, run as processes elsewhere) ran above."""
    if not SEEN:
        pytest.skip("needs the --json tests of this module to run first")
    everything = {path for path, _ in _commands()} - {("demo",), ("serve",)}
    assert everything <= SEEN, sorted(everything - SEEN)


def test_serve_json_writes_json_log_lines(tmp_path: Path) -> None:
    from lockgate.demo import build_demo_repository

    repo = build_demo_repository(tmp_path / "repo", versions=(1,))
    with LockgateProcess(repo, args=["--json"]) as proc:
        pass
    lines = [line for line in proc.log_path.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "pid", "message"} <= set(parsed[0])
    assert any("state directory" in p["message"] for p in parsed)


def test_json_logs_carry_native_stderr_lines_as_json() -> None:
    """In --json mode what native code writes to fd 2 (grpc's C core, ONNX Runtime) comes out
    as JSON too, with grpc's level and source kept; Python's records are not wrapped twice."""
    script = (
        "import logging, os\n"
        "from lockgate.transport.server import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "logging.getLogger('lockgate.x').warning('from python')\n"
        "os.write(2, b'E1203 13:11:22.911868    7044 posix_engine_listener.cc:186] Closing acceptor. Failed\\n')\n"
        "os.write(2, b'plain native text\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    parsed = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    by_message = {p["message"]: p for p in parsed}
    assert by_message["from python"]["logger"] == "lockgate.x" and by_message["from python"]["level"] == "WARNING"
    grpc_line = by_message["Closing acceptor. Failed"]
    assert grpc_line["logger"] == "native" and grpc_line["level"] == "ERROR"
    assert grpc_line["source"] == "posix_engine_listener.cc:186"
    assert by_message["plain native text"]["logger"] == "native" and len(parsed) == 3


def test_traffic_on_an_unloaded_version_says_what_to_run(demo_server, capsys) -> None:
    """A version approved but not loaded (copied into the repository after the server started):
    the refusal names the command that loads it (found by an operator who had to use
    tritonclient's load_model instead)."""
    server, repo, t = demo_server
    shutil.copytree(repo / ".candidates" / "credit" / "2", repo / "credit" / "3")
    for args, token in ((["models", "register", "credit", "3"], t["RITA_TOKEN"]),
                        (["models", "validate", "credit", "3"], t["RITA_TOKEN"]),
                        (["models", "card", "credit", "3", "--file", str(repo / "credit" / "3" / "card.yaml")], t["RITA_TOKEN"]),
                        (["models", "approve", "credit", "3", "--reason", "r"], t["ALEX_TOKEN"])):
        _run(args, capsys, server, token)
    code = command().main(args=["traffic", "set", "credit", "3=100", "--server", server.url, "--token", t["OSCAR_TOKEN"]],
                          prog_name="lockgate", standalone_mode=False)
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED_PRECONDITION" in err and "3 of model 'credit' are not loaded" in err, err
    assert "run `lockgate models load credit 3`" in err, err


def test_shell_completion_is_offered(capsys) -> None:
    text = _help_text((), capsys)
    assert "--install-completion" in text and "--show-completion" in text
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "--install-completion" in readme, "README documents shell completion"
