"""Reconciliation: balances two stores spent offline at once, found, recorded, policed, settled.

    storegate-hq reconcile [--json] [--days N (default 7, 0: all)]
    storegate-hq reconcile --settle ACCOUNT --kind KIND [--ref REF] [--user U]

Stores decide offline from their snapshot plus their own records, so two
stores can spend the same stored value, the same points, the same single-use
coupon or the same daily allowance. HQ applies every record anyway (the goods
have left: accounts.py invariant 5) and this module finds what was spent
twice, per member, from the accounts and their history:

=================  ======================================  =====================
kind               found when                              amount
=================  ======================================  =====================
stored_value       the paid part is below zero             fen below zero
points             points owed (spent beyond the lots)     points owed
package            a count package's uses below zero       uses below zero
coupon             a coupon used by more than one sale     extra uses (ref: code)
day_stored_value   stored value paid in one store-local    fen over the cap
                   day at 2+ stores beyond                 (ref: the day)
                   ``stored_value.offline_max_per_day_fen``
day_points         points redeemed likewise (a sale's and  points over the cap
                   gifts') beyond
                   ``redemption.offline_max_points_per_day``
day_gifts          gifts of one id redeemed in one         gifts over the limits
                   store-local day at 2+ stores beyond     (ref: the day; each
                   its ``gifts.<id>.per_member_day_limit`` record names its gift)
=================  ======================================  =====================

Each is a row of ``overdrafts`` (account, kind, ref) with the records that
spent it (store, seq, tx id), recorded in the caller's transaction. Every
kind is found on ingest too (``reconcile_hook``: the accounts a batch
changed that may hold one), and by ``reconcile`` for all accounts.

Policy (rule set ``[reconciliation]``, wire/RULESET.md):

- ``carry``: the negative balance is carried; the next top-up or earning
  pays it first (accounts.py); nothing else happens.
- ``limit``: while open, the account's snapshot rows say it holds nothing to
  spend (a debt as it is; points, coupons, package uses 0: accounts.py
  ``snapshot_rows``), and so do HQ's live answers (hq_bridge/lookup.py).
  Every active card on it goes out at once as a ``limited`` deny delta
  (欠款限用: a store identifies the card, it accrues and takes top-ups,
  offline it spends nothing; online HQ's live answer decides), and its snapshot
  rows say ``limited`` too; settled, they are lifted (``cards_changed``, as
  for ``block``). ``Reconciliation.limited`` / ``unlimited``: the accounts
  under the policy now / lifted this run.
- ``block``: while open, the account is ``blocked`` and every active card on
  it goes out as a ``blocked`` deny delta (欠款冻结: a store identifies the
  card, lets it spend nothing and takes a top-up to settle); settled, they are
  lifted (``cards_changed``: (card_no, before, after, None), the shape of
  AccountStore's BatchResult, for ``accounts.deny_entries``). Only settling
  lifts a block: neither a counter's unfreeze nor HQ's ``card unfreeze``
  (hq_bridge/members.py ``card_op``, ``deny_list_action``).

A card issued on a blocked or limited account (a replacement 补办, a 附属卡;
at a counter: ``reconcile_hook``; at HQ: members.py ``card_op``) goes out
with the account's restriction at once, and is lifted with the account.

Overdrafts of stored value below ``tolerance_fen`` and points below
``tolerance_points`` are carried whatever the policy. Daily-allowance
overruns (gift day limits too: online a store counts the day's gifts of
every store from HQ's live answer, offline only its own) are reported and recorded (settled at once, ``settled_by =
"report"``: there is nothing to pay back beyond the balance itself, which
has its own row when it went below zero) and never limit or block.

Settling: a balance overdraft is settled when the balance is back at zero or
above (a top-up, a return, points earned), found by ``reconcile`` or at once
by ``reconcile_hook`` on ingest; a coupon's only by an operator
(``settle``: the member paid its value at the desk). Every policy step is a
``reconcile`` history entry on the account (no balance moves).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Mapping

import orjson
from sqlalchemy import or_, select, update
from sqlalchemy.engine import Connection, Engine

from hq_bridge import db
from hq_bridge.accounts import GIFT_ENTRY, HistoryEntry, _entry_row, deny_entries, limited_accounts, overdrafts

POLICIES = ("carry", "limit", "block")
BALANCE_KINDS = ("stored_value", "points", "package", "coupon")
DAY_KINDS = ("day_stored_value", "day_points", "day_gifts")
DAY_MS = 86_400_000
GIFT_SCAN = 2000                 # an account's newest history entries a live answer counts the day's gifts in


# ================================================================ the day's gifts (one place: reconcile and lookup)

def gift_of(at: str | None, detail: Mapping) -> tuple[str, str, int] | None:
    """(store-local day, gift id, gifts) of a ``gift_redemption`` history
    entry (``at``: the record's store time, whose date is its store-local
    day, as for the other daily allowances), None if it names none."""
    gid, qty = detail.get("gift_id"), detail.get("qty")
    if not at or not isinstance(gid, str) or type(qty) is not int or qty <= 0:
        return None
    return at[:10], gid, qty


def add_gift(counts: dict[str, int], gift_id: str, qty: int) -> dict[str, int]:
    counts[gift_id] = counts.get(gift_id, 0) + qty
    return counts


def day_gift_counts(conn: Connection, account_id: str, day: str, *, scan: int = GIFT_SCAN) -> dict[str, int]:
    """The account's gifts of the store-local ``day`` at every store, as HQ
    has applied them ({gift id: gifts}): HQ's live answer (hq_bridge/lookup.py),
    read in its transaction. Bounded: the account's newest ``scan`` history
    entries (the index on account_id, id), where the day's are unless a store
    sends a backlog of more than that afterwards (then fewer are counted and
    reconciliation reports what went past the limit)."""
    h = db.account_history
    recent = select(h.c.kind, h.c.at, h.c.detail).where(h.c.account_id == account_id) \
        .order_by(h.c.id.desc()).limit(scan).subquery()
    counts: dict[str, int] = {}
    for at, detail in conn.execute(select(recent.c.at, recent.c.detail).where(recent.c.kind == GIFT_ENTRY)):
        g = gift_of(at, orjson.loads(detail) if detail else {})
        if g and g[0] == day:
            add_gift(counts, g[1], g[2])
    return counts


def gifts_over(recs: Iterable[Mapping], gifts: Mapping | None) -> dict[str, int]:
    """Pure: {gift id: gifts beyond its ``per_member_day_limit``} of one
    account's gift records of one day ([{store, gift_id, amount}]), for the
    gifts given at two or more stores (one store keeps its own limit)."""
    counts: dict[str, int] = {}
    stores: dict[str, set] = {}
    for r in recs:
        add_gift(counts, r["gift_id"], r["amount"])
        stores.setdefault(r["gift_id"], set()).add(r["store"])
    out = {}
    for gid, n in counts.items():
        limit = ((gifts or {}).get(gid) or {}).get("per_member_day_limit")
        if limit is not None and n > limit and len(stores[gid]) > 1:
            out[gid] = n - limit
    return out


@dataclass
class Overdraft:
    account_id: str
    kind: str
    ref: str
    amount: int
    records: list = field(default_factory=list)    # [{store, seq, tx_id, amount}]
    action: str = "carry"
    state: str = "open"
    new: bool = False
    detected_at: int = 0
    card_no: str | None = None


@dataclass
class Reconciliation:
    overdrafts: list[Overdraft] = field(default_factory=list)   # open ones and those found this run
    settled: list[Overdraft] = field(default_factory=list)      # settled this run
    cards_changed: list = field(default_factory=list)           # deny (block, limit) and lift
    limited: list[str] = field(default_factory=list)            # accounts now under "limit": refresh snapshots
    unlimited: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"overdrafts": [asdict(o) for o in self.overdrafts], "settled": [asdict(o) for o in self.settled],
                "cards_changed": [list(c) for c in self.cards_changed], "deny": deny_entries(self.cards_changed),
                "limited": self.limited, "unlimited": self.unlimited,
                "totals": {k: sum(o.amount for o in self.overdrafts if o.kind == k and o.state == "open")
                           for k in BALANCE_KINDS + DAY_KINDS}}


def _settings(rules: Mapping | None) -> dict:
    r = dict((rules or {}).get("reconciliation") or {})
    r.setdefault("overdraft_policy", "carry")
    if r["overdraft_policy"] not in POLICIES:
        raise ValueError(f"reconciliation.overdraft_policy: one of {', '.join(POLICIES)}")
    return r


def action_for(kind: str, amount: int, rules: Mapping | None) -> str:
    """Pure: the policy an overdraft gets."""
    s = _settings(rules)
    if kind in DAY_KINDS:
        return "carry"
    if kind == "stored_value" and amount <= s.get("tolerance_fen", 0):
        return "carry"
    if kind == "points" and amount <= s.get("tolerance_points", 0):
        return "carry"
    return s["overdraft_policy"]


# ================================================================ finding

def day_caps(rules: Mapping | None) -> tuple[int, int]:
    """The offline daily allowances: (stored value fen, points); 0: none."""
    r = rules or {}
    return (int((r.get("stored_value") or {}).get("offline_max_per_day_fen", 0) or 0),
            int((r.get("redemption") or {}).get("offline_max_points_per_day", 0) or 0))


def past_a_day_cap(acct, caps: tuple[int, int]) -> bool:
    """The account's day (chain-wide at HQ) is past an allowance: maybe overrun at 2+ stores."""
    sv_cap, pts_cap = caps
    return bool(sv_cap and acct.day_stored_value_paid_fen > sv_cap or pts_cap and acct.day_points_redeemed > pts_cap)


