"""Policy that moves accounts over time, from the rule set, evaluated at HQ.

    storegate-hq nightly [--date YYYY-MM-DD] [--json]     # tiers (up and down), then points expiry
    storegate-hq topup-refund TX_ID [--json]              # refund a top-up: its bonus taken back first

Rules (wire/RULESET.md, "Accounts at HQ"):

- **Tiers.** ``[tiers.<t>] upgrade = { spend_fen, points_earned, window_days }``:
  an account moves up to the best-ranked tier whose upgrade it meets (any
  threshold named) over the last ``window_days``, on ingest (``tier_hook``,
  a hook for AccountStore.apply_batch: only upgrades, only the accounts the
  batch changed) and nightly. ``downgrade = { spend_fen, points_earned,
  window_days, to }``: nightly only, an account that has held its tier at
  least ``window_days`` and meets none of the thresholds named over the last
  ``window_days`` moves to ``to`` (default: the best lower tier whose upgrade it
  meets, else ``default_tier``). Spend is what member sales were paid in cash
  and stored value (``total - redeemed_fen``) less what returns gave back;
  points earned are those sales' points less what returns took back; both
  from ``account_history`` by when HQ applied them (``recorded_at``).
  A tier move is a history entry ``tier`` (no balance moves) with the rule
  and the figures that made it.
- **Points expiry.** ``accounts.points_expiry_months`` (rolling: end of the
  month N months after the month earned) or ``accounts.points_expiry_date``
  (fixed "MM-DD" of the year ``points_expiry_years`` after the year earned).
  Nightly, every lot whose date has passed expires, oldest first, as a
  history entry ``expiry`` (d_points = -remaining, detail.lots), so points
  stay the sum of their history and of their lots.
- **Stored-value refunds.** ``topup_refund``: a refunded top-up takes its
  bonus back first — from the bonus part while it lasts, the bonus already
  spent from the paid part — and pays out what is left of the paid part, at
  most what was paid. ``withdraw`` (取款, ``accounts.withdrawal = "paid_part"``):
  pays out (part of) the paid part; the bonus part is forfeited in proportion
  (``accounts.withdrawal_bonus``: forfeit_proportional | forfeit_all | keep).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Callable, Iterable, Mapping

import orjson
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection, Engine

from hq_bridge import db
from hq_bridge.accounts import HistoryEntry, _entry_row, withdrawal_forfeit

DAY_MS = 86_400_000


class PolicyError(ValueError):
    """An operation the chain's policy does not allow; the message says why."""


def chain_rules(conn: Connection) -> dict:
    """The chain layer's effective rule set (``rule_layers`` scope ``chain``),
    with defaults; {} when none is stored yet."""
    from wire.ruleset import RulesetError, effective_ruleset, with_defaults

    doc = conn.execute(select(db.rule_layers.c.doc).where(db.rule_layers.c.scope == "chain")).scalar()
    if not doc:
        return {}
    layer = orjson.loads(doc)
    try:
        return with_defaults(effective_ruleset([layer]))
    except RulesetError:
        return layer


def _hq_entry(account_id: str, kind: str, user: str, now: datetime, **kw) -> HistoryEntry:
    import uuid
    return HistoryEntry(account_id, kind, tx_id=f"hq-{uuid.uuid4().hex[:24]}", operator=f"hq:{user}"[:64],
                        at=now.isoformat(timespec="seconds"), terminal="hq", **kw)


def _now(clock) -> tuple[datetime, int]:
    t = clock()
    return datetime.fromtimestamp(t, timezone.utc), int(t * 1000)


# ================================================================ tiers

@dataclass(frozen=True)
class TierMove:
    account_id: str
    before: str
    after: str
    rule: str                  # upgrade | downgrade
    spend_fen: int
    points_earned: int
    window_days: int


def _tier_table(rules: Mapping) -> dict[str, dict]:
    return dict((rules or {}).get("tiers") or {})


def _windows(tiers: dict) -> set[int]:
    out = set()
    for t in tiers.values():
        for k in ("upgrade", "downgrade"):
            if t.get(k):
                out.add(int(t[k].get("window_days", 365)))
    return out


