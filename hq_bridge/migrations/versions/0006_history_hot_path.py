"""What ingest writes for every record costs less: ``account_history`` loses
its foreign key to ``accounts`` and indexes ``ref_tx_id`` only where it is set.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Every applied record writes one history entry. The foreign key checked each
one against ``accounts`` (a look-up and a row lock per entry); entries are
only ever written by the accounts code in the transaction that creates or
locks their account, and accounts are never deleted (a cancelled account
keeps its row), so the check found nothing the audit does not:
``hq_bridge.accounts.audit`` reports an entry of an account that does not
exist. ``ref_tx_id`` is set only on returns and refunds; a partial index
leaves the other entries out of it. Both engines, same schema.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FK = "fk_account_history_account_id_accounts"
REF = "ix_account_history_ref_tx_id"


def upgrade() -> None:
    op.drop_index(REF, table_name="account_history")
    with op.batch_alter_table("account_history") as batch:
        batch.drop_constraint(FK, type_="foreignkey")
    op.create_index(REF, "account_history", ["ref_tx_id"],
                    postgresql_where=sa.text("ref_tx_id IS NOT NULL"),
                    sqlite_where=sa.text("ref_tx_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index(REF, table_name="account_history")
    with op.batch_alter_table("account_history") as batch:
        batch.create_foreign_key(FK, "accounts", ["account_id"], ["account_id"])
    op.create_index(REF, "account_history", ["ref_tx_id"])