def gift_day_limits(rules: Mapping | None) -> bool:
    return any(isinstance(g, Mapping) and g.get("per_member_day_limit")
               for g in ((rules or {}).get("gifts") or {}).values())


def _spenders(conn: Connection, aid: str, column, current: int) -> list[dict]:
    """Walking the history back from now: the entries that spent while the
    balance after them was below zero (the records that overdrew it)."""
    h = db.account_history
    out, running, days = [], current, set()
    rows = conn.execute(select(h.c.store, h.c.seq, h.c.tx_id, h.c.at, column).where(h.c.account_id == aid, column != 0)
                        .order_by(h.c.id.desc()).limit(500))
    for store, seq, tx_id, at, d in rows:
        if running >= 0:
            # Before that, the balance covered the spending; the spends of the same days at
            # other stores are the other side of the collision.
            if not (d < 0 and at and at[:10] in days):
                break
        elif at:
            days.add(at[:10])
        if d < 0:
            out.append({"store": store, "seq": seq, "tx_id": tx_id, "amount": -d})
        running -= d
    return list(reversed(out))


def find_overdrafts(conn: Connection, rules: Mapping | None = None, *, account_ids: Iterable[str] | None = None,
                    since_ms: int | None = None) -> list[Overdraft]:
    """Every overdraft now (of ``account_ids``, or all accounts). Coupons and
    daily allowances are looked for in the history applied since ``since_ms``
    (default: all of it)."""
    a, p, h = db.accounts, db.packages, db.account_history
    ids = sorted(set(account_ids)) if account_ids is not None else None
    found: list[Overdraft] = []

    def scoped(q, col):
        return q.where(db.in_(conn, col, ids)) if ids is not None else q

    if ids is not None and not ids:
        return []
    for aid, paid, owed in conn.execute(scoped(select(a.c.account_id, a.c.paid_fen, a.c.points_owed).where(
            or_(a.c.paid_fen < 0, a.c.points_owed > 0)), a.c.account_id)):
        if paid < 0:
            found.append(Overdraft(aid, "stored_value", "", -paid, _spenders(conn, aid, h.c.d_paid_fen, paid)))
        if owed > 0:
            found.append(Overdraft(aid, "points", "", owed, _spenders(conn, aid, h.c.d_points, -owed)))
    for aid, pid, left in conn.execute(scoped(select(p.c.account_id, p.c.package_id, p.c.uses_left)
                                              .where(p.c.uses_left < 0), p.c.account_id)):
        recs = [{"store": s, "seq": q, "tx_id": t, "amount": -d} for s, q, t, d in conn.execute(
            select(h.c.store, h.c.seq, h.c.tx_id, h.c.d_uses).where(h.c.account_id == aid, h.c.package_id == pid,
                                                                     h.c.d_uses < 0).order_by(h.c.id.desc()).limit(20))]
        found.append(Overdraft(aid, "package", pid, -left, list(reversed(recs))))
    # coupons and daily allowances: from the sale entries, and the gift entries (points, gifts)
    q = select(h.c.account_id, h.c.store, h.c.seq, h.c.tx_id, h.c.at, h.c.detail, h.c.kind) \
        .where(h.c.kind.in_(("sale", GIFT_ENTRY)))
    if since_ms is not None:
        q = q.where(h.c.recorded_at >= since_ms)
    q = scoped(q, h.c.account_id).order_by(h.c.id)
    sv_cap, pts_cap = day_caps(rules)
    coupon_uses: dict[tuple, list] = {}
    days: dict[tuple, list] = {}
    gift_days: dict[tuple, list] = {}
    for aid, store, seq, tx_id, at, detail, kind in conn.execute(q):
        d = orjson.loads(detail) if detail else {}
        rec = {"store": store, "seq": seq, "tx_id": tx_id}
        if kind == GIFT_ENTRY:   # its points count in the day's redeemed points, as at the counter
            g = gift_of(at, d)
            if g:
                days.setdefault((aid, g[0]), []).append({**rec, "sv": 0, "points": d.get("points", 0)})
                gift_days.setdefault((aid, g[0]), []).append({**rec, "gift_id": g[1], "amount": g[2]})
            continue
        for code in d.get("coupons") or ():
            coupon_uses.setdefault((aid, code), []).append({**rec, "amount": 1})
        if (d.get("sv") or d.get("redeemed")) and at:
            days.setdefault((aid, at[:10]), []).append({**rec, "sv": d.get("sv", 0), "points": d.get("redeemed", 0)})
    for (aid, code), uses in coupon_uses.items():
        if len(uses) > 1:
            found.append(Overdraft(aid, "coupon", code, len(uses) - 1, uses))
    for (aid, day), recs in days.items():
        if len({r["store"] for r in recs}) < 2:
            continue   # one store keeps its own daily caps
        sv = sum(r["sv"] for r in recs)
        pts = sum(r["points"] for r in recs)
        if sv_cap and sv > sv_cap:
            found.append(Overdraft(aid, "day_stored_value", day, sv - sv_cap,
                                   [{k: r[k] for k in ("store", "seq", "tx_id")} | {"amount": r["sv"]}
                                    for r in recs if r["sv"]]))
        if pts_cap and pts > pts_cap:
            found.append(Overdraft(aid, "day_points", day, pts - pts_cap,
                                   [{k: r[k] for k in ("store", "seq", "tx_id")} | {"amount": r["points"]}
                                    for r in recs if r["points"]]))
    gift_rules = (rules or {}).get("gifts") or {}
    for (aid, day), recs in gift_days.items():
        over = gifts_over(recs, gift_rules)
        if over:
            found.append(Overdraft(aid, "day_gifts", day, sum(over.values()),
                                   [r for r in recs if r["gift_id"] in over]))
    return found


