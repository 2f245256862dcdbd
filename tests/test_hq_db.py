"""HQ's database helpers (hq_bridge/db.py) on their own."""

from __future__ import annotations

from unittest import mock

from sqlalchemy.exc import OperationalError

from hq_bridge import db, migrations


def test_a_migration_that_finds_the_sqlite_database_locked_waits_and_tries_again(tmp_path):
    tries = []

    def upgrade(engine):   # another process holds the write lock twice, then lets go
        tries.append(engine)
        if len(tries) < 3:
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))

    with mock.patch("hq_bridge.migrations.upgrade", upgrade), mock.patch("hq_bridge.db.time.sleep"):
        migrations.migrate(f"sqlite:///{tmp_path / 'hq.db'}")
    assert len(tries) == 3
