"""The typed journal records (wire/records.py): every body the gateway really
journals is valid under its schema; bad bodies are refused naming the field;
the published schema file is the one the dataclasses make.

The gateway runs in-process as in tests/test_counter.py (demo rules and
member snapshot, HQ unreachable, a fixed clock) and does one of every
counter operation; every body in its journal is then checked.
"""

from __future__ import annotations

import copy
import json

import fastjsonschema
import pytest

from gateway.shell.service import Gateway
from tests.test_counter import CASH, DIAMOND, GOLD, T0, basket, config, install, tap
from wire import records
from wire.records import RecordError, from_body, to_body, validate_body

NEW_CARD = "880000000997"
REPLACEMENT = "880000000989"


async def journal_records(tmp_path) -> list:
    """One of every counter operation through a real gateway: its journaled records (TxRecord)."""
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)
        await tap(gw, DIAMOND)
        sale = await gw.counter.sale("1", {"idempotency_key": "sale-00001", "lines": [
            {"sku": "HH-001", "name": "detergent", "category": "household", "qty": 3, "unit_price": 3333},
            {"sku": "FR-002", "name": "apples", "category": "fresh", "qty": 2, "unit_price": 1999}],
            "tender": {"stored_value_fen": 5000, "points": 1000}})
        await gw.counter.sale_return({"idempotency_key": "ret-000001", "sale_seq": sale.seq,
                                      "lines": [{"line": 0, "qty": 1}]})
        await gw.counter.sale_return({"idempotency_key": "ret-000002", "sale_seq": sale.seq,
                                      "lines": [{"line": 0, "qty": 2}, {"line": 1, "qty": 2}]})
        await tap(gw, GOLD)
        await gw.counter.sale("1", {"idempotency_key": "sale-00002", "lines": basket(20000),
                                    "tender": {"coupons": ["C2026-0001"]}})
        await tap(gw, GOLD)
        await gw.counter.topup("1", {"idempotency_key": "top-000001", "amount_fen": 10000, "payment": CASH})
        await tap(gw, GOLD)
        await gw.counter.topup("1", {"idempotency_key": "top-000002", "amount_fen": 30000,
                                     "payment": {"method": "wechat", "reference": "WX-123"}})
        await tap(gw, GOLD)
        await gw.counter.use_package("1", "car_wash10", {"idempotency_key": "pkg-000001", "uses": 2})
        for i, (kind, extra) in enumerate([("report_lost", {"reason": "lost on the bus"}), ("unfreeze", {}),
                                           ("freeze", {}), ("unfreeze", {}), ("annual_fee", {}),
                                           ("replace", {"new_card_no": REPLACEMENT})]):
            await gw.counter.card_service({"idempotency_key": f"card-{i:05d}", "kind": kind, "card_no": GOLD,
                                           **extra})
        await gw.counter.card_service({"idempotency_key": "card-issue", "kind": "issue", "card_no": NEW_CARD})
        await gw.counter.sale("2", {"idempotency_key": "sale-00003", "lines": basket(1000), "member": False})
        return await gw.journal.pending(0, 1000)


@pytest.fixture
async def journaled(tmp_path):
    return await journal_records(tmp_path)


async def test_every_journaled_body_is_valid(journaled, validator):
    types = [r.type for r in journaled]
    assert set(types) == {"sale", "return", "topup", "package_use", "card_op"}
    assert len(journaled) == 15
    for r in journaled:
        assert validate_body(r.type, r.body) is r.body
        # The dataclass is the same record: built from the body, it journals as the body.
        assert to_body(from_body(r.type, r.body)) == r.body
    # ... and the published oneOf schema agrees with the per-type validators.
    check = fastjsonschema.compile(records.RECORD_BODY_SCHEMA)
    for r in journaled:
        check(r.body)


@pytest.fixture(params=["default", "fastjsonschema"])
def validator(request, monkeypatch):
    """validate_body with jsonschema-rs (when installed) and with fastjsonschema: the same verdicts."""
    if request.param == "fastjsonschema":
        monkeypatch.setattr(records, "jsonschema_rs", None)
    return request.param


async def test_bad_bodies_are_refused_naming_the_field(journaled, validator):
    sale = next(r.body for r in journaled if r.type == "sale")
    cases = [
        (lambda b: b["lines"][0].__setitem__("qty", 0), "lines[0].qty"),
        (lambda b: b["lines"][0].__setitem__("qty", True), "lines[0].qty"),
        (lambda b: b["totals"].__setitem__("stored_value_fen", -1), "totals.stored_value_fen"),
        (lambda b: b["lines"][0].__setitem__("surprise", 1), "lines[0]"),
        (lambda b: b.pop("day"), "(top level)"),
        (lambda b: b.__setitem__("idempotency_key", "k" * 201), "idempotency_key"),
        (lambda b: b["member"].__setitem__("card_no", "12ab"), "member.card_no"),
        (lambda b: b.__setitem__("lines", b["lines"] * 300), "lines"),
        (lambda b: b.__setitem__("at", "yesterday"), "at"),
    ]
    for mutate, field in cases:
        body = copy.deepcopy(sale)
        mutate(body)
        with pytest.raises(RecordError) as refused:
            validate_body("sale", body)
        assert refused.value.field == field, str(refused.value)
        assert str(refused.value).startswith(f"sale record: {field}: ")
        assert validator != "fastjsonschema" or "must" in refused.value.problem
    with pytest.raises(RecordError, match="type"):
        validate_body("return", sale)
    with pytest.raises(RecordError, match="not a record type"):
        validate_body("unsendable", {"type": "unsendable"})


def test_registration_record_round_trips():
    reg = records.Registration(at="2026-11-25T15:00:00+08:00", member_id="S001-000001", card_no="880000000955",
                               consent=True, name="钱*", birthday="02-29", idempotency_key="local/reg-00001",
                               day="2026-11-25", terminal="desk-1")
    body = to_body(reg)
    assert body["type"] == "registration" and "operator" not in body and "phone" not in json.dumps(body)
    assert validate_body("registration", body) == body
    assert from_body("registration", body) == reg
    with pytest.raises(RecordError, match="consent"):
        validate_body("registration", {k: v for k, v in body.items() if k != "consent"})
    with pytest.raises(RecordError) as refused:
        validate_body("registration", {**body, "phone": "13800000000"})
    assert refused.value.field == "(top level)"


def test_every_string_integer_and_array_is_bounded():
    def walk(schema, path):
        if "definitions" in schema:
            for name, s in schema["definitions"].items():
                walk(s, name)
            return
        types = schema.get("type")
        types = types if isinstance(types, list) else [types]
        if "string" in types:
            assert "maxLength" in schema or "pattern" in schema, path
        if "integer" in types:
            assert "maximum" in schema and "minimum" in schema, path
        if "array" in types:
            assert "maxItems" in schema, path
            walk(schema["items"], f"{path}[]")
        if "object" in types:
            assert schema.get("additionalProperties") is False or "maxProperties" in schema, path
            for k, s in schema.get("properties", {}).items():
                walk(s, f"{path}.{k}")
            if isinstance(schema.get("additionalProperties"), dict):
                walk(schema["additionalProperties"], f"{path}.*")
        for s in schema.get("anyOf", []):
            walk(s, path)

    walk(records.RECORD_BODY_SCHEMA, "")


def test_the_schema_file_is_generated():
    assert records.OUT.read_text() == records.render(), "run: python -m wire.records"