# ================================================================ recording, policy, settling

def _entry(aid: str, user: str, now: datetime, detail: dict) -> HistoryEntry:
    import uuid
    return HistoryEntry(aid, "reconcile", tx_id=f"hq-{uuid.uuid4().hex[:24]}", operator=f"hq:{user}"[:64],
                        at=now.isoformat(timespec="seconds"), terminal="hq", detail=detail)


def reconcile(conn: Connection, rules: Mapping | None = None, *, account_ids: Iterable[str] | None = None,
              since_ms: int | None = None, clock=time.time, user: str = "reconcile") -> Reconciliation:
    """Find the overdrafts (of ``account_ids``, or all), record them, settle
    those no longer there, apply the chain's policy; in the caller's transaction."""
    t = clock()
    now, now_ms = datetime.fromtimestamp(t, timezone.utc), int(t * 1000)
    o = overdrafts
    ids = sorted(set(account_ids)) if account_ids is not None else None
    found = find_overdrafts(conn, rules, account_ids=ids, since_ms=since_ms)
    q = select(o)
    if ids is not None:
        q = q.where(db.in_(conn, o.c.account_id, ids)) if ids else q.where(o.c.account_id.is_(None))
    existing = {(r["account_id"], r["kind"], r["ref"]): dict(r) for r in conn.execute(q).mappings()}
    was_limited = {k[0] for k, r in existing.items() if r["state"] == "open" and r["action"] == "limit"}
    out = Reconciliation()
    entries: list[HistoryEntry] = []
    seen = set()
    touched: set[str] = set()
    for od in found:
        key = (od.account_id, od.kind, od.ref)
        seen.add(key)
        old = existing.get(key)
        od.action = action_for(od.kind, od.amount, rules)
        day_kind = od.kind in DAY_KINDS
        if old is not None and old["state"] == "settled" and (
                day_kind or (od.kind == "coupon" and od.amount <= old["amount"])):
            continue     # reported already; a coupon settled by hand stays settled until it is used again
        reopened = old is None or old["state"] == "settled"
        od.new = reopened
        od.detected_at = now_ms if reopened else old["detected_at"]
        od.state = "settled" if day_kind else "open"
        row = {"account_id": od.account_id, "kind": od.kind, "ref": od.ref, "amount": od.amount, "state": od.state,
               "action": od.action, "detail": orjson.dumps({"records": od.records[-50:]}).decode(),
               "detected_at": od.detected_at, "settled_at": now_ms if day_kind else None,
               "settled_by": "report" if day_kind else None, "updated_at": now_ms}
        db.upsert(conn, o, [row], ["account_id", "kind", "ref"])
        if reopened:
            entries.append(_entry(od.account_id, user, now, {"overdraft": od.kind, "ref": od.ref,
                                                              "amount": od.amount, "action": od.action,
                                                              "records": od.records[-10:]}))
        touched.add(od.account_id)
        out.overdrafts.append(od)
    for key, old in existing.items():
        if key in seen or old["state"] != "open" or old["kind"] == "coupon":
            if key not in seen and old["state"] == "open" and old["kind"] == "coupon":
                out.overdrafts.append(Overdraft(old["account_id"], old["kind"], old["ref"], old["amount"],
                                                orjson.loads(old["detail"] or "{}").get("records", []),
                                                old["action"], "open", False, old["detected_at"]))
            continue
        conn.execute(update(o).where(o.c.account_id == key[0], o.c.kind == key[1], o.c.ref == key[2])
                     .values(state="settled", settled_at=now_ms, settled_by="auto", updated_at=now_ms))
        entries.append(_entry(key[0], user, now, {"settled": key[1], "ref": key[2], "amount": old["amount"],
                                                  "action": old["action"]}))
        out.settled.append(Overdraft(key[0], key[1], key[2], old["amount"], [], old["action"], "settled"))
        touched.add(key[0])
    _apply_policy(conn, sorted(touched), out, entries, user, now, now_ms, was_limited)
    if entries:
        db.insert_rows(conn, db.account_history, [_entry_row(e, now_ms) for e in entries])
    _card_of(conn, out.overdrafts + out.settled)
    return out


