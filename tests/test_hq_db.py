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

    with mock.patch("hq_bridge.migrations.upgrade", upgrade), mock.patch("hq_bridge.migrations.time.sleep"):
        migrations.migrate(f"sqlite:///{tmp_path / 'hq.db'}")
    assert len(tries) == 3


def test_a_migration_whose_step_another_process_did_first_reads_the_version_again(tmp_path):
    """The bridge and a `rules publish` start on one new SQLite database: the
    other process adds a column between our reading the version and our
    step ("duplicate column name"): we find the version moved on, not fail."""
    url = f"sqlite:///{tmp_path / 'hq.db'}"
    migrations.upgrade(url, "0002")
    real, tries = migrations.upgrade, []

    def upgrade(engine):
        tries.append(1)
        if len(tries) == 1:                  # the other process migrates first, then our step collides
            real(url)
            raise OperationalError("ALTER TABLE", {}, Exception("duplicate column name: d_spend_fen"))
        real(engine)

    with mock.patch("hq_bridge.migrations.upgrade", upgrade), mock.patch("hq_bridge.migrations.time.sleep"):
        migrations.migrate(url)
    assert len(tries) == 2 and migrations.current(url) == db_head()


def test_a_migration_error_that_is_not_another_process_is_raised(tmp_path):
    import pytest

    def upgrade(engine):
        raise OperationalError("ALTER TABLE", {}, Exception("duplicate column name: d_spend_fen"))

    with mock.patch("hq_bridge.migrations.upgrade", upgrade), mock.patch("hq_bridge.migrations.time.sleep"), \
            pytest.raises(OperationalError, match="duplicate column"):
        migrations.migrate(f"sqlite:///{tmp_path / 'hq.db'}")


def db_head() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(migrations.config("sqlite://")).get_current_head()
