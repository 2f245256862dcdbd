"""What needs a person at HQ: ``storegate-hq review``.

    storegate-hq review [--store S] [--all] [--json] --config hq.toml
    storegate-hq review resolve STORE SEQ --config hq.toml

Three queues, each kept in HQ's database and never dropped:

- **set aside**: store records the accounts could not apply (an unknown
  card, a body that fails its schema, a type HQ does not know: the
  ``"<code>: <what>"`` in ``error``). The record is committed in the ledger
  and acked; its money or points are in no account until someone acts
  (import the member, then adjust with ``members card`` or a correcting
  record) and marks it resolved.
- **unsendable**: placeholders for records a store journaled but could not
  send (the original stays in the store's ``unsendable/`` folder).
- **card services to review**: counter card services HQ did not simply
  broadcast (an unfreeze at a counter, a replace onto a denied card).

``--all`` lists resolved set-aside records too. ``resolve`` marks a set-aside
record handled (``resolved_at``), with the operator in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import orjson
from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine

from hq_bridge import db

log = logging.getLogger("storegate.hq")


@dataclass(frozen=True)
class SetAside:
    store: str
    seq: int
    tx_id: str
    type: str
    error: str
    at: int                  # epoch ms, HQ's clock
    resolved_at: int | None


@dataclass(frozen=True)
class Unsendable:
    store: str
    seq: int
    tx_id: str
    original_type: str | None
    error: str


@dataclass(frozen=True)
class CardReview:
    store: str
    seq: int
    op: str | None
    card_no: str | None
    new_card_no: str | None
    outcome: str


@dataclass
class Queues:
    set_aside: list[SetAside]
    unsendable: list[Unsendable]
    card_services: list[CardReview]

    def as_json(self) -> dict:
        return {k: [asdict(x) for x in v] for k, v in vars(self).items()}

    def __len__(self) -> int:
        return len(self.set_aside) + len(self.unsendable) + len(self.card_services)


def queues(conn: Connection, *, store: str | None = None, include_resolved: bool = False) -> Queues:
    s, u, c = db.set_aside, db.unsendable, db.card_services

    def scoped(q, table):
        return (q if store is None else q.where(table.c.store == store)).order_by(table.c.store, table.c.seq)
    aside = select(s.c.store, s.c.seq, s.c.tx_id, s.c.type, s.c.error, s.c.at, s.c.resolved_at) \
        .where(s.c.type != "unsendable")          # its own queue, below
    if not include_resolved:
        aside = aside.where(s.c.resolved_at.is_(None))
    return Queues(
        [SetAside(*r) for r in conn.execute(scoped(aside, s))],
        [Unsendable(*r) for r in conn.execute(scoped(select(u.c.store, u.c.seq, u.c.tx_id, u.c.original_type,
                                                              u.c.error), u))],
        [CardReview(*r) for r in conn.execute(scoped(select(c.c.store, c.c.seq, c.c.op, c.c.card_no,
                                                              c.c.new_card_no, c.c.outcome)
                                                       .where(c.c.review != 0), c))])


class ReviewError(ValueError):
    pass


def resolve(conn: Connection, store: str, seq: int, *, user: str, clock=time.time) -> SetAside:
    """Mark the set-aside record ``store``/``seq`` handled."""
    s = db.set_aside
    row = conn.execute(select(s.c.store, s.c.seq, s.c.tx_id, s.c.type, s.c.error, s.c.at, s.c.resolved_at)
                       .where(s.c.store == store, s.c.seq == seq)).first()
    if row is None:
        raise ReviewError(f"store {store} seq {seq}: no record set aside")
    if row.resolved_at is not None:
        raise ReviewError(f"store {store} seq {seq}: resolved already")
    now_ms = int(clock() * 1000)
    conn.execute(update(s).where(s.c.store == store, s.c.seq == seq).values(resolved_at=now_ms))
    log.info("set-aside record %s/%d (%s) resolved by hq:%s", store, seq, row.error, user)
    return SetAside(*row[:6], now_ms)


def render(q: Queues) -> str:
    if not len(q):
        return "nothing to review"
    lines = []
    if q.set_aside:
        lines.append(f"set aside ({len(q.set_aside)}): store records the accounts could not apply")
        lines += [f"  {a.store} seq {a.seq:<8} {a.type:<12} {a.error}"
                  + (" (resolved)" if a.resolved_at else "") for a in q.set_aside]
    if q.unsendable:
        lines.append(f"unsendable ({len(q.unsendable)}): placeholders; the originals are at the stores")
        lines += [f"  {x.store} seq {x.seq:<8} {x.original_type or '?':<12} {x.error}" for x in q.unsendable]
    if q.card_services:
        lines.append(f"card services to review ({len(q.card_services)})")
        lines += [f"  {c.store} seq {c.seq:<8} {c.op or '?':<12} ****{(c.card_no or '')[-4:]} {c.outcome}"
                  for c in q.card_services]
    return "\n".join(lines)


# ================================================================ CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("review", help="what needs a person: records set aside, unsendable placeholders, "
                                             "card services to review")
    p.add_argument("action", nargs="?", choices=["list", "resolve"], default="list")
    p.add_argument("target", nargs="*", help="resolve: STORE SEQ")
    p.add_argument("--store")
    p.add_argument("--all", action="store_true", help="resolved set-aside records too")
    p.add_argument("--json", action="store_true")
    p.add_argument("--user", default=os.environ.get("USER", "admin"))
    p.add_argument("--config", required=True)


def run(args: argparse.Namespace, engine: Engine, *, out=None, publish=None) -> int:
    out = out or sys.stdout
    try:
        if args.action == "resolve":
            if len(args.target) != 2 or not args.target[1].isdigit():
                raise ReviewError("resolve: STORE SEQ")
            with engine.begin() as conn:
                done = resolve(conn, args.target[0], int(args.target[1]), user=args.user)
            out.write(f"resolved: {done.store} seq {done.seq} ({done.error})\n")
            return 0
        with engine.connect() as conn:
            q = queues(conn, store=args.store, include_resolved=args.all)
        out.write((orjson.dumps(q.as_json(), option=orjson.OPT_INDENT_2).decode() if args.json else render(q)) + "\n")
        return 0
    except ReviewError as exc:
        sys.stderr.write(f"storegate-hq review: {exc}\n")
        return 2