def _apply_policy(conn: Connection, ids: list[str], out: Reconciliation, entries: list, user: str,
                  now: datetime, now_ms: int, was_limited: set[str] = frozenset()) -> None:
    """Block, limit or lift each touched account by its open overdrafts'
    actions (``was_limited``: the accounts with an open ``limit`` before this
    run); the account's active cards go out as the change of what the stores
    are told (active, ``limited``, ``blocked``: a block wins over a limit)."""
    if not ids:
        return
    o, a, c = overdrafts, db.accounts, db.cards
    actions: dict[str, set] = {}
    for aid, action in conn.execute(select(o.c.account_id, o.c.action).where(
            db.in_(conn, o.c.account_id, ids), o.c.state == "open")):
        actions.setdefault(aid, set()).add(action)
    status = dict(conn.execute(select(a.c.account_id, a.c.status).where(db.in_(conn, a.c.account_id, ids))).all())
    for aid in ids:
        acts = actions.get(aid, set())
        if "limit" in acts:
            out.limited.append(aid)
        elif aid in was_limited or any(x.account_id == aid and x.action == "limit" for x in out.settled):
            out.unlimited.append(aid)
        if status.get(aid) not in ("active", "blocked"):
            continue     # frozen, cancelled, expired: the stores are told that, whatever the policy
        block = "block" in acts
        before = "blocked" if status[aid] == "blocked" else "limited" if aid in was_limited else "active"
        after = "blocked" if block else "limited" if "limit" in acts else "active"
        if before == after:
            continue
        cards = conn.execute(select(c.c.card_no).where(c.c.account_id == aid, c.c.status == "active")
                             .order_by(c.c.card_no)).scalars().all()
        out.cards_changed += [(no, before, after, None) for no in cards]
        new = "blocked" if block else "active"
        if new != status[aid]:
            conn.execute(update(a).where(a.c.account_id == aid).values(status=new, updated_at=now_ms))
            entries.append(_entry(aid, user, now, {"account_status": [status[aid], new], "cards": cards}))
        else:
            entries.append(_entry(aid, user, now, {"cards_told": [before, after], "cards": cards}))


