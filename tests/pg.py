"""A real PostgreSQL for the tests (Debian package ``postgresql``), like
demo/testbed.py's MosquittoBroker: a throw-away cluster in a temp dir,
listening on a free port on 127.0.0.1 (and a unix socket in the temp dir),
stopped and removed at teardown.

initdb refuses to run as root: as root the cluster belongs to the
``postgres`` system user and its programs run through ``runuser -u postgres
--``; otherwise they run as the current user.

Fixtures (import them into a test module: ``from tests.pg import hq_db_url, pg_server``):

- ``pg_server``  one server for the whole session (skips when PostgreSQL is not installed)
- ``hq_db_url``  parametrized over ["sqlite", "postgresql"]: a fresh, empty
                 database URL for each test (a new SQLite file, or a new
                 database on the session's server)
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from demo.testbed import free_port, wait_for_port


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin dir (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A PostgreSQL cluster of its own; ``url(db)`` for SQLAlchemy (psycopg 3)."""

    def __init__(self, workdir: str | Path | None = None, port: int | None = None) -> None:
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package 'postgresql')")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sg-postgres-"))
        self.data = self.workdir / "data"
        self.sockets = self.workdir / "run"
        self.port = port or free_port()
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self.proc: subprocess.Popen | None = None
        self._dbs = itertools.count(1)

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)

    def start(self) -> "PostgresServer":
        self.sockets.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            os.chown(self.sockets, pw.pw_uid, pw.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                                     "--auth=trust", "--encoding=UTF8", "--locale=C"),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = open(self.workdir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            self._cmd(str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                      "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.sockets}",
                      "-c", "max_connections=50", "-c", "shared_buffers=128MB"),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_for_port(self.port, timeout=30)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise RuntimeError(f"postgres did not start: {self.log()[-2000:]}") from None
                time.sleep(0.1)

    def dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={db}"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg
        name = name or f"t{next(self._dbs)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        p = self.workdir / "postgres.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # SIGINT to the postmaster itself (runuser does not pass it on): fast shutdown,
            # clients disconnected, then a clean stop; SIGTERM's smart shutdown would wait for
            # every pool a test left open.
            try:
                os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()


@pytest.fixture(scope="session")
def pg_server():
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian package 'postgresql')")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def hq_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hq.db'}"
    return request.getfixturevalue("pg_server").create_database()


@pytest.fixture
def hq_engine(hq_db_url):
    """HQ's database on each engine, migrated to the newest schema."""
    from hq_bridge import db, migrations

    migrations.migrate(hq_db_url)
    engine = db.open_engine(hq_db_url)
    yield engine
    engine.dispose()
