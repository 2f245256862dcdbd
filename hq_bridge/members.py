"""Members at HQ: registration, bulk import (CSV, XLSX), look-up, and HQ's card services.

    storegate-hq members add --config hq.toml --card 880000000017 [--tier normal] [--name 张三] [--consent] [--birthday 03-15]
    storegate-hq members import --config hq.toml FILE [--dry-run]          # .csv or .xlsx
    storegate-hq members show --config hq.toml CARD [--json] [--history N]
    storegate-hq members card --config hq.toml OP CARD [--new-card N] [--fee-fen F] [--months M] [--amount-fen A]
    (every subcommand also takes --user U: the operator recorded as hq:U)

Everything runs in the caller's transaction (``with engine.begin() as conn``)
and moves balances only through ``account_history`` entries (accounts.py,
invariant 1); HQ's own entries carry ``operator = "hq:<user>"`` and a tx id
``hq-<uuid>``, no store or seq.

Decisions
---------
- **Minimal PII.** A member keeps a masked name (first character and ``*``:
  张三 -> 张*; the full name is never stored), a consent flag (the member
  agreed to the programme's terms; without it the member is still a member,
  but nothing may be used for marketing), a birthday (MM-DD, solar or lunar;
  no year). A phone number is kept only as a keyed hash, HMAC-SHA256 with the
  chain's secret (``STOREGATE_PHONE_KEY``, hex): a plain SHA-256 of an
  11-digit number is reversed by trying them all. Without the key a phone is
  refused, not stored. The hash lets HQ find a member by phone, nothing more.
- **Member ids.** ``members add`` without ``--member-id`` makes ``H<card_no>``.
- **Import.** Columns (header row, any order; names are case-insensitive):
  ``card_no`` and ``tier`` required; ``member_id``, ``name``, ``consent``,
  ``birthday``, ``birthday_calendar``, ``phone``, ``points``, ``balance_fen``,
  ``card_type``, ``expires``, ``primary_card``, ``group_id`` optional. An unknown
  column is refused (a misspelt ``balance`` must not silently import zero
  balances). Every row is checked and every problem named ("row 7, column
  card_no: 88000000001X is not 6-19 digits"; row 1 is the header, so the
  numbers match the spreadsheet's); a card or member id twice in the file or
  already at HQ is refused. Any problem: nothing is imported. Otherwise all
  rows go in one transaction (accounts.import_members) and a summary is
  printed. XLSX is read with openpyxl in read-only mode (a million rows stream);
  a card number stored as a number in the sheet is accepted while exact
  (integer below 2**53), refused otherwise (format the column as text).
- **Card services at HQ.** report_lost (挂失), cancel_lost (取消挂失, lifts only
  ``lost``), freeze (冻结), unfreeze (解冻, lifts ``frozen`` and ``lost``), replace
  (补办: the new card carries the account, role and expiry; the old one is
  ``replaced``), extend (延期 by ``--months``), annual_fee (年费: extends by
  ``accounts.annual_fee_months``, lifts ``expired``), issue_subsidiary (附属卡 on the
  card's account, fee ``accounts.subsidiary_fee_fen`` unless given), withdraw
  (取款: hq_bridge/policy.py ``withdraw``). Fees are paid at the desk: recorded
  in the entry's detail, no balance moves. Each returns ``CardResult`` with
  ``cards_changed`` [(card_no, before, after, replaced_by)] — the caller
  publishes ``deny_entries(cards_changed)`` (hq_bridge/accounts.py) as a signed deny delta.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import hmac
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import orjson
from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine

from hq_bridge import db
from hq_bridge.accounts import (AccountStore, HistoryEntry, ImportError_, _entry_row, add_months, deny_entries,
                                import_members, overdrafts, policy_from_rules)
from wire.ruleset import is_card_no

COLUMNS = ("card_no", "tier", "member_id", "name", "consent", "birthday", "birthday_calendar", "phone", "points",
           "balance_fen", "card_type", "expires", "primary_card", "group_id")
REQUIRED = ("card_no", "tier")
_MMDD = re.compile(r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ID = re.compile(r"^[^\x00-\x1f]{1,64}$")
_YES = {"1", "true", "yes", "y", "是", "同意"}
_NO = {"", "0", "false", "no", "n", "否", "不同意"}


class MemberError(ValueError):
    """A member operation HQ refuses; the message says why."""


# ================================================================ PII

def mask_name(name: str | None) -> str | None:
    """张三 -> 张*, John Smith -> J*: the first character, never the full name."""
    name = (name or "").strip()
    return f"{name[0]}*" if name else None


def phone_key() -> bytes | None:
    key = os.environ.get("STOREGATE_PHONE_KEY")
    return bytes.fromhex(key) if key else None


def phone_hash(phone: str | None, key: bytes | None) -> str | None:
    """HMAC-SHA256 of the phone's digits with the chain's secret; None for no phone."""
    digits = re.sub(r"\D", "", phone or "")
    if not digits:
        return None
    if not key:
        raise MemberError("phone: no STOREGATE_PHONE_KEY set; HQ keeps a phone only as a keyed hash")
    if not 5 <= len(digits) <= 15:
        raise MemberError(f"phone: {len(digits)} digits is not a phone number")
    return hmac.new(key, digits.encode(), hashlib.sha256).hexdigest()


# ================================================================ add

def _now(clock) -> tuple[int, str]:
    t = clock()
    return int(t * 1000), datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _hq_entry(account_id: str, kind: str, user: str, at: str, **kw) -> HistoryEntry:
    return HistoryEntry(account_id, kind, tx_id=f"hq-{uuid.uuid4().hex[:24]}", operator=f"hq:{user}"[:64], at=at,
                        terminal="hq", **kw)


def _tiers(rules: Mapping | None) -> dict:
    return dict((rules or {}).get("tiers") or {})


def add_member(conn: Connection, *, card_no: str, tier: str | None = None, member_id: str | None = None,
               name: str | None = None, consent: bool = False, birthday: str | None = None,
               birthday_calendar: str = "solar", phone: str | None = None, card_type: str | None = None,
               user: str = "admin", rules: Mapping | None = None, clock=time.time) -> dict:
    """Register a member with a new primary card at HQ; the account starts at
    ``tier`` (default: the rule set's default tier). Returns the account view."""
    policy = policy_from_rules(rules)
    tier = tier or policy.default_tier
    if not is_card_no(card_no):
        raise MemberError(f"card_no: {card_no!r} is not 6-19 digits")
    tiers = _tiers(rules)
    if tiers and tier not in tiers:
        raise MemberError(f"tier: unknown tier {tier!r} (one of {', '.join(sorted(tiers))})")
    if birthday and not _MMDD.match(birthday):
        raise MemberError(f"birthday: {birthday!r} is not MM-DD")
    if birthday_calendar not in ("solar", "lunar"):
        raise MemberError("birthday_calendar: solar or lunar")
    member_id = member_id or f"H{card_no}"
    if not _ID.match(member_id):
        raise MemberError(f"member_id: {member_id!r} is not 1-64 printable characters")
    if conn.execute(select(db.cards.c.card_no).where(db.cards.c.card_no == card_no)).first():
        raise MemberError(f"card_no: card {card_no} is at HQ already")
    if conn.execute(select(db.members.c.member_id).where(db.members.c.member_id == member_id)).first() or \
            conn.execute(select(db.accounts.c.account_id).where(db.accounts.c.account_id == member_id)).first():
        raise MemberError(f"member_id: member {member_id} is at HQ already")
    ph = phone_hash(phone, phone_key()) if phone else None
    now_ms, at = _now(clock)
    expires = add_months(date.fromtimestamp(clock()), policy.card_valid_months).isoformat() \
        if policy.card_valid_months else None
    conn.execute(db.members.insert().values(
        member_id=member_id, name_masked=mask_name(name), phone_hash=ph, consent=bool(consent), birthday=birthday,
        birthday_calendar=birthday_calendar, source=f"hq:{user}"[:80], created_at=now_ms, updated_at=now_ms))
    conn.execute(db.accounts.insert().values(
        account_id=member_id, owner_member_id=member_id, tier=tier, status="active", card_type=card_type,
        paid_fen=0, bonus_fen=0, points=0, points_owed=0, day=None, day_stored_value_paid_fen=0,
        day_points_redeemed=0, created_at=now_ms, updated_at=now_ms))
    conn.execute(db.cards.insert().values(
        card_no=card_no, account_id=member_id, member_id=member_id, role="primary", status="active",
        replaced_by=None, card_type=card_type, nfc_uid=None, issued_at=now_ms, expires=expires, updated_at=now_ms))
    e = _hq_entry(member_id, "registration", user, at, card_no=card_no,
                  detail={"consent": bool(consent), "tier": tier, "source": "hq"})
    conn.execute(db.account_history.insert().values(_entry_row(e, now_ms)))
    return account_view(conn, card_no)


# ================================================================ import

@dataclass
class ImportProblem:
    row: int
    column: str | None
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column}: {self.message}" if self.column else \
            f"row {self.row}: {self.message}"