def restrictions(conn: Connection, account_ids: Iterable[str]) -> dict[str, str]:
    """{account_id: ``blocked`` | ``limited``} of the accounts reconciliation
    holds now (a block wins over a limit); the others are not in it."""
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    a = db.accounts
    out = {aid: "limited" for aid in limited_accounts(conn, ids)}
    out.update((aid, "blocked") for aid in conn.execute(select(a.c.account_id).where(
        db.in_(conn, a.c.account_id, ids), a.c.status == "blocked")).scalars())
    return out


def new_cards_restricted(conn: Connection, cards_changed: Iterable[tuple]) -> list[tuple]:
    """The cards a store's records issued (a replacement 补办, a 附属卡, a card
    issued to a member) on an account reconciliation holds: (card_no, None,
    ``blocked`` | ``limited``, None), for the deny delta, so that every store
    is told at once, not at the next snapshot. Only new cards: a store's
    record never lifts, and an unfreeze at a counter is HQ's to broadcast."""
    new = sorted({no for no, before, after, _r in cards_changed if before is None and after == "active"})
    if not new:
        return []
    c = db.cards
    owner = dict(conn.execute(select(c.c.card_no, c.c.account_id).where(db.in_(conn, c.c.card_no, new),
                                                                        c.c.status == "active")).all())
    held = restrictions(conn, owner.values())
    return [(no, None, held[owner[no]], None) for no in new if owner.get(no) in held]


