"""``account_history`` is indexed by ``recorded_at``, for reconciliation.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

``storegate-hq reconcile`` (default: the last 7 days) and the nightly run
(the last 2) look for coupon and daily-allowance overruns in the entries
applied lately, over every account. Without an index that read the whole
history, which grows by every record of every store. A B-tree on both
engines: entries come in time order, so each insert lands on the index's
last page. (A BRIN index, smaller still, misled PostgreSQL's planner: it
chose it for the tier windows' sums of a batch's accounts, a year of entries
each, over the index by account, and ingest fell to a third in
bench.hq_ingest.)
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

NAME = "ix_account_history_recorded_at"


def upgrade() -> None:
    op.create_index(NAME, "account_history", ["recorded_at"])


def downgrade() -> None:
    op.drop_index(NAME, table_name="account_history")
