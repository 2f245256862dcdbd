"""HQ's database: the ledger, the rule publisher's tables, the accounts of record.

Revision ID: 0001
Revises:
Create Date: 2026-12-05

The ledger's and the rule publisher's tables may already exist in an HQ
database made before migrations (hq_bridge/ledger.py and rules.py created
them with CREATE TABLE IF NOT EXISTS, in the same shapes): they are adopted
as they are, and only what is missing is created.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Int64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _create(name: str, *columns) -> bool:
    if sa.inspect(op.get_bind()).has_table(name):
        return False
    op.create_table(name, *columns)
    return True


def upgrade() -> None:
    # -- the ledger (hq_bridge/ledger.py)
    _create("transactions",
            sa.Column("store", sa.Text(), nullable=False),
            sa.Column("seq", Int64, nullable=False),
            sa.Column("tx_id", sa.Text(), nullable=False),
            sa.Column("type", sa.Text(), nullable=False),
            sa.Column("ts", Int64, nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.Column("received_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("store", "seq", name=op.f("pk_transactions")),
            sa.UniqueConstraint("tx_id", name=op.f("uq_transactions_tx_id")))
    _create("conflicts",
            sa.Column("store", sa.Text(), nullable=False),
            sa.Column("seq", Int64, nullable=False),
            sa.Column("tx_id", sa.Text(), nullable=False),
            sa.Column("type", sa.Text(), nullable=False),
            sa.Column("ts", Int64, nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.Column("received_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("tx_id", name=op.f("pk_conflicts")))
    # unsendable and card_services: added to this revision before its first release
    # (an HQ database from before migrations may have them from ledger.py already).
    _create("unsendable",
            sa.Column("store", sa.Text(), nullable=False),
            sa.Column("seq", Int64, nullable=False),
            sa.Column("tx_id", sa.Text(), nullable=False),
            sa.Column("original_type", sa.Text(), nullable=True),
            sa.Column("ts", Int64, nullable=False),
            sa.Column("error", sa.Text(), nullable=False),
            sa.Column("received_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("store", "seq", name=op.f("pk_unsendable")))
    _create("card_services",
            sa.Column("store", sa.Text(), nullable=False),
            sa.Column("seq", Int64, nullable=False),
            sa.Column("tx_id", sa.Text(), nullable=False),
            sa.Column("op", sa.Text(), nullable=True),
            sa.Column("card_no", sa.Text(), nullable=True),
            sa.Column("new_card_no", sa.Text(), nullable=True),
            sa.Column("outcome", sa.Text(), nullable=False),
            sa.Column("review", sa.Integer(), server_default="0", nullable=False),
            sa.Column("recorded_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("store", "seq", name=op.f("pk_card_services")))
    _create("stores",
            sa.Column("store", sa.Text(), nullable=False),
            sa.Column("status", sa.Text(), nullable=True),
            sa.Column("updated_at", Int64, nullable=True),
            sa.PrimaryKeyConstraint("store", name=op.f("pk_stores")))
    _create("rule_versions",
            sa.Column("scope", sa.Text(), nullable=False),
            sa.Column("version", Int64, nullable=False),
            sa.Column("published_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("scope", name=op.f("pk_rule_versions")))

    # -- the rule publisher (hq_bridge/rules.py)
    _create("rule_layers",
            sa.Column("scope", sa.Text(), nullable=False),
            sa.Column("doc", sa.Text(), nullable=False),
            sa.Column("updated_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("scope", name=op.f("pk_rule_layers")))
    _create("rule_snapshots",
            sa.Column("scope", sa.Text(), nullable=False),
            sa.Column("parts", sa.Text(), nullable=False),
            sa.Column("as_of", Int64, nullable=False),
            sa.Column("rows", Int64, nullable=False),
            sa.Column("updated_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("scope", name=op.f("pk_rule_snapshots")))
    _create("rule_manifests",
            sa.Column("store", sa.Text(), nullable=False),
            sa.Column("version", Int64, nullable=False),
            sa.Column("doc", sa.Text(), nullable=False),
            sa.Column("published_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("store", name=op.f("pk_rule_manifests")))
    _create("deny_list",
            sa.Column("card_no", sa.Text(), nullable=False),
            sa.Column("status", sa.Text(), nullable=False),
            sa.Column("since", sa.Text(), nullable=True),
            sa.Column("replaced_by", sa.Text(), nullable=True),
            sa.Column("version", Int64, nullable=False),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("updated_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("card_no", name=op.f("pk_deny_list")))
    _create("deny_log",
            sa.Column("version", Int64, autoincrement=False, nullable=False),
            sa.Column("issued_at", Int64, nullable=False),
            sa.Column("doc", sa.Text(), nullable=False),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.PrimaryKeyConstraint("version", name=op.f("pk_deny_log")))
    _create("retained_parts",
            sa.Column("topic", sa.Text(), nullable=False),
            sa.Column("sha256", sa.Text(), nullable=False),
            sa.Column("published_at", Int64, nullable=False),
            sa.PrimaryKeyConstraint("topic", name=op.f("pk_retained_parts")))

    # -- accounts of record (hq_bridge/accounts.py)
    op.create_table(
        "members",
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("name_masked", sa.String(length=64), nullable=True),
        sa.Column("phone_hash", sa.String(length=64), nullable=True),
        sa.Column("consent", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("birthday", sa.String(length=5), nullable=True),
        sa.Column("birthday_calendar", sa.String(length=5), server_default="solar", nullable=False),
        sa.Column("source", sa.String(length=80), nullable=False),
        sa.Column("created_at", Int64, nullable=False),
        sa.Column("updated_at", Int64, nullable=False),
        sa.CheckConstraint("birthday_calendar IN ('solar', 'lunar')", name=op.f("ck_members_calendar")),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_members")))
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("owner_member_id", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("card_type", sa.String(length=64), nullable=True),
        sa.Column("paid_fen", Int64, server_default="0", nullable=False),
        sa.Column("bonus_fen", Int64, server_default="0", nullable=False),
        sa.Column("points", Int64, server_default="0", nullable=False),
        sa.Column("points_owed", Int64, server_default="0", nullable=False),
        sa.Column("day", sa.String(length=10), nullable=True),
        sa.Column("day_stored_value_paid_fen", Int64, server_default="0", nullable=False),
        sa.Column("day_points_redeemed", Int64, server_default="0", nullable=False),
        sa.Column("created_at", Int64, nullable=False),
        sa.Column("updated_at", Int64, nullable=False),
        sa.CheckConstraint("status IN ('active', 'frozen', 'blocked', 'cancelled', 'expired')",
                           name=op.f("ck_accounts_status")),
        sa.CheckConstraint("bonus_fen >= 0", name=op.f("ck_accounts_bonus")),
        sa.CheckConstraint("points_owed >= 0", name=op.f("ck_accounts_owed")),
        sa.ForeignKeyConstraint(["owner_member_id"], ["members.member_id"],
                                name=op.f("fk_accounts_owner_member_id_members")),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_accounts")))
    op.create_table(
        "cards",
        sa.Column("card_no", sa.String(length=19), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=12), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("replaced_by", sa.String(length=19), nullable=True),
        sa.Column("card_type", sa.String(length=64), nullable=True),
        sa.Column("nfc_uid", sa.String(length=20), nullable=True),
        sa.Column("issued_at", Int64, nullable=False),
        sa.Column("expires", sa.String(length=10), nullable=True),
        sa.Column("updated_at", Int64, nullable=False),
        sa.CheckConstraint("role IN ('primary', 'subsidiary', 'linked')", name=op.f("ck_cards_role")),
        sa.CheckConstraint("status IN ('active', 'not_activated', 'lost', 'frozen', 'cancelled', 'replaced', "
                           "'expired')", name=op.f("ck_cards_status")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"], name=op.f("fk_cards_account_id_accounts")),
        sa.ForeignKeyConstraint(["member_id"], ["members.member_id"], name=op.f("fk_cards_member_id_members")),
        sa.PrimaryKeyConstraint("card_no", name=op.f("pk_cards")))
    op.create_index(op.f("ix_cards_account_id"), "cards", ["account_id"])
    op.create_table(
        "points_lots",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("expires", sa.String(length=10), nullable=False),
        sa.Column("earned_at", Int64, nullable=False),
        sa.Column("points", Int64, nullable=False),
        sa.Column("remaining", Int64, nullable=False),
        sa.CheckConstraint("remaining >= 0", name=op.f("ck_points_lots_remaining")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"],
                                name=op.f("fk_points_lots_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "expires", name=op.f("pk_points_lots")))
    op.create_table(
        "packages",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("package_id", sa.String(length=64), nullable=False),
        sa.Column("uses_left", Int64, nullable=False),
        sa.Column("updated_at", Int64, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"],
                                name=op.f("fk_packages_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "package_id", name=op.f("pk_packages")))
    op.create_table(
        "coupons",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("used_tx", sa.String(length=64), nullable=True),
        sa.Column("updated_at", Int64, nullable=False),
        sa.CheckConstraint("state IN ('issued', 'used')", name=op.f("ck_coupons_state")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"],
                                name=op.f("fk_coupons_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "code", name=op.f("pk_coupons")))
    op.create_table(
        "account_history",
        sa.Column("id", Int64, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("d_paid_fen", Int64, server_default="0", nullable=False),
        sa.Column("d_bonus_fen", Int64, server_default="0", nullable=False),
        sa.Column("d_points", Int64, server_default="0", nullable=False),
        sa.Column("package_id", sa.String(length=64), nullable=True),
        sa.Column("d_uses", Int64, server_default="0", nullable=False),
        sa.Column("card_no", sa.String(length=19), nullable=True),
        sa.Column("store", sa.String(length=64), nullable=True),
        sa.Column("seq", Int64, nullable=True),
        sa.Column("tx_id", sa.String(length=64), nullable=True),
        sa.Column("ref_tx_id", sa.String(length=64), nullable=True),
        sa.Column("terminal", sa.String(length=64), nullable=True),
        sa.Column("operator", sa.String(length=64), nullable=True),
        sa.Column("at", sa.String(length=40), nullable=True),
        sa.Column("recorded_at", Int64, nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.account_id"],
                                name=op.f("fk_account_history_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_history")))
    op.create_index(op.f("ix_account_history_account_id_id"), "account_history", ["account_id", "id"])
    op.create_index(op.f("ix_account_history_tx_id"), "account_history", ["tx_id"])
    op.create_index(op.f("ix_account_history_ref_tx_id"), "account_history", ["ref_tx_id"])
    op.create_table(
        "set_aside",
        sa.Column("id", Int64, autoincrement=True, nullable=False),
        sa.Column("store", sa.String(length=64), nullable=False),
        sa.Column("seq", Int64, nullable=False),
        sa.Column("tx_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("at", Int64, nullable=False),
        sa.Column("resolved_at", Int64, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_set_aside")),
        sa.UniqueConstraint("store", "seq", name=op.f("uq_set_aside_store_seq")))
    op.create_table(
        "account_watermarks",
        sa.Column("store", sa.String(length=64), nullable=False),
        sa.Column("seq", Int64, nullable=False),
        sa.Column("held_above", Int64, server_default="0", nullable=False),
        sa.Column("updated_at", Int64, nullable=False),
        sa.PrimaryKeyConstraint("store", name=op.f("pk_account_watermarks")))


def downgrade() -> None:
    # Only what this revision added: the ledger and the rule tables hold the
    # chain's records and are never dropped by a downgrade.
    for name in ("account_watermarks", "set_aside", "account_history", "coupons", "packages", "points_lots",
                 "cards", "accounts", "members"):
        op.drop_table(name)
