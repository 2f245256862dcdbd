"""The member lifecycle at the counter (the store's side of issue 12): lifts of
a lost card, registration while offline, 补办 carrying the account, 延期,
附属卡, 取款, and the operator on every record.

Each test first does what failed before this work (a card reported lost here
could never be lifted here; a card registered or replaced here was a
stranger with no account), through the POS API of an in-process gateway on
the demo's layered rules, offline, at a fixed clock (tests/test_counter.py).
"""

from __future__ import annotations

import pytest

from gateway.core import validate as engine
from gateway.shell.service import Gateway
from tests.support import api_client
from tests.support import test_hq_key as hq_key
from tests.test_counter import CASH, DIAMOND, GOLD, T0, basket, config, install, journal_depth, tap
from wire.messages import DenyDelta
from wire.records import validate_body
from wire.signing import sign

EXPIRED = "880000000039"   # M1003, expired 2026-01-31


def luhn(prefix: str, length: int = 12) -> str:
    """A valid card number of ``length`` digits starting with ``prefix``."""
    body = prefix.ljust(length - 1, "0")
    for d in "0123456789":
        if engine.luhn_ok(body + d):
            return body + d
    raise AssertionError("no check digit")


NEW_CARD = luhn("88000009991")        # the member programme (8800), never issued
NEW_CARD_2 = luhn("88000009992")
FAMILY_CARD = luhn("88020009993")     # the family 附属卡 programme (8802)


@pytest.fixture
async def gw(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)
        yield gw


def as_role(client, role: str) -> dict:
    return {"Authorization": f"Bearer {client.tokens[role]}"}


def deny_delta(gw: Gateway, entries: list[dict], issued_at: float) -> bytes:
    doc = {"version": gw.rules.deny_version + 1, "issued_at": int(issued_at), "entries": entries}
    return DenyDelta(sign(doc, hq_key())).encode()


async def records(gw: Gateway, type_: str) -> list[dict]:
    return [r.body for r in await gw.journal.pending(0, 1000) if r.type == type_]


# ---------------------------------------------------------------- lifts

async def test_a_card_reported_lost_here_is_accepted_again_when_hq_lifts_it(gw):
    client = api_client(gw)
    res = await client.post("/cards/services", body={"idempotency_key": "lost-0001", "kind": "report_lost",
                                                     "card_no": GOLD, "operator": "c042"})
    assert res.status_code == 201, res.json
    assert (await tap(gw, GOLD)).reason == "lost"
    # HQ lifts it chain-wide (取消挂失 at HQ): a deny delta saying "active".
    assert gw.rules.apply_deny(deny_delta(gw, [{"card_no": GOLD, "status": "active"}], T0 + 60))
    verdict = await tap(gw, GOLD)
    assert verdict.accepted, verdict.reason   # before: refused here for good


async def test_a_report_made_here_after_hqs_lift_was_issued_stands(gw):
    await gw.counter.card_service({"idempotency_key": "lost-0002", "kind": "report_lost", "card_no": GOLD})
    # A lift HQ issued before this store's report (the delta was on its way): the report wins here.
    assert gw.rules.apply_deny(deny_delta(gw, [{"card_no": GOLD, "status": "active"}], T0 - 3600))
    assert (await tap(gw, GOLD)).reason == "lost"


async def test_the_service_desk_lifts_a_loss_report_made_here_and_it_is_recorded(gw):
    client = api_client(gw)
    await client.post("/cards/services", headers=as_role(client, "service_desk"),
                      body={"idempotency_key": "lost-0003", "kind": "report_lost", "card_no": GOLD})
    assert (await tap(gw, GOLD)).reason == "lost"
    depth = await journal_depth(gw)
    pos = await client.post("/cards/services", headers=as_role(client, "pos"),
                            body={"idempotency_key": "lift-0001", "kind": "unfreeze", "card_no": GOLD})
    assert pos.status_code == 403 and await journal_depth(gw) == depth   # a lane cannot lift a loss
    res = await client.post("/cards/services", headers=as_role(client, "service_desk"),
                            body={"idempotency_key": "lift-0002", "kind": "unfreeze", "card_no": GOLD,
                                  "reason": "found in the car", "operator": "desk-7"})
    assert res.status_code == 201, res.json
    assert res.json["status_before"] == "lost" and res.json["hq_decides"] is False
    assert (await tap(gw, GOLD)).accepted      # before: only a freeze was lifted here
    lift = (await records(gw, "card_op"))[-1]
    assert lift["op"] == "unfreeze" and lift["status_before"] == "lost" and lift["operator"] == "desk-7"
    assert lift["terminal"] == "test-service-desk"


