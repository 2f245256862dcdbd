"""Reconciliation: overdrafts of balances spent offline at more than one store.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

The table hq_bridge/accounts.py defines as ``overdrafts`` (hq_bridge/reconcile.py
records and settles them).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Int64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "overdrafts",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("ref", sa.String(length=64), nullable=False),
        sa.Column("amount", Int64, nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("detected_at", Int64, nullable=False),
        sa.Column("settled_at", Int64, nullable=True),
        sa.Column("settled_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", Int64, nullable=False),
        sa.CheckConstraint("state IN ('open', 'settled')", name=op.f("ck_overdrafts_state")),
        sa.CheckConstraint("action IN ('carry', 'limit', 'block')", name=op.f("ck_overdrafts_action")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"],
                                name=op.f("fk_overdrafts_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "kind", "ref", name=op.f("pk_overdrafts")))
    op.create_index(op.f("ix_overdrafts_state"), "overdrafts", ["state"])


def downgrade() -> None:
    op.drop_index(op.f("ix_overdrafts_state"), table_name="overdrafts")
    op.drop_table("overdrafts")