def window_totals(conn: Connection, account_ids: Iterable[str], since_ms: int) -> dict[str, tuple[int, int]]:
    """{account: (spend_fen, points_earned)} over sales and returns HQ applied since ``since_ms``."""
    h = db.account_history
    out: dict[str, tuple[int, int]] = {}
    ids = sorted(set(account_ids))
    for i in range(0, len(ids), 5000):
        out.update((aid, (int(spend), int(earned))) for aid, spend, earned in conn.execute(
            select(h.c.account_id, func.sum(h.c.d_spend_fen), func.sum(h.c.d_earned)).where(
                db.in_(conn, h.c.account_id, ids[i:i + 5000]), h.c.kind.in_(("sale", "return")),
                h.c.recorded_at >= since_ms).group_by(h.c.account_id)))
    return out


def _meets(rule: Mapping | None, spend: int, earned: int) -> bool:
    if not rule:
        return False
    return ("spend_fen" in rule and spend >= rule["spend_fen"]) or \
        ("points_earned" in rule and earned >= rule["points_earned"])


def decide_tier(tier: str, totals: Mapping[int, tuple[int, int]], held_days: float, rules: Mapping,
                nightly: bool) -> tuple[str, str, int] | None:
    """Pure: (new tier, rule, window_days) or None. ``totals``: window_days ->
    (spend, earned)."""
    tiers = _tier_table(rules)
    if tier not in tiers:
        return None
    rank = tiers[tier]["rank"]

    def tot(rule):
        return totals.get(int(rule.get("window_days", 365)), (0, 0))

    ups = sorted(((t["rank"], code) for code, t in tiers.items()
                  if t.get("upgrade") and _meets(t["upgrade"], *tot(t["upgrade"]))), reverse=True)
    if ups and ups[0][0] > rank:
        code = ups[0][1]
        return code, "upgrade", int(tiers[code]["upgrade"].get("window_days", 365))
    down = tiers[tier].get("downgrade")
    if not nightly or not down:
        return None
    window = int(down.get("window_days", 365))
    if held_days < window or _meets(down, *tot(down)):
        return None
    to = down.get("to")
    if to is None:
        lower = [(r, c) for r, c in ups if r < rank]
        to = lower[0][1] if lower else (rules or {}).get("default_tier")
    if not to or to not in tiers or tiers[to]["rank"] >= rank:
        return None
    return to, "downgrade", window


def _held_since(conn: Connection, ids: list[str]) -> dict[str, int]:
    h, a = db.account_history, db.accounts
    out = dict(conn.execute(select(a.c.account_id, a.c.created_at).where(db.in_(conn, a.c.account_id, ids))).all())
    for aid, at in conn.execute(select(h.c.account_id, func.max(h.c.recorded_at)).where(
            db.in_(conn, h.c.account_id, ids), h.c.kind == "tier").group_by(h.c.account_id)):
        out[aid] = at
    return out


