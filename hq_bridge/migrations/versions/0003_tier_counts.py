"""Tier windows summed by SQL: what each sale and return counts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

``account_history.d_spend_fen`` and ``d_earned`` (hq_bridge/db.py): the
spend and points earned a sale counts in the tier windows, a return's
negative, so hq_bridge/policy.py sums them in the database instead of
reading every entry's JSON detail. Existing entries are filled in from
their detail, by the same function that fills new ones.
"""

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Int64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CHUNK = 10_000


def upgrade() -> None:
    from hq_bridge.accounts import tier_counts
    with op.batch_alter_table("account_history") as batch:
        batch.add_column(sa.Column("d_spend_fen", Int64, nullable=False, server_default="0"))
        batch.add_column(sa.Column("d_earned", Int64, nullable=False, server_default="0"))
    conn = op.get_bind()
    h = sa.table("account_history", sa.column("id"), sa.column("kind"), sa.column("detail"),
                 sa.column("d_spend_fen"), sa.column("d_earned"))
    last = 0
    while True:
        rows = conn.execute(sa.select(h.c.id, h.c.kind, h.c.detail).where(
            h.c.id > last, h.c.kind.in_(("sale", "return"))).order_by(h.c.id).limit(CHUNK)).all()
        if not rows:
            break
        last = rows[-1][0]
        counted = [(i, *tier_counts(kind, orjson.loads(detail) if detail else None)) for i, kind, detail in rows]
        updates = [{"i": i, "s": s, "e": e} for i, s, e in counted if s or e]
        if updates:
            conn.execute(h.update().where(h.c.id == sa.bindparam("i"))
                         .values(d_spend_fen=sa.bindparam("s"), d_earned=sa.bindparam("e")), updates)


def downgrade() -> None:
    with op.batch_alter_table("account_history") as batch:
        batch.drop_column("d_earned")
        batch.drop_column("d_spend_fen")