async def test_a_card_hq_denies_stays_refused_after_a_lift_here(gw):
    assert gw.rules.apply_deny(deny_delta(gw, [{"card_no": GOLD, "status": "lost"}], T0 - 60))
    done = await gw.counter.card_service({"idempotency_key": "lift-0003", "kind": "unfreeze", "card_no": GOLD})
    assert done.response["status_before"] == "lost" and done.response["hq_decides"] is True
    assert (await tap(gw, GOLD)).reason == "lost"   # HQ decides chain-wide


# ---------------------------------------------------------------- registration

async def test_a_member_registered_offline_at_a_lane_is_usable_at_once(gw):
    client = api_client(gw)
    before = await tap(gw, NEW_CARD)
    assert before.reason == "member_not_in_snapshot" and before.member["account_id"] is None
    body = {"idempotency_key": "reg-00001", "card_no": NEW_CARD, "name": "张三丰", "birthday": "03-08",
            "birthday_calendar": "lunar", "consent": True, "lane": "1", "operator": "c042"}
    res = await client.post("/members", headers=as_role(client, "pos"), body=body)
    assert res.status_code == 201, res.json
    assert res.json["card"] == engine.mask_card(NEW_CARD) and res.json["fee_fen"] == 1000
    member_id = res.json["member_id"]
    assert member_id == f"S001-{NEW_CARD}"
    again = await client.post("/members", headers=as_role(client, "pos"), body=body)
    assert again.status_code == 200 and again.json["seq"] == res.json["seq"]

    verdict = await tap(gw, NEW_CARD)
    assert verdict.verdict == "accept", verdict.reason
    assert verdict.member["account_id"] == member_id and verdict.member["tier"]["code"] == res.json["tier"]
    assert verdict.member["name"] == "张**" and verdict.member["points"] == 0
    sale = await gw.counter.sale("1", {"idempotency_key": "reg-sale-1", "lines": basket(10000)})
    earned = sale.response["points_earned"]
    assert earned > 0 and (await tap(gw, NEW_CARD)).member["points"] == earned

    (rec,) = await records(gw, "registration")
    assert validate_body("registration", rec) == rec
    assert rec["name"] == "张**" and rec["consent"] is True and rec["account_id"] == member_id
    assert rec["operator"] == "c042" and rec["terminal"] == "test-pos" and rec["lane"] == "1"
    assert "phone" not in rec and "张三丰" not in str(rec)


async def test_registration_refusals_write_nothing(gw):
    client = api_client(gw)
    pos = as_role(client, "pos")
    depth = await journal_depth(gw)
    cases = [
        ({"card_no": GOLD, "consent": True}, 409, "card_exists"),
        ({"card_no": "880000000054", "consent": True}, 409, "card_denied"),          # on HQ's deny list
        ({"card_no": "880000000010", "consent": True}, 422, "card_not_valid"),        # bad check digit
        ({"card_no": NEW_CARD, "consent": False}, 422, "consent_required"),
        ({"card_no": NEW_CARD, "consent": True, "phone": "13800000000"}, 400, "bad_request"),
        ({"card_no": NEW_CARD, "consent": True, "operator": "收银员1"}, 400, "bad_request"),
        ({"card_no": NEW_CARD}, 400, "bad_request"),
    ]
    for i, (body, status, code) in enumerate(cases):
        res = await client.post("/members", headers=pos, body={"idempotency_key": f"reg-bad-{i:03d}", **body})
        assert (res.status_code, res.json["error"]["code"]) == (status, code), (body, res.json)
        assert res.json["error"]["text"]["zh-CN"] and res.json["error"]["text"]["en"]
    bad_operator = await client.post("/members", headers=pos, body={
        "idempotency_key": "reg-bad-op", "card_no": NEW_CARD, "consent": True, "operator": "x" * 33})
    assert bad_operator.json["error"]["field"] == "operator"
    assert await journal_depth(gw) == depth
    assert (await client.post("/members", headers=as_role(client, "manager"), body={
        "idempotency_key": "reg-mgr-01", "card_no": NEW_CARD, "consent": True})).status_code == 403


