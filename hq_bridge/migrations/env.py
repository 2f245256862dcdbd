"""Alembic environment: runs the revisions in versions/ on the configured database."""

from alembic import context

from hq_bridge.db import metadata, open_engine

cfg = context.config


def run() -> None:
    engine = cfg.attributes.get("engine")
    own = engine is None
    if own:
        engine = open_engine(cfg.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=metadata,
                              render_as_batch=conn.dialect.name == "sqlite", compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        if own:
            engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
run()