def evaluate_tiers(conn: Connection, account_ids: Iterable[str], rules: Mapping, *, nightly: bool,
                   clock=time.time, user: str = "policy", current: Mapping[str, str] | None = None) -> list[TierMove]:
    """Move the accounts' tiers by the rules (``nightly``: down too), each
    move a ``tier`` history entry. In the caller's transaction. ``current``:
    the accounts' tiers as the caller holds them (locked); read when absent."""
    tiers = _tier_table(rules)
    windows = _windows(tiers)
    ids = sorted(set(account_ids))
    if not windows or not ids:
        return []
    now, now_ms = _now(clock)
    a = db.accounts
    moves: list[TierMove] = []
    for i in range(0, len(ids), 5000):
        chunk = ids[i:i + 5000]
        tiers_now = current if current is not None else dict(conn.execute(
            select(a.c.account_id, a.c.tier).where(db.in_(conn, a.c.account_id, chunk))).all())
        by_window = {w: window_totals(conn, chunk, now_ms - w * DAY_MS) for w in windows}
        held = _held_since(conn, chunk) if nightly else {}
        entries = []
        for aid in chunk:
            if aid not in tiers_now:
                continue
            totals = {w: t.get(aid, (0, 0)) for w, t in by_window.items()}
            held_days = (now_ms - held.get(aid, now_ms)) / DAY_MS
            got = decide_tier(tiers_now[aid], totals, held_days, rules, nightly)
            if got is None:
                continue
            new, rule, window = got
            spend, earned = totals[window]
            moves.append(TierMove(aid, tiers_now[aid], new, rule, spend, earned, window))
            entries.append(_hq_entry(aid, "tier", user, now, detail={
                "tier": [tiers_now[aid], new], "rule": rule, "spend_fen": spend, "points_earned": earned,
                "window_days": window}))
        for m in moves[len(moves) - len(entries):]:
            conn.execute(update(a).where(a.c.account_id == m.account_id).values(tier=m.after, updated_at=now_ms))
        if entries:
            db.insert_rows(conn, db.account_history, [_entry_row(e, now_ms) for e in entries])
    return moves


def tier_hook(rules: Mapping | Callable[[], Mapping], clock=time.time) -> Callable:
    """A hook for AccountStore(hooks=[...]): upgrades the accounts whose tier
    windows a batch grew (a return or a top-up moves no one up), in the
    batch's transaction. ``rules``: the chain's rule set or a callable giving
    the current one."""
    def hook(conn: Connection, store: str, result) -> None:
        r = rules() if callable(rules) else rules
        if _windows(_tier_table(r)) and result.tier_window_grew:
            after = result.accounts_after
            held = all(aid in after for aid in result.tier_window_grew)   # else read from the database
            result.tier_moves = evaluate_tiers(conn, result.tier_window_grew, r, nightly=False, clock=clock,
                                               current={aid: after[aid].tier for aid in result.tier_window_grew}
                                               if held else None)
    return hook


# ================================================================ points expiry

@dataclass
class ExpiryResult:
    lots: int = 0
    accounts: int = 0
    points: int = 0


def expire_points(conn: Connection, today: date, *, clock=time.time, user: str = "policy",
                  batch: int = 5000) -> ExpiryResult:
    """Expire every lot whose date is before ``today`` (oldest first): the
    lot's remaining points leave the account as an ``expiry`` entry."""
    l, a = db.points_lots, db.accounts
    now, now_ms = _now(clock)
    out = ExpiryResult()
    while True:
        rows = conn.execute(select(l.c.account_id, l.c.expires, l.c.remaining).where(
            l.c.expires < today.isoformat(), l.c.remaining > 0).order_by(l.c.expires, l.c.account_id)
            .limit(batch)).all()
        if not rows:
            return out
        by_account: dict[str, dict[str, int]] = {}
        for aid, exp, rem in rows:
            by_account.setdefault(aid, {})[exp] = rem
        entries = []
        for aid, lots in sorted(by_account.items()):
            total = sum(lots.values())
            conn.execute(update(a).where(a.c.account_id == aid).values(points=a.c.points - total, updated_at=now_ms))
            for exp in sorted(lots):
                conn.execute(update(l).where(l.c.account_id == aid, l.c.expires == exp).values(remaining=0))
            entries.append(_hq_entry(aid, "expiry", user, now, d_points=-total,
                                     detail={"lots": {e: -n for e, n in sorted(lots.items())}}))
            out.lots += len(lots)
            out.accounts += 1
            out.points += total
        db.insert_rows(conn, db.account_history, [_entry_row(e, now_ms) for e in entries])


# ================================================================ nightly

@dataclass
class NightlyResult:
    day: str
    tier_moves: list = field(default_factory=list)
    expiry: ExpiryResult = field(default_factory=ExpiryResult)

    def as_json(self) -> dict:
        return {"day": self.day, "tier_moves": [m.__dict__ for m in self.tier_moves],
                "expired": self.expiry.__dict__}


