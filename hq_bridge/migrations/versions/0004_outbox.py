"""What HQ stored but could not send yet: the outbox.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

``outbox`` (hq_bridge/db.py): a rule set or deny delta a command stored while
the broker was down, sent by the bridge when the broker is back.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Int64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("item", sa.String(length=80), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("queued_at", Int64, nullable=False),
        sa.Column("released_at", Int64, nullable=True),
        sa.PrimaryKeyConstraint("item", name=op.f("pk_outbox")))


def downgrade() -> None:
    op.drop_table("outbox")