class MemberImportError(ValueError):
    """The file cannot be imported; ``problems`` names every row and column."""

    def __init__(self, problems: list[ImportProblem], more: int = 0) -> None:
        self.problems = problems
        text = "; ".join(str(p) for p in problems[:20])
        if len(problems) > 20 or more:
            text += f"; and {len(problems) - 20 + more if len(problems) > 20 else more} more"
        super().__init__(f"nothing imported: {text}")


@dataclass
class MemberImport:
    rows: int = 0
    members: int = 0
    accounts: int = 0
    cards: int = 0
    points: int = 0
    balance_fen: int = 0
    with_consent: int = 0
    with_phone: int = 0
    tiers: dict = field(default_factory=dict)
    watermarks: dict = field(default_factory=dict)

    def summary(self) -> str:
        tiers = ", ".join(f"{t} {n}" for t, n in sorted(self.tiers.items()))
        return (f"imported {self.rows} rows: {self.members} members, {self.accounts} accounts, {self.cards} cards "
                f"({tiers}); points {self.points}, stored value {self.balance_fen / 100:.2f}; "
                f"consent {self.with_consent}, phone hashes {self.with_phone}")


def _cell(v: Any) -> tuple[str, str | None]:
    """A cell as text, and a problem if it lost digits as a number."""
    if v is None:
        return "", None
    if isinstance(v, bool):
        return ("true" if v else "false"), None
    if isinstance(v, int):
        return str(v), None
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 2 ** 53:
            return str(int(v)), None
        if v.is_integer():
            return repr(v), "is stored as a number in the sheet and has lost digits (format the column as text)"
        return repr(v), None
    if isinstance(v, (datetime, date)):
        return v.strftime("%Y-%m-%d"), None
    return str(v).strip(), None