def nightly(engine: Engine, *, rules: Mapping | None = None, day: date | None = None, clock=time.time,
            chunk: int = 5000) -> NightlyResult:
    """Tiers (up and down) for every account, then points expiry; one
    transaction per chunk of accounts, then one for expiry."""
    day = day or datetime.fromtimestamp(clock(), timezone.utc).date()
    out = NightlyResult(day.isoformat())
    a = db.accounts
    last = ""
    while True:
        with engine.begin() as conn:
            r = rules if rules is not None else chain_rules(conn)
            ids = list(conn.execute(select(a.c.account_id).where(a.c.account_id > last)
                                    .order_by(a.c.account_id).limit(chunk)).scalars())
            if not ids:
                break
            out.tier_moves += evaluate_tiers(conn, ids, r, nightly=True, clock=clock)
            last = ids[-1]
    with engine.begin() as conn:
        out.expiry = expire_points(conn, day, clock=clock)
    return out


# ================================================================ stored value out

@dataclass
class Payout:
    account_id: str
    paid_out_fen: int
    bonus_taken_fen: int
    paid_taken_fen: int
    entry: HistoryEntry
    cards_changed: list = field(default_factory=list)
    detail: dict = field(default_factory=dict)


def _lock_account(conn: Connection, account_id: str):
    q = select(db.accounts.c.paid_fen, db.accounts.c.bonus_fen, db.accounts.c.status) \
        .where(db.accounts.c.account_id == account_id)
    if db.is_postgres(conn):
        q = q.with_for_update()
    return conn.execute(q).first()


def withdraw(conn: Connection, card_no: str, amount_fen: int | None = None, *, user: str = "admin",
             rules: Mapping | None = None, clock=time.time) -> Payout:
    """取款: pay out ``amount_fen`` (default: all) of the paid part, if the
    chain allows it; the bonus part is forfeited by ``accounts.withdrawal_bonus``."""
    acc = dict((rules or {}).get("accounts") or {})
    if acc.get("withdrawal", "none") != "paid_part":
        raise PolicyError("withdraw: the chain's rules do not allow paying out stored value "
                          "(accounts.withdrawal = \"paid_part\")")
    aid = conn.execute(select(db.cards.c.account_id).where(db.cards.c.card_no == card_no)).scalar()
    if aid is None:
        raise PolicyError(f"withdraw: card {card_no} is not known at HQ")
    paid, bonus, _status = _lock_account(conn, aid)
    avail = max(paid, 0)
    amount = avail if amount_fen is None else amount_fen
    if amount <= 0 or amount > avail:
        raise PolicyError(f"withdraw: {amount} fen asked, the paid part holds {avail} fen")
    how = acc.get("withdrawal_bonus", "forfeit_proportional")
    forfeit = withdrawal_forfeit(bonus, amount, avail, how)
    now, now_ms = _now(clock)
    detail = {"paid_out_fen": amount, "bonus_forfeited_fen": forfeit, "bonus_rule": how}
    e = _hq_entry(aid, "withdrawal", user, now, d_paid_fen=-amount, d_bonus_fen=-forfeit, card_no=card_no,
                  detail=detail)
    conn.execute(update(db.accounts).where(db.accounts.c.account_id == aid).values(
        paid_fen=db.accounts.c.paid_fen - amount, bonus_fen=db.accounts.c.bonus_fen - forfeit, updated_at=now_ms))
    conn.execute(db.account_history.insert().values(_entry_row(e, now_ms)))
    return Payout(aid, amount, forfeit, amount, e, detail=detail)


