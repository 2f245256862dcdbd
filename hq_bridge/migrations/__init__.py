"""Alembic migrations of HQ's database, configured in code (no alembic.ini).

    from hq_bridge.migrations import migrate
    migrate("sqlite:////var/lib/storegate/hq.db")      # or postgresql+psycopg://...

``migrate(url)`` brings a database to the newest schema, one process at a
time; ``migrate_once(engine)`` does it the first time a process opens it
(the Ledger and the Catalog); ``upgrade(url)`` runs ``alembic upgrade head``; ``config(url)`` is the
Config for any other alembic command (``alembic.command.current(config(url))``,
``revision(..., autogenerate=True)`` when the metadata in hq_bridge/db.py
changes). The same revisions run on SQLite and PostgreSQL; SQLite runs them
in batch mode (a copy of the table) where it cannot ALTER in place.
"""

from __future__ import annotations

from pathlib import Path

import time

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from hq_bridge import db

HERE = Path(__file__).resolve().parent


def config(url: str | Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    if isinstance(url, Engine):
        cfg.attributes["engine"] = url
        url = url.url.render_as_string(hide_password=False)
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", str(url).replace("%", "%%"))
    return cfg


def upgrade(url: str | Engine, revision: str = "head") -> None:
    command.upgrade(config(url), revision)


def current(url: str | Engine) -> str | None:
    """The revision the database is at (None: not migrated yet)."""
    from alembic.runtime.migration import MigrationContext

    engine = url if isinstance(url, Engine) else db.open_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


_MIGRATION_LOCK = 7391000


def migrate(url: str | Engine) -> None:
    """Bring the database at ``url`` to the newest schema (alembic upgrade head).
    On PostgreSQL one process at a time (a session advisory lock): the
    bridge starting and a ``storegate-hq rules publish`` may both find a new
    database; the second waits and finds it migrated. (SQLite's migration
    transaction begins IMMEDIATE: the same, by its write lock.)"""
    engine = url if isinstance(url, Engine) else db.open_engine(url)
    try:
        if not db.is_postgres(engine):
            for attempt in range(50):  # another process is migrating or writing: wait for it
                before = current(engine)
                try:
                    upgrade(engine)
                    return
                except OperationalError as exc:
                    # "locked": another process holds the write lock. Or it migrated between our
                    # reading the version and our step ("table ... already exists", "duplicate
                    # column name"): the version moved on; read it again.
                    if not ("locked" in str(exc) or current(engine) != before) or attempt == 49:
                        raise
                    time.sleep(0.2)
        with engine.connect() as lock:
            lock.exec_driver_sql(f"SELECT pg_advisory_lock({_MIGRATION_LOCK})")
            try:
                upgrade(engine)
            finally:
                lock.exec_driver_sql(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})")
                lock.commit()
    finally:
        if engine is not url:
            engine.dispose()


_migrated: set[str] = set()


def migrate_once(engine: Engine) -> None:
    """``migrate`` the first time this process opens the database at the engine's URL."""
    key = engine.url.render_as_string(hide_password=False)
    path = db.sqlite_path(key)
    if key not in _migrated or (path is not None and not path.exists()):
        migrate(engine)
        _migrated.add(key)