def _card_of(conn: Connection, ods: list[Overdraft]) -> None:
    ids = {od.account_id for od in ods}
    if not ids:
        return
    c = db.cards
    best: dict[str, str] = {}
    for aid, no, role, status in conn.execute(select(c.c.account_id, c.c.card_no, c.c.role, c.c.status).where(
            db.in_(conn, c.c.account_id, ids)).order_by(c.c.card_no)):
        if role == "primary" and (status == "active" or aid not in best):
            best[aid] = no
        best.setdefault(aid, no)
    for od in ods:
        od.card_no = best.get(od.account_id)


def settle(conn: Connection, account_id: str, kind: str, ref: str = "", *, user: str = "admin",
           clock=time.time) -> Reconciliation:
    """An operator settles an overdraft (e.g. a coupon's value paid at the
    desk); the account's policy is lifted when nothing else is open."""
    t = clock()
    now, now_ms = datetime.fromtimestamp(t, timezone.utc), int(t * 1000)
    o = overdrafts
    row = conn.execute(select(o).where(o.c.account_id == account_id, o.c.kind == kind, o.c.ref == ref,
                                       o.c.state == "open")).mappings().first()
    if row is None:
        raise ValueError(f"no open {kind} overdraft {ref!r} on account {account_id}")
    was_limited = {account_id} if conn.execute(select(o.c.account_id).where(
        o.c.account_id == account_id, o.c.state == "open", o.c.action == "limit")).first() else set()
    conn.execute(update(o).where(o.c.account_id == account_id, o.c.kind == kind, o.c.ref == ref)
                 .values(state="settled", settled_at=now_ms, settled_by=f"hq:{user}"[:64], updated_at=now_ms))
    out = Reconciliation(settled=[Overdraft(account_id, kind, ref, row["amount"], [], row["action"], "settled")])
    entries = [_entry(account_id, user, now, {"settled": kind, "ref": ref, "amount": row["amount"],
                                              "action": row["action"]})]
    _apply_policy(conn, [account_id], out, entries, user, now, now_ms, was_limited)
    db.insert_rows(conn, db.account_history, [_entry_row(e, now_ms) for e in entries])
    return out