def topup_refund(conn: Connection, tx_id: str, *, user: str = "admin", clock=time.time) -> Payout:
    """Refund the top-up ``tx_id``: its bonus is taken back first (from the
    bonus part; what of it was spent already, from the paid part), then what
    is left of the paid part is paid out, at most what was paid."""
    h = db.account_history
    top = conn.execute(select(h).where(h.c.tx_id == tx_id, h.c.kind == "topup")).mappings().first()
    if top is None:
        raise PolicyError(f"topup-refund: no top-up {tx_id} at HQ")
    if conn.execute(select(h.c.id).where(h.c.ref_tx_id == tx_id, h.c.kind == "topup_refund")).first():
        raise PolicyError(f"topup-refund: top-up {tx_id} is refunded already")
    aid, pay, bonus_given = top["account_id"], top["d_paid_fen"], top["d_bonus_fen"]
    paid, bonus, _status = _lock_account(conn, aid)
    take_bonus = min(bonus_given, bonus)
    spent_bonus = bonus_given - take_bonus               # already spent: charged to the paid part
    payout = max(0, min(pay, max(paid, 0) - spent_bonus))
    paid_taken = payout + min(spent_bonus, max(paid, 0))
    now, now_ms = _now(clock)
    detail = {"pay_fen": pay, "bonus_fen": bonus_given, "bonus_taken_back_fen": take_bonus,
              "bonus_spent_charged_fen": spent_bonus, "paid_out_fen": payout}
    e = _hq_entry(aid, "topup_refund", user, now, d_paid_fen=-paid_taken, d_bonus_fen=-take_bonus,
                  card_no=top["card_no"], ref_tx_id=tx_id, detail=detail)
    conn.execute(update(db.accounts).where(db.accounts.c.account_id == aid).values(
        paid_fen=db.accounts.c.paid_fen - paid_taken, bonus_fen=db.accounts.c.bonus_fen - take_bonus,
        updated_at=now_ms))
    conn.execute(db.account_history.insert().values(_entry_row(e, now_ms)))
    return Payout(aid, payout, take_bonus, paid_taken, e, detail=detail)


# ================================================================ CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("nightly", help="nightly: tier moves, points expiry, reconciliation, then fresh "
                                              "member snapshots to every store")
    p.add_argument("--config", required=True)
    p.add_argument("--date", help="the day to run for (YYYY-MM-DD, default: today in hq.timezone)")
    p.add_argument("--no-snapshots", action="store_true", help="no member snapshots (what reconciliation blocks or lifts still goes out)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(policy_command="nightly")
    r = subparsers.add_parser("topup-refund", help="refund a top-up (its bonus taken back first)")
    r.add_argument("--config", required=True)
    r.add_argument("tx_id")
    r.add_argument("--user", default="admin")
    r.add_argument("--json", action="store_true")
    r.set_defaults(policy_command="topup-refund")


def run(args: argparse.Namespace, engine: Engine, *, out=None, today: date | None = None) -> int:
    """``today``: the chain's business day (hq.timezone), unless ``--date``."""
    out = out or sys.stdout
    try:
        if args.policy_command == "nightly":
            res = nightly(engine, day=date.fromisoformat(args.date) if args.date else today)
            if args.json:
                out.write(orjson.dumps(res.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
            else:
                up = sum(m.rule == "upgrade" for m in res.tier_moves)
                out.write(f"nightly {res.day}: {up} tier upgrades, {len(res.tier_moves) - up} downgrades; "
                          f"{res.expiry.points} points expired from {res.expiry.lots} lots of "
                          f"{res.expiry.accounts} accounts\n")
                for m in res.tier_moves:
                    out.write(f"  {m.account_id}: {m.before} -> {m.after} ({m.rule}: spend {m.spend_fen / 100:.2f}, "
                              f"points {m.points_earned} in {m.window_days} days)\n")
            return 0
        if args.policy_command == "topup-refund":
            with engine.begin() as conn:
                p = topup_refund(conn, args.tx_id, user=args.user)
            if args.json:
                out.write(orjson.dumps({"account_id": p.account_id, **p.detail}).decode() + "\n")
            else:
                out.write(f"top-up {args.tx_id} refunded: pay out {p.paid_out_fen / 100:.2f} "
                          f"(bonus taken back {p.detail['bonus_taken_back_fen'] / 100:.2f}, bonus already spent "
                          f"{p.detail['bonus_spent_charged_fen'] / 100:.2f})\n")
            return 0
    except (PolicyError, ValueError) as exc:
        sys.stderr.write(f"storegate-hq {args.policy_command}: {exc}\n")
        return 2
    return 2
