"""Alembic migrations of HQ's database, configured in code (no alembic.ini).

    from hq_bridge.migrations import upgrade
    upgrade("sqlite:////var/lib/storegate/hq.db")      # or postgresql+psycopg://...

``upgrade(url)`` runs ``alembic upgrade head``; ``config(url)`` is the
Config for any other alembic command (``alembic.command.current(config(url))``,
``revision(..., autogenerate=True)`` when the metadata in hq_bridge/db.py
changes). The same revisions run on SQLite and PostgreSQL; SQLite runs them
in batch mode (a copy of the table) where it cannot ALTER in place.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

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

    from hq_bridge.db import open_engine
    engine = url if isinstance(url, Engine) else open_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if not isinstance(url, Engine):
            engine.dispose()