def reconcile_hook(rules, clock=time.time):
    """A hook for AccountStore(hooks=[...]): reconciles the accounts a batch
    changed that may hold an overdraft (overdrawn, a record applied with a
    problem such as a coupon not held, the day past an allowance, a gift
    redeemed under day limits) or have open ones: found and settled on
    ingest. Adds block/limit/lift cards to the batch's ``hq_cards_changed``,
    and the cards the batch issued on an account held (``new_cards_restricted``)."""
    def hook(conn: Connection, store: str, result) -> None:
        ids = sorted(result.accounts_changed)
        if not ids:
            return
        o = overdrafts
        r = rules() if callable(rules) else rules
        caps = day_caps(r)
        after = result.accounts_after   # an account the batch did not hold is looked at anyway
        hot = {aid for aid in ids if aid not in after or after[aid].overdrawn or past_a_day_cap(after[aid], caps)}
        hot |= result.flagged
        if gift_day_limits(r):
            hot |= result.gifted
        hot |= set(conn.execute(select(o.c.account_id).where(db.in_(conn, o.c.account_id, ids),
                                                               o.c.state == "open")).scalars())
        if not hot:
            return
        res = reconcile(conn, r, account_ids=hot, clock=clock, since_ms=int(clock() * 1000) - 2 * DAY_MS)
        result.hq_cards_changed += res.cards_changed
        told = {no for no, *_ in res.cards_changed}
        result.hq_cards_changed += [x for x in new_cards_restricted(conn, result.cards_changed) if x[0] not in told]
        result.overdrafts = res.overdrafts
    return hook


# ================================================================ report

def render(res: Reconciliation) -> str:
    lines = [f"{'account':<16} {'card':<20} {'kind':<17} {'ref':<12} {'amount':>10} {'action':<6} {'state':<8} "
             "records"]
    for od in res.overdrafts + res.settled:
        amt = f"{od.amount / 100:.2f}" if od.kind in ("stored_value", "day_stored_value") else str(od.amount)
        recs = ", ".join(f"{r.get('store') or 'hq'}/{r.get('seq')}" for r in od.records[-6:])
        lines.append(f"{od.account_id:<16} {od.card_no or '':<20} {od.kind:<17} {od.ref:<12} {amt:>10} "
                     f"{od.action:<6} {od.state:<8} {recs}")
    if len(lines) == 1:
        lines.append("(no overdrafts)")
    if res.cards_changed:
        lines.append("cards: " + ", ".join(f"{c[0]} {c[2]}" for c in res.cards_changed))
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("reconcile", help="overdrafts of balances spent offline at several stores")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--days", type=int, default=7,
                   help="look for coupon and daily overruns in what HQ applied in the last N days (default 7; "
                        "0: all history); balance overdrafts are always found whole")
    p.add_argument("--settle", metavar="ACCOUNT", help="settle an open overdraft of this account by hand")
    p.add_argument("--kind", choices=BALANCE_KINDS)
    p.add_argument("--ref", default="")
    p.add_argument("--user", default="admin")


def run(args: argparse.Namespace, engine: Engine, *, out=None, publish=None) -> int:
    """``publish(entries, reason)``: the caller's deny-delta publisher (block / lift)."""
    from hq_bridge.policy import chain_rules

    out = out or sys.stdout
    try:
        with engine.begin() as conn:
            if args.settle:
                if not args.kind:
                    raise ValueError("--settle needs --kind")
                res = settle(conn, args.settle, args.kind, args.ref, user=args.user)
            else:
                since = int(time.time() * 1000) - args.days * DAY_MS if args.days else None
                res = reconcile(conn, chain_rules(conn), since_ms=since)
    except ValueError as exc:
        sys.stderr.write(f"storegate-hq reconcile: {exc}\n")
        return 2
    entries = deny_entries(res.cards_changed)
    if entries and publish is not None:
        publish(entries, "reconcile")
    out.write((orjson.dumps(res.as_json(), option=orjson.OPT_INDENT_2).decode() if args.json else render(res))
              + "\n")
    return 0
