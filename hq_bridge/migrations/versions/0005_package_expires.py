"""A count package's validity, kept with the package: ``packages.expires``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

``packages.expires`` (hq_bridge/db.py): the last day a package may be used
(YYYY-MM-DD, store time), as the counter's ``package_sale`` record worked it
out; NULL: it does not expire (every package before this revision, and one
HQ hands out without a validity). Until now the expiry was only in the
history entry's detail: an existing package takes the ``expires`` of its
last ``package_sale`` entry (NULL when it has none, or that sale had no
validity: no expiry, as the stores treated it until now).
"""

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CHUNK = 10_000


def upgrade() -> None:
    with op.batch_alter_table("packages") as batch:
        batch.add_column(sa.Column("expires", sa.String(length=10), nullable=True))
    conn = op.get_bind()
    h = sa.table("account_history", sa.column("id"), sa.column("kind"), sa.column("account_id"),
                 sa.column("package_id"), sa.column("detail"))
    p = sa.table("packages", sa.column("account_id"), sa.column("package_id"), sa.column("expires"))
    last_sale: dict[tuple[str, str], str | None] = {}
    after = 0
    while True:
        rows = conn.execute(sa.select(h.c.id, h.c.account_id, h.c.package_id, h.c.detail).where(
            h.c.id > after, h.c.kind == "package_sale").order_by(h.c.id).limit(CHUNK)).all()
        if not rows:
            break
        after = rows[-1][0]
        for _i, aid, pid, detail in rows:
            last_sale[(aid, pid)] = (orjson.loads(detail) if detail else {}).get("expires")
    updates = [{"a": aid, "p": pid, "e": e} for (aid, pid), e in last_sale.items() if e]
    for i in range(0, len(updates), CHUNK):
        conn.execute(p.update().where(p.c.account_id == sa.bindparam("a"), p.c.package_id == sa.bindparam("p"))
                     .values(expires=sa.bindparam("e")), updates[i:i + CHUNK])


def downgrade() -> None:
    with op.batch_alter_table("packages") as batch:
        batch.drop_column("expires")
