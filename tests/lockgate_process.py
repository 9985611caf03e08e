"""Start a real ``lockgate serve`` process on loopback for tests, and stop it cleanly."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import grpc

LOCKGATE = [sys.executable, "-m", "lockgate.cli"]


_HANDED_OUT: set[int] = set()
#: Below Linux's ephemeral range (32768-60999): a port the kernel hands out for ``bind(0)`` or
#: for an outgoing connection (another replica's PostgreSQL client) can be taken between the
#: check here and the server's own bind; a port in this range only by another chooser.
_PORT_RANGE = (20000, 32767)


def free_port() -> int:
    """A loopback port free now, never the same twice in this process (a server started
    next to another must not race it for one)."""
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randint(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_PORT_RANGE}")


def wait_server_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    """Until ``ServerReady`` answers true on ``url`` (lockgate's own stubs: no client package
    needed); fails at once with the log if the process exits."""
    from lockgate._proto import inference_pb2 as pb
    from lockgate._proto import inference_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"lockgate exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"lockgate not ready after {timeout}s:\n{log_path.read_text(errors='replace')}")


class LockgateProcess:
    """A lockgate server subprocess; ``url`` is what clients dial."""

    def __init__(self, repo: Path, *, args: Sequence[str] = (), env: dict | None = None, state_dir: Path | None = None,
                 log_path: Path | None = None, gated: bool = False) -> None:
        self.repo = Path(repo)
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.state_dir = state_dir or self.repo.parent / f"state-{self.port}"
        self.log_path = log_path or self.repo.parent / f"lockgate-{self.port}.log"
        cmd = [*LOCKGATE, "serve", "--model-repository", str(self.repo), "--grpc-port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port), "--host", "127.0.0.1", "--state-dir", str(self.state_dir), *args]
        # The audit key and checkpoints live beside the state dir (outside it, as lockgate
        # requires) and belong to it: a restart on the same state dir finds the same key.
        # A fleet sharing one store passes one key for all (LOCKGATE_AUDIT_KEY_FILE).
        environment = {**os.environ, **(env or {})}
        demo_key = self.repo / ".audit" / "audit.key"  # lockgate demo's (serve finds it there too)
        self.audit_key_file = Path(environment.get("LOCKGATE_AUDIT_KEY_FILE")
                                   or (demo_key if demo_key.is_file() else
                                       self.state_dir.parent / f"{self.state_dir.name}.audit.key"))
        self.checkpoint_file = self.state_dir.parent / f"{self.state_dir.name}.audit-checkpoints.jsonl"
        if "--audit-key-file" not in args:
            if not self.audit_key_file.exists():
                from lockgate.control.audit_key import AuditKey

                AuditKey.generate(self.audit_key_file)
            cmd += ["--audit-key-file", str(self.audit_key_file)]
        if "--audit-checkpoint-file" not in args:
            cmd += ["--audit-checkpoint-file", str(self.checkpoint_file)]
        if not gated:  # data-plane tests: approval gates are tested on their own
            cmd.append("--allow-unapproved")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, timeout: float = 60.0) -> "LockgateProcess":
        self._log.flush()
        wait_server_ready(self.url, self.proc, self.log_path, timeout)
        return self

    def post(self, path: str, body: dict | None = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, object]:
        """POST JSON to the HTTP port (``Authorization: Bearer token`` if given): (status, JSON body)."""
        import json
        import urllib.error
        import urllib.request

        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=json.dumps(body or {}).encode(),
                                         method="POST", headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        return status, json.loads(text) if text else None

    def console_session(self, token: str) -> tuple[str, str]:
        """Sign in to the console without a browser: (session cookie header, a page's CSRF token)."""
        import re
        import urllib.error
        import urllib.parse
        import urllib.request

        with urllib.request.urlopen(f"http://{self.http_url}/console/login", timeout=30) as r:
            login_cookie = r.headers["set-cookie"].split(";", 1)[0]
            csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
        request = urllib.request.Request(f"http://{self.http_url}/console/login", method="POST",
                                         data=urllib.parse.urlencode({"token": token, "csrf": csrf}).encode(),
                                         headers={"Cookie": login_cookie})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object) -> None:
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(request, timeout=30)
            raise AssertionError("console sign-in did not redirect")
        except urllib.error.HTTPError as redirect:
            assert redirect.code == 303, redirect.code
            cookie = redirect.headers["set-cookie"].split(";", 1)[0]
        return cookie, self.console_page("/console/models", cookie)[1]

    def console_page(self, path: str, cookie: str) -> tuple[str, str]:
        """GET a console page with a session: (its HTML, its CSRF token or "")."""
        import re
        import urllib.request

        request = urllib.request.Request(f"http://{self.http_url}{path}", headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=60) as r:
            text = r.read().decode()
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        return text, found.group(1) if found else ""

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "LockgateProcess":
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.terminate()
