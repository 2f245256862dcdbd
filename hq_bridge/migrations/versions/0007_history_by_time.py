"""``account_history`` is indexed by ``recorded_at``, for reconciliation.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

``storegate-hq reconcile`` (default: the last 7 days) and the nightly run
(the last 2) look for coupon and daily-allowance overruns in the entries
applied lately, over every account. Without an index that read the whole
history, which grows by every record of every store. Entries are written in
time order, so on PostgreSQL a BRIN index (a summary of each range of pages)
finds the last days for a few pages of index and next to no cost per
insert; SQLite, the embedded engine, gets a B-tree of the same name.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

NAME = "ix_account_history_recorded_at"


def upgrade() -> None:
    op.create_index(NAME, "account_history", ["recorded_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index(NAME, table_name="account_history")
