"""A throwaway PostgreSQL on loopback for tests, and pytest fixtures around it.

Why this shape: the control-plane tests must run against a real server (LISTEN/NOTIFY,
advisory locks and connection loss cannot be faked convincingly), on a fresh CI machine
that runs as root. PostgreSQL refuses to run as root, so ``initdb``/``pg_ctl`` run as the
``postgres`` user in a data directory under a world-traversable temp dir. The binaries
come from ``$PATH``, ``/usr/lib/postgresql/<ver>/bin`` or, when missing and we are root,
``apt-get install postgresql``.

``PgServer.stop()``/``start()`` restart the same cluster on the same port, which is what
outage tests need.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_BINARIES = ("initdb", "pg_ctl", "postgres")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin_dir() -> Path | None:
    """Directory holding initdb and pg_ctl, newest version first."""
    candidates: list[Path] = []
    for pattern in ("/usr/lib/postgresql/*/bin",):
        found = sorted(glob.glob(pattern), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
        candidates.extend(Path(p) for p in reversed(found))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for directory in candidates:
        if all((directory / name).exists() for name in _BINARIES):
            return directory
    return None


def find_postgres_bin(install: bool = True) -> Path:
    """Locate the PostgreSQL server binaries, installing the Debian package if allowed."""
    directory = _bin_dir()
    if directory is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
            check=True, env=env, capture_output=True, timeout=900,
        )
        directory = _bin_dir()
    if directory is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found and could not be installed")
    return directory


class PgServer:
    """One PostgreSQL cluster in a temp dir, listening on 127.0.0.1:``port`` with trust auth."""

    def __init__(self, *, database: str = "lockgate") -> None:
        self.bin_dir = find_postgres_bin()
        self.port = _free_port()
        self.database = database
        # Not under pytest's 0700 tmp dirs: the postgres user must traverse the path.
        self.root = Path(tempfile.mkdtemp(prefix="lockgate-pg-", dir="/tmp"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0
        self.running = False

    # -- process control --------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> PgServer:
        self.socket_dir.mkdir()
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        try:
            self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--locale=C", "--no-sync")
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr}") from exc
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        result = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
                           "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{self.log()}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients, as an outage would)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)
        self.running = False

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ----------------------------------------------------------
    def dsn(self, database: str | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database or self.database}"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database and return its DSN (one per test keeps tests independent)."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def __enter__(self) -> PgServer:
        self.init()
        self.start()
        self.create_database(self.database)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL shared by the whole session (do not stop it; use ``PgServer`` for outages)."""
    with PgServer() as server:
        yield server


@pytest.fixture()
def pg_dsn(pg_server: PgServer) -> str:
    """DSN of a fresh, empty database on the session's server."""
    return pg_server.create_database()