async def test_a_card_registered_with_its_chip_is_tapped_at_once(gw):
    await gw.counter.register({"idempotency_key": "reg-nfc-01", "card_no": NEW_CARD, "consent": True,
                               "nfc_uid": "04aabbccddee01"})
    # Counter.validate is the whole decision (the lead wires it into Gateway.handle_read).
    verdict = gw.counter.validate("nfc", "04AABBCCDDEE01")
    assert verdict.verdict == "accept" and verdict.card_no == NEW_CARD
    assert gw.counter.local_member(NEW_CARD)["member_id"] == f"S001-{NEW_CARD}"
    assert gw.counter.local_member(GOLD) is None   # in HQ's snapshot: not a local member


# ---------------------------------------------------------------- 补办, 延期, 附属卡

async def test_a_replacement_card_carries_the_account_here_at_once(gw):
    gold = await tap(gw, GOLD)
    assert (await tap(gw, NEW_CARD)).member["account_id"] is None   # before: a stranger, no balance
    client = api_client(gw)
    res = await client.post("/cards/services", body={"idempotency_key": "repl-0002", "kind": "replace",
                                                     "card_no": GOLD, "new_card_no": NEW_CARD})
    assert res.status_code == 201 and res.json["new_card"].endswith(NEW_CARD[-4:])
    assert (await tap(gw, GOLD)).reason == "replaced"
    new = await tap(gw, NEW_CARD)
    assert new.verdict == "accept", new.reason
    assert new.member["account_id"] == "M1001"
    assert (new.member["points"], new.member["balance_fen"]) == (gold.member["points"], gold.member["balance_fen"])
    taken = await client.post("/cards/services", body={"idempotency_key": "repl-0003", "kind": "replace",
                                                       "card_no": DIAMOND, "new_card_no": NEW_CARD})
    assert taken.status_code == 409 and taken.json["error"]["code"] == "card_exists"


async def test_an_expired_card_extended_here_is_accepted_at_once(gw):
    assert (await tap(gw, EXPIRED)).reason == "expired"
    done = await gw.counter.card_service({"idempotency_key": "ext-00001", "kind": "extend", "card_no": EXPIRED,
                                          "months": 12, "operator": "desk-1"})
    assert done.response["expires"] == "2027-11-25"       # 12 months from today: it had expired
    assert (await tap(gw, EXPIRED)).accepted
    rec = (await records(gw, "card_op"))[-1]
    assert (rec["op"], rec["months"], rec["expires"], rec["operator"]) == ("extend", 12, "2027-11-25", "desk-1")
    later = await gw.counter.card_service({"idempotency_key": "ext-00002", "kind": "extend", "card_no": GOLD})
    assert later.response["expires"] == "2028-12-31"      # from the card's own expiry


async def test_a_subsidiary_card_pays_from_the_primary_account_at_once(gw):
    gw.rules.current.data["accounts"]["subsidiary_fee_fen"] = 800   # HQ's fee for a 附属卡
    diamond = await tap(gw, DIAMOND)
    client = api_client(gw)
    res = await client.post("/cards/services", body={"idempotency_key": "sub-00001", "kind": "issue_subsidiary",
                                                     "card_no": DIAMOND, "new_card_no": FAMILY_CARD,
                                                     "operator": "desk-2"})
    assert res.status_code == 201, res.json
    assert res.json["fee_fen"] == 800
    sub = await tap(gw, FAMILY_CARD)
    assert sub.verdict == "accept", sub.reason
    assert sub.member["account_id"] == diamond.member["account_id"] == "M1005"
    assert sub.member["balance_fen"] == diamond.member["balance_fen"]
    rec = (await records(gw, "card_op"))[-1]
    assert (rec["op"], rec["card_no"], rec["primary_card_no"], rec["account_id"], rec["member_id"]) == \
        ("issue_subsidiary", FAMILY_CARD, DIAMOND, "M1005", "M1005")
    on_sub = await client.post("/cards/services", body={"idempotency_key": "sub-00002",
                                                        "kind": "issue_subsidiary", "card_no": FAMILY_CARD,
                                                        "new_card_no": NEW_CARD})
    assert on_sub.status_code == 422 and on_sub.json["error"]["code"] == "not_a_primary_card"


# ---------------------------------------------------------------- 取款