def read_table(path: str | Path) -> Iterator[tuple[int, list]]:
    """(row number, cells) of a .csv (UTF-8, with or without BOM) or .xlsx
    (the first sheet, read-only mode); row 1 is the header."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        wb = load_workbook(path, read_only=True, data_only=True)
        try:
            ws = wb.worksheets[0]
            for n, row in enumerate(ws.iter_rows(values_only=True), 1):
                yield n, list(row)
        finally:
            wb.close()
    elif suffix in (".csv", ".txt"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            for n, row in enumerate(csv.reader(f), 1):
                yield n, row
    else:
        raise MemberError(f"{path.name}: a .csv or .xlsx file")


def _int(text: str, lo: int, hi: int) -> int | None:
    if not re.fullmatch(r"[0-9]{1,13}", text):
        return None
    v = int(text)
    return v if lo <= v <= hi else None


def check_rows(table: Iterable[tuple[int, list]], *, rules: Mapping | None = None,
               max_problems: int = 200) -> tuple[list[tuple[int, dict]], list[ImportProblem]]:
    """Every row of a member file checked: the rows as members.jsonl records
    (with ``consent`` and ``phone`` kept aside in ``_consent``/``_phone``), and the problems."""
    problems: list[ImportProblem] = []
    out: list[tuple[int, dict]] = []
    tiers = _tiers(rules)
    card_types = set((rules or {}).get("card_types") or {})
    it = iter(table)
    first = next(it, None)
    if first is None:
        return [], [ImportProblem(1, None, "the file is empty (a header row with card_no, tier, ... is needed)")]
    hn, header = first
    names = [_cell(h)[0].strip().lower() for h in header]
    while names and names[-1] == "":
        names.pop()
    for i, nm in enumerate(names):
        col = nm or f"#{i + 1}"
        if nm not in COLUMNS:
            problems.append(ImportProblem(hn, col, f"unknown column (columns: {', '.join(COLUMNS)})"))
        elif names.index(nm) != i:
            problems.append(ImportProblem(hn, nm, "appears twice in the header"))
    for req in REQUIRED:
        if req not in names:
            problems.append(ImportProblem(hn, req, "required column is missing"))
    if problems:
        return [], problems
    seen_cards: dict[str, int] = {}
    seen_members: dict[str, int] = {}
    more = 0
    for n, cells in it:
        texts = {}
        bad = False
        for i, nm in enumerate(names):
            t, p = _cell(cells[i] if i < len(cells) else None)
            if p:
                problems.append(ImportProblem(n, nm, f"{t} {p}"))
                bad = True
            texts[nm] = t
        if not any(texts.values()) and not any(c not in (None, "") for c in cells[len(names):]):
            continue   # a blank line
        if any(c not in (None, "") for c in cells[len(names):]):
            problems.append(ImportProblem(n, f"#{len(names) + 1}", "a value beyond the header's columns"))
        row_problems: list[ImportProblem] = []

        def bad_(col: str, msg: str) -> None:
            row_problems.append(ImportProblem(n, col, msg))

        card_no = texts["card_no"]
        if not is_card_no(card_no):
            bad_("card_no", f"{card_no or '(empty)'} is not 6-19 digits")
        elif card_no in seen_cards:
            bad_("card_no", f"{card_no} is also in row {seen_cards[card_no]}")
        else:
            seen_cards[card_no] = n
        tier = texts["tier"]
        if not tier:
            bad_("tier", "(empty): a tier is required")
        elif tiers and tier not in tiers:
            bad_("tier", f"{tier} is not a tier of the rule set ({', '.join(sorted(tiers))})")
        rec: dict = {"card_no": card_no, "tier": tier}
        primary = texts.get("primary_card", "")
        member_id = texts.get("member_id") or (f"H{card_no}" if is_card_no(card_no) else "")
        if texts.get("member_id") and not _ID.match(member_id):
            bad_("member_id", f"{member_id[:70]!r} is not 1-64 printable characters")
        elif not primary and member_id:
            if member_id in seen_members:
                bad_("member_id", f"{member_id} is also in row {seen_members[member_id]}")
            else:
                seen_members[member_id] = n
        rec["member_id"] = member_id
        if primary:
            if not is_card_no(primary):
                bad_("primary_card", f"{primary} is not 6-19 digits")
            elif primary == card_no:
                bad_("primary_card", "names the row's own card")
            rec["primary_card"] = primary
            if texts.get("group_id"):
                rec["group_id"] = texts["group_id"][:64]
        if texts.get("name"):
            rec["name"] = mask_name(texts["name"])
        for col, hi in (("points", 10_000_000_000), ("balance_fen", 10_000_000_000)):
            t = texts.get(col, "")
            if t:
                v = _int(t, 0, hi)
                if v is None:
                    bad_(col, f"{t} is not a whole number from 0 to {hi}")
                elif v and primary:
                    bad_(col, f"{t}: a card with primary_card keeps no balance of its own")
                else:
                    rec[col] = v
        bd = texts.get("birthday", "")
        if bd:
            if not _MMDD.match(bd):
                m = re.fullmatch(r"\d{4}-(\d{2}-\d{2})", bd)   # a full date: only MM-DD is kept
                if m and _MMDD.match(m.group(1)):
                    bd = m.group(1)
                else:
                    bad_("birthday", f"{bd} is not MM-DD")
            rec["birthday"] = bd
        cal = texts.get("birthday_calendar", "")
        if cal:
            if cal not in ("solar", "lunar"):
                bad_("birthday_calendar", f"{cal} is not solar or lunar")
            rec["birthday_calendar"] = cal
        ct = texts.get("card_type", "")
        if ct:
            if card_types and ct not in card_types:
                bad_("card_type", f"{ct} is not a card type of the rule set")
            rec["card_type"] = ct
        ex = texts.get("expires", "")
        if ex:
            try:
                date.fromisoformat(ex) if _DATE.match(ex) else int("x")
                rec["expires"] = ex
            except ValueError:
                bad_("expires", f"{ex} is not a date YYYY-MM-DD")
        c = texts.get("consent", "").lower()
        if c in _YES:
            rec["_consent"] = True
        elif c not in _NO:
            bad_("consent", f"{c} is not yes/no (1/0, true/false, 是/否)")
        if texts.get("phone"):
            digits = re.sub(r"[\s+()-]", "", texts["phone"])
            if not re.fullmatch(r"[0-9]{5,15}", digits):
                bad_("phone", "is not a phone number (5-15 digits)")   # the number itself is not echoed
            rec["_phone"] = digits
        if row_problems or bad:
            problems += row_problems
            if len(problems) > max_problems:
                more += 1
            continue
        out.append((n, rec))
    if problems:
        return out, problems[:max_problems] + ([ImportProblem(0, None, f"{len(problems) - max_problems} more")]
                                               if len(problems) > max_problems else [])
    return out, []


def import_file(conn: Connection, path: str | Path, *, rules: Mapping | None = None, user: str = "admin",
                clock=time.time, dry_run: bool = False) -> MemberImport:
    """Import a member base from CSV/XLSX in the caller's transaction: every
    row checked first; any problem raises MemberImportError naming row and
    column and nothing is written. ``dry_run``: check only (HQ duplicates too)."""
    rows, problems = check_rows(read_table(path), rules=rules)
    if not problems:
        problems = _against_hq(conn, rows)
    if problems:
        raise MemberImportError(problems)
    out = MemberImport(rows=len(rows))
    key = phone_key() if any("_phone" in r for _n, r in rows) else None
    if any("_phone" in r for _n, r in rows) and not key:
        n = next(n for n, r in rows if "_phone" in r)
        raise MemberImportError([ImportProblem(n, "phone", "no STOREGATE_PHONE_KEY set: HQ keeps phones only as "
                                                            "a keyed hash; drop the column or set the key")])
    for _n, r in rows:
        out.tiers[r["tier"]] = out.tiers.get(r["tier"], 0) + 1
        out.points += r.get("points", 0)
        out.balance_fen += r.get("balance_fen", 0)
    if dry_run:
        return out
    plain = [{k: v for k, v in r.items() if not k.startswith("_")} for _n, r in rows]
    policy = policy_from_rules(rules)
    try:
        res = import_members(conn, plain, policy=policy, source=f"import:{Path(path).name}"[:80], clock=clock)
    except ImportError_ as exc:   # rows are numbered from the first data row there
        raise MemberImportError([ImportProblem(0, None, str(exc))]) from None
    out.members, out.accounts, out.cards, out.watermarks = res.members, res.accounts, res.cards, res.watermarks
    consenting = [r["member_id"] for _n, r in rows if r.get("_consent")]
    m = db.members
    for i in range(0, len(consenting), 5000):
        conn.execute(update(m).where(m.c.member_id.in_(consenting[i:i + 5000])).values(consent=True))
    out.with_consent = len(consenting)
    phones = [(r["member_id"], phone_hash(r["_phone"], key)) for _n, r in rows if r.get("_phone")]
    if phones:
        from sqlalchemy import bindparam
        conn.execute(update(m).where(m.c.member_id == bindparam("mid")).values(phone_hash=bindparam("ph")),
                     [{"mid": mid, "ph": ph} for mid, ph in phones])
    out.with_phone = len(phones)
    return out


def _against_hq(conn: Connection, rows: list[tuple[int, dict]]) -> list[ImportProblem]:
    problems = []
    for i in range(0, len(rows), 5000):
        chunk = rows[i:i + 5000]
        cards = set(conn.execute(select(db.cards.c.card_no).where(
            db.in_(conn, db.cards.c.card_no, [r["card_no"] for _n, r in chunk]))).scalars())
        mids = set(conn.execute(select(db.members.c.member_id).where(
            db.in_(conn, db.members.c.member_id, [r["member_id"] for _n, r in chunk if not r.get("primary_card")]))
        ).scalars())
        for n, r in chunk:
            if r["card_no"] in cards:
                problems.append(ImportProblem(n, "card_no", f"{r['card_no']} is at HQ already"))
            if not r.get("primary_card") and r["member_id"] in mids:
                problems.append(ImportProblem(n, "member_id", f"{r['member_id']} is at HQ already"))
    in_file = {r["card_no"] for _n, r in rows if not r.get("primary_card")}
    subs = [(n, r) for n, r in rows if r.get("primary_card") and r["primary_card"] not in in_file]
    if subs:
        have = set(conn.execute(select(db.cards.c.card_no).where(
            db.in_(conn, db.cards.c.card_no, [r["primary_card"] for _n, r in subs]))).scalars())
        for n, r in subs:
            if r["primary_card"] not in have:
                problems.append(ImportProblem(n, "primary_card", f"{r['primary_card']} is neither at HQ nor a "
                                                                 "primary card in this file"))
    return problems


# ================================================================ show

def _effective_status(card_status: str, account_status: str) -> str:
    """What a store is told of a card: its own status, or an active card's
    account's (``blocked`` / ``limited``: reconciliation's block or limit of
    an overdrawn account)."""
    if card_status != "active":
        return card_status
    return account_status


def _restriction(conn: Connection, account_id: str) -> str | None:
    """``blocked`` / ``limited`` while reconciliation holds the account (hq_bridge/reconcile.py), else None
    (also for a frozen, cancelled or expired account: the stores are told that, as its snapshot rows say)."""
    from hq_bridge.reconcile import restrictions
    status = conn.execute(select(db.accounts.c.status).where(db.accounts.c.account_id == account_id)).scalar()
    return restrictions(conn, [account_id]).get(account_id) if status in ("active", "blocked") else None


def _blocked(conn: Connection, account_id: str) -> bool:
    return conn.execute(select(db.accounts.c.status).where(db.accounts.c.account_id == account_id)).scalar() \
        == "blocked"


def _refuse_lifting_a_block(card_no: str, op: str) -> None:
    raise MemberError(f"{op}: card {card_no} is active; its account is blocked for an overdraft "
                      "(reconciliation.overdraft_policy = \"block\"), which only settling lifts: a top-up or "
                      "return at any store, or storegate-hq reconcile --settle ACCOUNT --kind KIND")


def account_view(conn: Connection, card_no: str, *, history: int = 20) -> dict:
    """The account a card is on: balances (paid and bonus parts, points by
    lot), tier, status, cards, packages, coupons, open overdrafts and the
    latest ``history`` entries (newest first)."""
    card = conn.execute(select(db.cards).where(db.cards.c.card_no == card_no)).mappings().first()
    if card is None:
        raise MemberError(f"card {card_no}: not known at HQ")
    store = AccountStore()
    aid = card["account_id"]
    acct = store.load_accounts(conn, [aid])[aid]
    member = conn.execute(select(db.members).where(db.members.c.member_id == card["member_id"])).mappings().first()
    cards = conn.execute(select(db.cards).where(db.cards.c.account_id == aid).order_by(db.cards.c.issued_at,
                                                                                        db.cards.c.card_no)).mappings()
    o = overdrafts
    open_ods = conn.execute(select(o.c.kind, o.c.ref, o.c.amount, o.c.action, o.c.detected_at)
                            .where(o.c.account_id == aid, o.c.state == "open")).mappings()
    hist = store.history(conn, aid, limit=history)
    return {
        "card_no": card_no,
        "account_id": aid,
        "member_id": card["member_id"],
        "name": member["name_masked"] if member else None,
        "consent": bool(member["consent"]) if member else False,
        "birthday": member["birthday"] if member else None,
        "tier": acct.tier,
        "status": _effective_status(card["status"], _restriction(conn, aid) or acct.status),
        "card_status": card["status"],
        "account_status": acct.status,
        "points": acct.points,
        "points_owed": acct.points_owed,
        "stored_value_fen": acct.stored_value_fen,
        "paid_fen": acct.paid_fen,
        "bonus_fen": acct.bonus_fen,
        "lots": [{"expires": l.expires, "points": l.points, "remaining": l.remaining} for l in acct.lots
                 if l.remaining],
        "packages": dict(acct.packages),
        "coupons": [{"code": c, "state": s} for c, s in sorted(acct.coupons.items())],
        "day": acct.day,
        "day_stored_value_paid_fen": acct.day_stored_value_paid_fen,
        "day_points_redeemed": acct.day_points_redeemed,
        "cards": [{"card_no": c["card_no"], "role": c["role"], "status": c["status"], "member_id": c["member_id"],
                   "replaced_by": c["replaced_by"], "expires": c["expires"], "card_type": c["card_type"]}
                  for c in cards],
        "overdrafts": [{str(k): v for k, v in r.items()} for r in open_ods],   # plain str keys for JSON
        "history": [{"kind": h.kind, "d_paid_fen": h.d_paid_fen, "d_bonus_fen": h.d_bonus_fen,
                     "d_points": h.d_points, "package_id": h.package_id, "d_uses": h.d_uses, "card_no": h.card_no,
                     "store": h.store, "seq": h.seq, "tx_id": h.tx_id, "ref_tx_id": h.ref_tx_id,
                     "terminal": h.terminal, "operator": h.operator, "at": h.at, "detail": h.detail}
                    for h in hist],
    }


def render_view(v: dict) -> str:
    lines = [f"card {v['card_no']}  account {v['account_id']}  member {v['member_id']}  {v['name'] or ''}",
             f"tier {v['tier']}  status {v['status']} (card {v['card_status']}, account {v['account_status']})"
             f"  consent {'yes' if v['consent'] else 'no'}",
             f"stored value {v['stored_value_fen'] / 100:.2f} (paid {v['paid_fen'] / 100:.2f}, "
             f"bonus {v['bonus_fen'] / 100:.2f})   points {v['points']}"
             + (f" (owed {v['points_owed']})" if v["points_owed"] else "")]
    if v["lots"]:
        lines.append("points lots: " + ", ".join(f"{l['remaining']} until {l['expires']}" for l in v["lots"]))
    if v["packages"]:
        lines.append("packages: " + ", ".join(f"{p} {n}" for p, n in sorted(v["packages"].items())))
    if v["coupons"]:
        lines.append("coupons: " + ", ".join(f"{c['code']} {c['state']}" for c in v["coupons"]))
    lines.append("cards: " + ", ".join(f"{c['card_no']} {c['role']} {c['status']}"
                                       + (f" -> {c['replaced_by']}" if c["replaced_by"] else "") for c in v["cards"]))
    for o in v["overdrafts"]:
        lines.append(f"OVERDRAFT {o['kind']} {o['ref'] or ''} {o['amount']} ({o['action']})")
    if v["history"]:
        lines.append("history (newest first):")
        for h in v["history"]:
            src = f"{h['store']}/{h['seq']}" if h["store"] else (h["operator"] or "")
            moves = " ".join(f"{k[2:]} {h[k]:+d}" for k in ("d_paid_fen", "d_bonus_fen", "d_points", "d_uses")
                             if h[k])
            what = (h["detail"] or {}).get("op", "")
            lines.append(f"  {h['at'] or '':<25} {h['kind']:<12} {what:<12} {moves:<36} {src}")
    return "\n".join(lines)


# ================================================================ card services at HQ

@dataclass
class CardResult:
    account_id: str
    cards_changed: list = field(default_factory=list)   # (card_no, before, after, replaced_by)
    entries: list = field(default_factory=list)
    detail: dict = field(default_factory=dict)


CARD_OPS = ("report_lost", "cancel_lost", "freeze", "unfreeze", "replace", "cancel", "extend", "annual_fee",
            "issue_subsidiary", "withdraw")


def _card(conn: Connection, card_no: str) -> dict:
    q = select(db.cards).where(db.cards.c.card_no == card_no)
    if db.is_postgres(conn):
        q = q.with_for_update()
    row = conn.execute(q).mappings().first()
    if row is None:
        raise MemberError(f"card {card_no}: not known at HQ")
    return dict(row)


def card_op(conn: Connection, op: str, card_no: str, *, user: str = "admin", new_card_no: str | None = None,
            fee_fen: int | None = None, months: int | None = None, amount_fen: int | None = None,
            member_id: str | None = None, reason: str | None = None, rules: Mapping | None = None,
            clock=time.time) -> CardResult:
    """One card service at HQ, recorded in the account's history with operator
    ``hq:<user>``. Returns the cards whose status changed, for deny deltas."""
    if op not in CARD_OPS:
        raise MemberError(f"op: one of {', '.join(CARD_OPS)}")
    if op == "withdraw":
        from hq_bridge.policy import withdraw
        return withdraw(conn, card_no, amount_fen, user=user, rules=rules, clock=clock)
    policy = policy_from_rules(rules)
    acc_rules = dict((rules or {}).get("accounts") or {})
    fees = dict((rules or {}).get("fees") or {})
    now_ms, at = _now(clock)
    today = datetime.fromtimestamp(clock(), timezone.utc).date()
    card = _card(conn, card_no)
    before = card["status"]
    detail: dict = {"op": op, **({"reason": reason} if reason else {})}
    res = CardResult(card["account_id"])
    new_values: dict = {}
    if op == "report_lost":
        if before not in ("active", "frozen"):
            raise MemberError(f"report_lost: card {card_no} is {before}")
        after = "lost"
    elif op == "cancel_lost":
        if before != "lost":
            raise MemberError(f"cancel_lost: card {card_no} is {before}, not lost")
        after = "active"
    elif op == "freeze":
        if before not in ("active", "lost"):
            raise MemberError(f"freeze: card {card_no} is {before}")
        after = "frozen"
    elif op == "unfreeze":
        if before == "active" and _blocked(conn, card["account_id"]):
            _refuse_lifting_a_block(card_no, op)
        if before not in ("frozen", "lost"):
            raise MemberError(f"unfreeze: card {card_no} is {before}, not frozen or lost")
        after = "active"
    elif op == "cancel":
        if before in ("replaced", "cancelled"):
            raise MemberError(f"cancel: card {card_no} is {before}")
        after = "cancelled"
    elif op in ("extend", "annual_fee"):
        n = months if op == "extend" else policy.annual_fee_months
        if not n or n < 1:
            raise MemberError(f"{op}: --months, 1 or more")
        if before in ("replaced", "cancelled"):
            raise MemberError(f"{op}: card {card_no} is {before}")
        start = max(today.isoformat(), card["expires"] or "")
        new_values["expires"] = add_months(date.fromisoformat(start), n).isoformat()
        after = "active" if before == "expired" else before
        detail.update(expires=new_values["expires"], months=n)
        if op == "annual_fee":
            detail["fee_fen"] = fees.get("annual_fen", 0) if fee_fen is None else fee_fen
    elif op == "replace":
        if not new_card_no or not is_card_no(new_card_no) or new_card_no == card_no:
            raise MemberError("replace: --new-card, another card number of 6-19 digits")
        if conn.execute(select(db.cards.c.card_no).where(db.cards.c.card_no == new_card_no)).first():
            raise MemberError(f"replace: card {new_card_no} is at HQ already")
        if before in ("replaced", "cancelled"):
            raise MemberError(f"replace: card {card_no} is {before}")
        after = "replaced"
        new_values["replaced_by"] = new_card_no
        conn.execute(db.cards.insert().values(
            {**card, "card_no": new_card_no, "status": "active", "replaced_by": None, "nfc_uid": None,
             "issued_at": now_ms, "updated_at": now_ms}))
        res.cards_changed.append((new_card_no, None, "active", None))
        detail.update(new_card_no=new_card_no, fee_fen=fees.get("replace_fen", 0) if fee_fen is None else fee_fen)
    else:  # issue_subsidiary
        if not new_card_no or not is_card_no(new_card_no):
            raise MemberError("issue_subsidiary: --new-card, a card number of 6-19 digits")
        if conn.execute(select(db.cards.c.card_no).where(db.cards.c.card_no == new_card_no)).first():
            raise MemberError(f"issue_subsidiary: card {new_card_no} is at HQ already")
        if before != "active":
            raise MemberError(f"issue_subsidiary: card {card_no} is {before}")
        holder = member_id or card["member_id"]
        if member_id and not conn.execute(select(db.members.c.member_id)
                                          .where(db.members.c.member_id == member_id)).first():
            conn.execute(db.members.insert().values(member_id=member_id, name_masked=None, phone_hash=None,
                                                    consent=False, birthday=None, birthday_calendar="solar",
                                                    source=f"hq:{user}"[:80], created_at=now_ms,
                                                    updated_at=now_ms))
        conn.execute(db.cards.insert().values(
            card_no=new_card_no, account_id=card["account_id"], member_id=holder, role="subsidiary", status="active",
            replaced_by=None, card_type=card["card_type"], nfc_uid=None, issued_at=now_ms, expires=card["expires"],
            updated_at=now_ms))
        res.cards_changed.append((new_card_no, None, "active", None))
        after = before
        detail.update(new_card_no=new_card_no, holder=holder,
                      fee_fen=acc_rules.get("subsidiary_fee_fen", 0) if fee_fen is None else fee_fen)
    if after != before or new_values:
        conn.execute(update(db.cards).where(db.cards.c.card_no == card_no)
                     .values(status=after, updated_at=now_ms, **new_values))
    if after != before:
        res.cards_changed.insert(0, (card_no, before, after, new_values.get("replaced_by")))
    held = _restriction(conn, card["account_id"]) if res.cards_changed else None
    if held:
        # The account is blocked or limited (reconciliation): an active card on it is "blocked" / "limited" at
        # the stores, never lifted by a card service (an unfreeze, a cancelled loss report, a new or
        # replacement card, a 附属卡): it goes out with the account's restriction, lifted with the account.
        res.cards_changed = [(no, _effective_status(b, held) if b else b, _effective_status(a, held), r)
                             for no, b, a, r in res.cards_changed]
    e = _hq_entry(card["account_id"], "card_op", user, at, card_no=card_no,
                  detail={**detail, "status": [before, after]})
    conn.execute(db.account_history.insert().values(_entry_row(e, now_ms)))
    res.entries.append(e)
    res.detail = detail
    return res


# ``storegate-hq card ACTION`` (the deny list's own command) on a card HQ holds
# is the card service it means, so both commands move HQ's card of record alike.
DENY_LIST_OPS = {("deny", "lost"): "report_lost", ("deny", "frozen"): "freeze", ("deny", "cancelled"): "cancel",
                 ("freeze", None): "freeze", ("unfreeze", None): "unfreeze", ("replace", None): "replace"}


def deny_list_action(conn: Connection, action: str, card_no: str, *, status: str | None = None,
                     new_card_no: str | None = None, reason: str | None = None, user: str = "admin",
                     rules: Mapping | None = None, clock=time.time) -> CardResult | None:
    """The card service a deny-list action means on HQ's card of record
    (``deny --status lost`` is report_lost, ...), in the caller's
    transaction; None when HQ does not hold the card (the deny list alone
    speaks for it), or when the card already has the status asked for."""
    if conn.execute(select(db.cards.c.status).where(db.cards.c.card_no == card_no)).scalar() is None:
        return None
    key = (action, (status or "lost") if action == "deny" else None)
    op = DENY_LIST_OPS.get(key)
    if op is None:
        raise MemberError(f"card {card_no} is held at HQ: {action} --status {status} is not a card service; "
                          "use storegate-hq members card")
    held = _card(conn, card_no)
    current = held["status"]
    if op == "unfreeze" and current == "active" and _blocked(conn, held["account_id"]):
        _refuse_lifting_a_block(card_no, "card unfreeze")   # the deny list's "active" would lift the block
    if (op, current) in (("report_lost", "lost"), ("freeze", "frozen"), ("cancel", "cancelled"),
                         ("unfreeze", "active")):
        return None
    return card_op(conn, op, card_no, user=user, new_card_no=new_card_no, reason=reason, rules=rules, clock=clock)


# ================================================================ CLI

def register(subparsers) -> None:
    """``members`` and its subcommands on storegate-hq's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True)
    common.add_argument("--user", default=os.environ.get("USER", "admin"), help="the operator (history: hq:<user>)")
    p = subparsers.add_parser("members", help="members at HQ: add, import, show, card services")
    sub = p.add_subparsers(dest="members_command", required=True)
    add = sub.add_parser("add", parents=[common], help="register a member with a new card")
    add.add_argument("--card", required=True)
    add.add_argument("--tier")
    add.add_argument("--member-id")
    add.add_argument("--name", help="stored masked (张*)")
    add.add_argument("--consent", action="store_true", help="the member agreed to the programme's terms")
    add.add_argument("--birthday", help="MM-DD")
    add.add_argument("--lunar", action="store_true", help="the birthday is a lunar date")
    add.add_argument("--phone", help="kept only as HMAC-SHA256 with STOREGATE_PHONE_KEY")
    add.add_argument("--card-type")
    add.add_argument("--json", action="store_true")
    imp = sub.add_parser("import", parents=[common], help="import a member base from .csv or .xlsx (all or nothing)")
    imp.add_argument("file")
    imp.add_argument("--dry-run", action="store_true", help="check every row, import nothing")
    show = sub.add_parser("show", parents=[common], help="a card's account: balances, tier, cards, recent history")
    show.add_argument("card")
    show.add_argument("--json", action="store_true")
    show.add_argument("--history", type=int, default=20)
    card = sub.add_parser("card", parents=[common], help="card services at HQ (deny deltas go to every store)")
    card.add_argument("op", choices=CARD_OPS)
    card.add_argument("card")
    card.add_argument("--new-card", help="replace, issue_subsidiary")
    card.add_argument("--member-id", help="issue_subsidiary: the holder (default: the card's)")
    card.add_argument("--fee-fen", type=int)
    card.add_argument("--months", type=int, help="extend")
    card.add_argument("--amount-fen", type=int, help="withdraw (default: all of the paid part)")
    card.add_argument("--reason")
    card.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, engine: Engine, *, out=None, publish=None) -> int:
    """Run a ``members`` subcommand. ``publish(entries)``: the caller's deny
    delta publisher for card services (none: the entries are printed)."""
    from hq_bridge.policy import chain_rules

    out = out or sys.stdout
    cmd = args.members_command
    try:
        if cmd == "show":
            with engine.begin() as conn:
                v = account_view(conn, args.card, history=args.history)
            out.write((orjson.dumps(v, option=orjson.OPT_INDENT_2).decode() if args.json else render_view(v)) + "\n")
            return 0
        if cmd == "add":
            with engine.begin() as conn:
                rules = chain_rules(conn)
                v = add_member(conn, card_no=args.card, tier=args.tier, member_id=args.member_id, name=args.name,
                               consent=args.consent, birthday=args.birthday,
                               birthday_calendar="lunar" if args.lunar else "solar", phone=args.phone,
                               card_type=args.card_type, user=args.user, rules=rules)
            out.write((orjson.dumps(v, option=orjson.OPT_INDENT_2).decode() if args.json else render_view(v)) + "\n")
            return 0
        if cmd == "import":
            with engine.begin() as conn:
                rules = chain_rules(conn)
                res = import_file(conn, args.file, rules=rules, user=args.user, dry_run=args.dry_run)
            out.write(("checked, nothing imported (dry run): " if args.dry_run else "") + res.summary() + "\n")
            return 0
        if cmd == "card":
            with engine.begin() as conn:
                rules = chain_rules(conn)
                res = card_op(conn, args.op, args.card, user=args.user, new_card_no=args.new_card,
                              fee_fen=args.fee_fen, months=args.months, amount_fen=args.amount_fen,
                              member_id=args.member_id, reason=args.reason, rules=rules)
            entries = deny_entries(res.cards_changed)
            if entries and publish is not None:
                publish(entries, f"hq:{args.user} {args.op}")
            if args.json:
                out.write(orjson.dumps({"account_id": res.account_id, "cards_changed": res.cards_changed,
                                        "deny": entries, "detail": res.detail},
                                       option=orjson.OPT_INDENT_2).decode() + "\n")
            else:
                out.write(f"{args.op} {args.card}: account {res.account_id} {res.detail}\n")
                for e in entries:
                    out.write(f"  deny delta: {e}\n")
            return 0
    except (MemberError, MemberImportError) as exc:
        sys.stderr.write(f"storegate-hq members {cmd}: {exc}\n")
        if isinstance(exc, MemberImportError):
            for p in exc.problems[:200]:
                sys.stderr.write(f"  {p}\n")
        return 2
    return 2
