"""The counter's lifecycle records applied at HQ: 延期, 附属卡 and 取款
change the account of record exactly as the store said (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timezone

from hq_bridge.accounts import (Account, AccountPolicy, Book, Card, StoreRecord, apply_record,
                                withdrawal_forfeit)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
AT = "2026-12-05T20:00:00+08:00"
BASE = {"v": 1, "at": AT, "idempotency_key": "desk/k-00000001", "day": "2026-12-05", "terminal": "desk",
        "operator": "c01", "account_id": None}


def book() -> Book:
    acct = Account("M1", "M1", "gold", paid_fen=30000, bonus_fen=3000)
    return Book({"M1": acct}, {"880000000013": Card("880000000013", "M1", "M1", expires="2026-12-31")}, {},
                {"S001": 0}, {})


def record(seq: int, type_: str, **body) -> StoreRecord:
    return StoreRecord("S001", seq, f"tx{seq:030d}", type_, {"type": type_, **BASE, **body})


def card_op(seq: int, op: str, **kw) -> StoreRecord:
    return record(seq, "card_op", op=op, card_no=kw.pop("card_no", "880000000013"), member_id="M1",
                  fee_fen=kw.pop("fee_fen", 0), status_after=kw.pop("status_after", "active"),
                  reason=None, new_card_no=kw.pop("new_card_no", None), deltas={}, **kw)


def test_extend_moves_the_expiry_the_store_worked_out():
    state, entries, problems = apply_record(book(), card_op(1, "extend", months=12, expires="2027-12-31"),
                                            AccountPolicy(), NOW)
    assert not problems, problems
    assert state.cards["880000000013"].expires == "2027-12-31"
    assert entries[0].detail["months"] == 12


def test_a_subsidiary_card_pays_from_its_primarys_account():
    rec = card_op(1, "issue_subsidiary", card_no="880000000099", primary_card_no="880000000013", fee_fen=1000)
    state, entries, problems = apply_record(book(), rec, AccountPolicy(), NOW)
    assert not problems, problems
    sub = state.cards["880000000099"]
    assert (sub.account_id, sub.role, sub.status) == ("M1", "subsidiary", "active")
    again, _, problems = apply_record(state, card_op(2, "issue_subsidiary", card_no="880000000099",
                                                     primary_card_no="880000000013"), AccountPolicy(), NOW)
    assert problems[0].code == "card_exists" and problems[0].set_aside


def test_a_withdrawal_pays_out_the_paid_part_and_forfeits_the_bonus_share():
    rec = record(1, "withdrawal", member_id="M1", card_no="880000000013", amount_fen=10000, paid_fen=10000,
                 paid_known_fen=30000, balance_before_fen=33000, balance_after_fen=23000,
                 deltas={"stored_value_fen": -10000}, payout={"method": "cash"}, reason=None)
    state, entries, problems = apply_record(book(), rec, AccountPolicy(), NOW)
    assert not problems, problems
    acct = state.accounts["M1"]
    assert (acct.paid_fen, acct.bonus_fen) == (20000, 2000)       # a third of the paid part: a third of the bonus
    assert (entries[0].d_paid_fen, entries[0].d_bonus_fen) == (-10000, -1000)
    assert withdrawal_forfeit(3000, 10000, 30000, "forfeit_all") == 3000
    assert withdrawal_forfeit(3000, 10000, 30000, "keep") == 0


def test_an_unknown_card_operation_is_set_aside_not_taken_for_a_replace():
    rec = card_op(1, "extend", months=12, expires="2027-12-31")
    rec = rec._replace(body={**rec.body, "op": "melt"})
    state, entries, problems = apply_record(book(), rec, AccountPolicy(), NOW)
    assert problems and problems[0].set_aside and not entries
    assert state.cards["880000000013"].replaced_by is None