async def test_withdrawal_pays_out_only_the_paid_part_the_store_can_vouch_for(gw):
    client = api_client(gw)
    desk = as_role(client, "service_desk")
    body = {"card_no": GOLD, "amount_fen": 5000, "payout": {"method": "cash"}, "operator": "desk-3"}
    res = await client.post("/withdrawals", headers=desk, body={"idempotency_key": "wd-000001", **body})
    assert res.status_code == 422 and res.json["error"]["code"] == "withdrawal_not_allowed"   # default: "none"

    gw.rules.current.data["accounts"]["withdrawal"] = "paid_part"   # the chain's policy (HQ's key)
    res = await client.post("/withdrawals", headers=desk, body={"idempotency_key": "wd-000002", **body})
    assert res.status_code == 422 and res.json["error"]["code"] == "withdrawal_over_limit"    # no paid part known
    await tap(gw, GOLD)
    await gw.counter.topup("1", {"idempotency_key": "wd-top-01", "amount_fen": 10000, "payment": CASH})
    balance = (await tap(gw, GOLD)).member["balance_fen"]
    pos = await client.post("/withdrawals", headers=as_role(client, "pos"),
                            body={"idempotency_key": "wd-000003", **body})
    assert pos.status_code == 403
    res = await client.post("/withdrawals", headers=desk, body={"idempotency_key": "wd-000004", **body})
    assert res.status_code == 201, res.json
    assert res.json["paid_fen"] == 5000 and res.json["balance_after_fen"] == balance - 5000
    assert (await tap(gw, GOLD)).member["balance_fen"] == balance - 5000
    over = await client.post("/withdrawals", headers=desk, body={"idempotency_key": "wd-000005", **body,
                                                                 "amount_fen": 5001})
    assert over.status_code == 422 and over.json["error"]["field"] == "amount_fen"
    (rec,) = await records(gw, "withdrawal")
    assert validate_body("withdrawal", rec) == rec
    assert (rec["amount_fen"], rec["paid_fen"], rec["paid_known_fen"], rec["deltas"]) == \
        (5000, 5000, 10000, {"stored_value_fen": -5000})
    assert rec["account_id"] == "M1001" and rec["operator"] == "desk-3" and rec["payout"] == {"method": "cash"}


# ---------------------------------------------------------------- the operator

async def test_every_record_carries_the_terminal_and_the_operator(gw):
    client = api_client(gw)
    await tap(gw, DIAMOND)
    sale = await client.post("/lanes/1/sales", body={"idempotency_key": "op-sale-01", "lines": basket(5000),
                                                     "operator": "c007"})
    assert sale.status_code == 201, sale.json
    await tap(gw, DIAMOND)
    top = await client.post("/lanes/1/topups", body={"idempotency_key": "op-top-001", "amount_fen": 1000,
                                                     "payment": CASH, "operator": "c007"})
    assert top.status_code == 201, top.json
    ret = await client.post("/returns", body={"idempotency_key": "op-ret-001", "sale_seq": sale.json["seq"],
                                              "lines": [{"line": 0, "qty": 1}], "operator": "c008"})
    assert ret.status_code == 201, ret.json
    for rec in [r.body for r in await gw.journal.pending(0, 100)]:
        assert rec["terminal"].startswith("test-") and rec["operator"] in ("c007", "c008"), rec
    bad = await client.post("/lanes/1/quote", body={"lines": basket(100), "operator": "has space"})
    assert bad.status_code == 400 and bad.json["error"]["field"] == "operator"


# ---------------------------------------------------------------- crash safety

async def test_cards_registered_or_issued_here_survive_a_crash_of_the_local_state(tmp_path):
    from pathlib import Path

    cfg = config(tmp_path)
    async with Gateway(cfg, clock=lambda: T0) as gw:
        install(gw)
        await gw.counter.register({"idempotency_key": "crash-reg-1", "card_no": NEW_CARD, "consent": True})
        await gw.counter.card_service({"idempotency_key": "crash-rep-1", "kind": "replace", "card_no": GOLD,
                                       "new_card_no": NEW_CARD_2})
        await gw.counter.card_service({"idempotency_key": "crash-sub-1", "kind": "issue_subsidiary",
                                       "card_no": DIAMOND, "new_card_no": FAMILY_CARD})
    store = Path(cfg["store"]["data_dir"])
    for f in store.rglob("counter.db*"):   # lost after the journal's fsync: rebuilt from the journal
        f.unlink()
    async with Gateway(cfg, clock=lambda: T0) as gw:
        assert (await tap(gw, NEW_CARD)).member["account_id"] == f"S001-{NEW_CARD}"
        assert (await tap(gw, NEW_CARD_2)).member["account_id"] == "M1001"
        assert (await tap(gw, GOLD)).reason == "replaced"
        assert (await tap(gw, FAMILY_CARD)).member["account_id"] == "M1005"
