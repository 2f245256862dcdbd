"""The POS API's contract (gateway/shell/api_schema.py): every request is checked
at the door, refusals name the field, and the published OpenAPI document is
built from the same schemas."""

import json

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.shell import api_schema as api
from gateway.shell.api_schema import RequestInvalid, parse_body

KEY = "pos1-0001-abcd"
LINE = {"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1, "unit_price": 4990}
PAY = {"method": "wechat", "reference": "4200001234202612050001"}

VALID = {
    "taps": {"source": "nfc", "raw": "04A1B2C3D4E5F6"},
    "quote": {"lines": [LINE], "member": True, "tender": {"points": 100, "stored_value_fen": 0, "coupons": ["C1"]}},
    "sales": {"idempotency_key": KEY, "lines": [LINE], "member": False, "expected_total": 4990},
    "topups": {"idempotency_key": KEY, "amount_fen": 10000, "payment": PAY},
    "package_uses": {"idempotency_key": KEY, "uses": 1},
    "package_sales": {"idempotency_key": KEY, "package_id": "car_wash10", "payment": {"method": "stored_value"}},
    "gifts": {"idempotency_key": KEY, "gift_id": "umbrella", "qty": 2},
    "returns": {"idempotency_key": KEY, "sale_seq": 12, "lines": [{"line": 0, "qty": 1}, {"sku": "A1", "qty": 2}]},
    "card_services": {"idempotency_key": KEY, "kind": "replace", "card_no": "880000000013",
                      "new_card_no": "880000000099", "reason": "卡片损坏 damaged"},
}


def refused(endpoint: str, body) -> RequestInvalid:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    with pytest.raises(RequestInvalid) as info:
        parse_body(endpoint, raw)
    return info.value


def sale(**line) -> dict:
    return {"idempotency_key": KEY, "lines": [{**LINE, **line}]}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (endpoint, body, kind, field) -- each hole of the issue, and the usual mistakes
ATTACKS = [
    # numbers: beyond 64 bits (the journal's hash used to 500 on them), > 4,300 digits, 2^63
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":1,"unit_price":%d}]}' % 2**70,
     "out_of_range", "lines[0].unit_price"),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":1,"unit_price":1' + b"0" * 5000
     + b'}]}', "out_of_range", "lines[0].unit_price"),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":-%d,"unit_price":1}]}' % 2**64,
     "out_of_range", "lines[0].qty"),
    ("returns", {"idempotency_key": KEY, "sale_seq": 2**63, "lines": [{"line": 0, "qty": 1}]},
     "out_of_range", "sale_seq"),
    ("quote", {"lines": [LINE], "tender": {"points": 10**11}}, "out_of_range", "tender.points"),
    # nesting: past orjson's own 1,024 and a 253-deep reason (which used to take a seq number)
    ("card_services", b'{"idempotency_key":"pos1-0001-abcd","kind":"freeze","card_no":"880000000013","reason":'
     + nested(5000) + b"}", "too_deep", "reason" + "[0]" * 15),
    ("card_services", b'{"idempotency_key":"pos1-0001-abcd","kind":"freeze","card_no":"880000000013","reason":'
     + nested(253) + b"}", "too_deep", "reason" + "[0]" * 15),
    # text: lone surrogates, NUL, bidi overrides and isolates, C1 controls, line separators
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":1,"unit_price":1,"name":"a\\ud800"}]}',
     "bad_text", "lines[0].name"),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":1,"unit_price":1,"name":"\\udc00"}]}',
     "bad_text", "lines[0].name"),
    ("sales", sale(name="可乐\x00"), "bad_text", "lines[0].name"),
    ("sales", sale(name="cola\u202egnp.exe"), "bad_text", "lines[0].name"),
    ("sales", sale(name="\u2067x\u2069"), "bad_text", "lines[0].name"),
    ("sales", sale(category="drinks\x85"), "bad_text", "lines[0].category"),
    ("sales", sale(name="a\u2028b"), "bad_text", "lines[0].name"),
    ("sales", sale(name="a\nb"), "bad_text", "lines[0].name"),
    ("card_services", {**VALID["card_services"], "reason": "lost\u202e"}, "bad_text", "reason"),
    # lengths
    ("sales", sale(name="长" * 101), "too_long", "lines[0].name"),
    ("card_services", {**VALID["card_services"], "reason": "x" * 201}, "too_long", "reason"),
    # card numbers: ASCII digits only (str.isdigit took these)
    ("card_services", {**VALID["card_services"], "card_no": "８８０００００００００１３"}, "invalid", "card_no"),
    ("card_services", {**VALID["card_services"], "card_no": "٨٨٠٠٠٠٠٠٠٠١٣"}, "invalid", "card_no"),
    ("card_services", {**VALID["card_services"], "new_card_no": "88000000009９"}, "invalid", "new_card_no"),
    ("card_services", {**VALID["card_services"], "card_no": "880000000013\n"}, "invalid", "card_no"),
    ("card_services", {**VALID["card_services"], "card_no": "12345"}, "invalid", "card_no"),
    # reason is a string, nothing else
    ("card_services", {**VALID["card_services"], "reason": {"why": "lost"}}, "invalid", "reason"),
    ("card_services", {**VALID["card_services"], "reason": ["lost"]}, "invalid", "reason"),
    ("card_services", {**VALID["card_services"], "reason": 7}, "invalid", "reason"),
    ("card_services", {**VALID["card_services"], "new_card_no": None}, "invalid", "new_card_no"),
    ("card_services", {k: v for k, v in VALID["card_services"].items() if k != "new_card_no"},
     "missing_field", "new_card_no"),
    ("card_services", {**VALID["card_services"], "kind": "delete"}, "invalid", "kind"),
    # money caps (a ~950-billion-yuan sale used to commit)
    ("sales", sale(unit_price=10_000_001), "out_of_range", "lines[0].unit_price"),
    ("sales", sale(qty=10_000), "out_of_range", "lines[0].qty"),
    ("sales", sale(qty=9999, unit_price=10_000_000), "out_of_range", "lines"),
    ("quote", {"lines": [{**LINE, "qty": 2, "unit_price": 10_000_000}] * 6}, "out_of_range", "lines"),
    ("sales", {**sale(), "expected_total": 100_000_001}, "out_of_range", "expected_total"),
    ("sales", {**sale(), "tender": {"stored_value_fen": -1}}, "out_of_range", "tender.stored_value_fen"),
    ("topups", {**VALID["topups"], "amount_fen": api.MAX_TOPUP_FEN + 1}, "out_of_range", "amount_fen"),
    ("topups", {**VALID["topups"], "amount_fen": 0}, "out_of_range", "amount_fen"),
    ("package_uses", {"idempotency_key": KEY, "uses": 10_000}, "out_of_range", "uses"),
    # top-ups say how they were paid
    ("topups", {"idempotency_key": KEY, "amount_fen": 100}, "missing_field", "payment"),
    ("topups", {**VALID["topups"], "payment": {"method": "bitcoin"}}, "invalid", "payment.method"),
    ("topups", {**VALID["topups"], "payment": {"method": "cash", "reference": "单号"}}, "invalid",
     "payment.reference"),
    ("topups", {**VALID["topups"], "payment": {"method": "cash", "tip": 1}}, "unknown_field", "payment.tip"),
    ("topups", {**VALID["topups"], "package_id": "gold500"}, "invalid", "package_id"),
    # floats where whole numbers belong, booleans are not numbers
    ("sales", sale(qty=1.5), "invalid", "lines[0].qty"),
    ("sales", sale(qty=1.0), "invalid", "lines[0].qty"),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":1E0,"unit_price":1}]}',
     "invalid", "lines[0].qty"),
    ("sales", sale(unit_price=True), "invalid", "lines[0].unit_price"),
    # duplicate keys: two readers could disagree on which one counts
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"A1","qty":1,"qty":9,"unit_price":1}]}',
     "duplicate_key", "lines[0].qty"),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","idempotency_key":"pos1-0002-abcd","lines":[]}',
     "duplicate_key", "idempotency_key"),
    # shape
    ("sales", sale(colour="red"), "unknown_field", "lines[0].colour"),
    ("sales", {**sale(), "\u202eevil": 1}, "unknown_field", "?"),
    ("sales", {"lines": [LINE]}, "missing_field", "idempotency_key"),
    ("sales", {"idempotency_key": KEY, "lines": []}, "invalid", "lines"),
    ("sales", {"idempotency_key": KEY, "lines": [LINE] * 501}, "too_many", "lines"),
    ("sales", {"idempotency_key": "short", "lines": [LINE]}, "invalid", "idempotency_key"),
    ("sales", {"idempotency_key": "pos1 0001 abcd", "lines": [LINE]}, "invalid", "idempotency_key"),
    ("sales", sale(sku="可乐"), "invalid", "lines[0].sku"),
    ("sales", {**sale(), "member": "yes"}, "invalid", "member"),
    ("quote", {"lines": [LINE], "tender": {"coupons": ["C1"] * 21}}, "too_many", "tender.coupons"),
    ("quote", {"lines": [LINE], "tender": {"coupons": ["C 1"]}}, "invalid", "tender.coupons[0]"),
    ("returns", {"idempotency_key": KEY, "lines": [{"line": 0, "qty": 1}]}, "invalid", "sale_seq"),
    ("returns", {**VALID["returns"], "sale_id": "0123456789abcdef"}, "invalid", "sale_seq"),
    ("returns", {**VALID["returns"], "lines": [{"qty": 1}]}, "invalid", "lines[0].line"),
    ("returns", {**VALID["returns"], "lines": [{"line": 0, "sku": "A1", "qty": 1}]}, "invalid", "lines[0].line"),
    ("returns", {**VALID["returns"], "lines": [{"line": 500, "qty": 1}]}, "out_of_range", "lines[0].line"),
    ("taps", {"source": "barcode", "raw": "1"}, "invalid", "source"),
    ("taps", {"source": "nfc", "raw": "   "}, "invalid", "raw"),
    ("taps", {"source": "nfc", "raw": "04A1\u202e"}, "invalid", "raw"),
    ("taps", {"source": "nfc", "raw": "0" * 513}, "too_long", "raw"),
    # not a JSON object at all
    ("sales", b"{not json", "not_json", None),
    ("sales", b"", "not_json", None),
    ("sales", b"[1, 2]", "not_object", None),
    ("sales", b'"text"', "not_object", None),
    ("sales", b'\xef\xbb\xbf{"lines": []}', "not_json", None),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"\xff","qty":1,"unit_price":1}]}',
     "not_utf8", None),
    ("sales", b'{"idempotency_key":"pos1-0001-abcd","lines":[{"sku":"\xed\xa0\x80","qty":1,"unit_price":1}]}',
     "not_utf8", None),
    ("sales", b'{"lines": NaN}', "not_json", None),
    ("sales", b'{"lines": [1e400]}', "out_of_range", "lines[0]"),
]


@pytest.mark.parametrize("endpoint,body,kind,field", ATTACKS,
                         ids=[f"{i}-{a[0]}-{a[2]}" for i, a in enumerate(ATTACKS)])
def test_attack_is_refused_naming_the_field(endpoint, body, kind, field):
    exc = refused(endpoint, body)
    assert (exc.kind, exc.field, exc.status) == (kind, field, 400), str(exc)
    if field is not None:
        assert str(exc).startswith(f"{field}: ")
        assert field in exc.text["zh-CN"] and field in exc.text["en"]
    assert exc.text["zh-CN"] and exc.text["en"]
    jsonschema.validate({"error": exc.public()}, api.ERROR)
    # Nothing of what was refused is echoed: messages carry no control or bidi characters.
    for text in (str(exc), exc.text["zh-CN"], exc.text["en"]):
        assert not any(c in text for c in "\x00\u202e\u2067\u2069\x85\u2028\ud800"), text
        assert len(text) < 400


def test_too_large_is_413():
    exc = refused("sales", b'{"idempotency_key": "pos1-0001-abcd", "lines": [], "x": "' + b"x" * api.MAX_BODY_BYTES
                  + b'"}')
    assert (exc.status, exc.code, exc.kind) == (413, "too_large", "too_large")


@pytest.mark.parametrize("endpoint,body,code", [
    ("sales", sale(qty=0), "basket_invalid"),
    ("quote", {"lines": [LINE], "tender": {"points": -5}}, "tender_invalid"),
    ("topups", {**VALID["topups"], "amount_fen": 0}, "topup_invalid"),
    ("package_uses", {"idempotency_key": KEY, "uses": 0}, "package_invalid_uses"),
    ("returns", {**VALID["returns"], "lines": [{"line": -1, "qty": 1}]}, "return_invalid"),
    ("card_services", {**VALID["card_services"], "kind": "explode"}, "card_op_invalid"),
    ("card_services", {**VALID["card_services"], "card_no": "x"}, "bad_request"),
    ("sales", {**sale(), "tip": 5}, "bad_request"),
    ("topups", {**VALID["topups"], "payment": {"method": "iou"}}, "bad_request"),
    ("sales", b"{", "bad_request"),
])
def test_error_codes_stay_those_pos_software_knows(endpoint, body, code):
    """A malformed field the pricing core owns keeps the code it always had."""
    assert refused(endpoint, body).code == code


def test_messages_keep_the_words_pos_developers_rely_on():
    """tests/test_api_errors.py and POS code match on these."""
    assert "not valid JSON" in str(refused("sales", b"{not json"))
    assert "JSON object" in str(refused("sales", b"[1, 2]"))
    assert "unknown field(s) colour" in str(refused("sales", sale(colour="red")))
    assert "lines[0].sku" in str(refused("sales", {"idempotency_key": KEY, "lines": [{"qty": 1, "unit_price": 1}]}))
    assert "lines[1].unit_price" in str(refused("sales", {"idempotency_key": KEY,
                                                          "lines": [LINE, {**LINE, "unit_price": -1}]}))
    assert "give exactly one of sale_seq, sale_id" in str(refused("returns", {"idempotency_key": KEY,
                                                                             "lines": [{"line": 0, "qty": 1}]}))


@pytest.mark.parametrize("endpoint", sorted(VALID))
def test_valid_examples_pass_unchanged(endpoint):
    raw = json.dumps(VALID[endpoint], ensure_ascii=False).encode()
    assert parse_body(endpoint, raw) == VALID[endpoint]
    assert parse_body(endpoint, raw.decode()) == VALID[endpoint]  # str bodies too


def test_path_parameters_are_checked():
    assert parse_body("package_uses", b'{"idempotency_key": "pos1-0001-abcd"}', {"package_id": "car_wash10"})
    with pytest.raises(RequestInvalid) as info:
        parse_body("package_uses", b'{"idempotency_key": "pos1-0001-abcd"}', {"package_id": "wash\x00"})
    assert info.value.field == "package_id"


def basket(n: int, name: str = "农夫山泉 饮用天然水 550ml×24瓶 整箱装") -> dict:
    return {"idempotency_key": KEY, "member": True, "expected_total": 0, "lines": [
        {"sku": f"69{i:011d}", "name": name, "category": "drinks", "qty": 2, "unit_price": 1990}
        for i in range(n)]}


def test_a_500_line_basket_is_accepted_and_fits_the_default_body_limit():
    body = basket(500)
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert parse_body("sales", raw) == body
    assert len(raw) < 80_000                       # ~70 KB, as gateway/shell/config.py says
    assert len(raw) < 256 * 1024                    # api.max_body_bytes' default
    # The largest legal line (every text at its cap, 3-byte characters) still fits 500 times in the cap.
    widest = {"sku": "X" * 64, "name": "长" * api.MAX_NAME, "category": "类" * api.MAX_CATEGORY,
              "qty": api.MAX_QTY, "unit_price": 0}
    raw = json.dumps({"idempotency_key": "k" * 128, "lines": [widest] * 500}, ensure_ascii=False).encode()
    assert len(raw) < api.MAX_BODY_BYTES
    parse_body("sales", raw)


AT_THE_CAPS = [  # every bound is inclusive: the largest (or smallest) legal value passes
    ("sales", sale(name="长" * api.MAX_NAME, category="类" * api.MAX_CATEGORY, sku="S" * 64)),
    ("sales", sale(qty=api.MAX_QTY, unit_price=api.MAX_SALE_FEN // api.MAX_QTY)),
    ("sales", sale(qty=10, unit_price=api.MAX_UNIT_PRICE_FEN)),          # exactly the sale cap
    ("sales", {**sale(unit_price=0), "expected_total": api.MAX_SALE_FEN, "idempotency_key": "k" * 128}),
    ("sales", {**sale(), "idempotency_key": "a.b_c:d-"}),
    ("quote", {"lines": [LINE], "tender": {"points": api.MAX_TENDER_POINTS, "stored_value_fen": api.MAX_SALE_FEN,
                                           "coupons": [f"C{i}" for i in range(api.MAX_COUPONS)]}}),
    ("topups", {**VALID["topups"], "amount_fen": api.MAX_TOPUP_FEN, "payment": {"method": "other",
                                                                                "reference": "R" * 64}}),
    ("topups", {"idempotency_key": KEY, "package_id": "p" * 64, "payment": {"method": "cash"}}),
    ("package_uses", {"idempotency_key": KEY, "uses": api.MAX_QTY}),
    ("package_sales", {"idempotency_key": KEY, "package_id": "p" * 64, "payment": {"method": "other",
                                                                               "reference": "R" * 64}}),
    ("gifts", {"idempotency_key": KEY, "gift_id": "g" * 64, "qty": api.MAX_GIFT_QTY}),
    ("returns", {"idempotency_key": KEY, "sale_id": "f" * 64, "lines": [{"line": 499, "qty": api.MAX_QTY}] * 500}),
    ("returns", {"idempotency_key": KEY, "sale_seq": api.MAX_SEQ, "lines": [{"sku": "S" * 64, "qty": 1}]}),
    ("card_services", {"idempotency_key": KEY, "kind": "issue", "card_no": "1" * 19, "reason": "因" * 200}),
    ("card_services", {"idempotency_key": KEY, "kind": "freeze", "card_no": "123456", "reason": ""}),
    ("taps", {"source": "qr", "raw": "SGQ1." + "A" * 507}),
    ("taps", {"source": "magstripe", "raw": " %B6228480000000000^ZHANG/SAN^2812?"}),
]


@pytest.mark.parametrize("endpoint,body", AT_THE_CAPS, ids=[f"{i}-{a[0]}" for i, a in enumerate(AT_THE_CAPS)])
def test_bodies_at_the_caps_are_accepted(endpoint, body):
    assert parse_body(endpoint, json.dumps(body, ensure_ascii=False).encode()) == body  # and left as it was


def test_defaults_are_documented_not_filled_in():
    """An absent "member" means "the lane's member if any" to the counter, not true."""
    assert "member" not in parse_body("sales", json.dumps(sale()).encode())
    assert "uses" not in parse_body("package_uses", b'{"idempotency_key": "pos1-0001-abcd"}')


def test_an_accepted_body_can_be_hashed_and_journaled():
    """What used to 500: the journal's request hash (orjson) on a >64-bit integer."""
    from gateway.store.journal import request_hash

    for body in VALID.values():
        request_hash(body)
    extreme = {"idempotency_key": KEY, "sale_seq": api.MAX_SEQ, "lines": [{"line": 499, "qty": api.MAX_QTY}]}
    request_hash(parse_body("returns", json.dumps(extreme).encode()))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoint=st.sampled_from(sorted(api.REQUESTS)), doc=st.dictionaries(
    st.sampled_from(["lines", "tender", "reason", "card_no", "raw", "sale_seq", "payment", "idempotency_key",
                     "kind", "source", "amount_fen", "uses", "member", "x"]), JSON, max_size=5))
def test_any_json_is_either_accepted_or_refused_cleanly(endpoint, doc):
    try:
        raw = orjson.dumps(doc)
    except TypeError:  # an integer orjson cannot write: send it as text
        raw = json.dumps(doc).encode()
    try:
        out = parse_body(endpoint, raw)
    except RequestInvalid as exc:
        jsonschema.validate({"error": exc.public()}, api.ERROR)
        return
    jsonschema.validate(out, api.REQUESTS[endpoint])  # the reference validator agrees


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_any_bytes_are_either_accepted_or_refused_cleanly(raw):
    try:
        parse_body("sales", raw)
    except RequestInvalid:
        pass


# ---------------------------------------------------------------- the contract document

def test_openapi_json_is_generated_from_the_schemas():
    committed = api.OPENAPI_PATH.read_text(encoding="utf-8")
    assert committed == api.openapi_text(), \
        "gateway/shell/openapi.json is out of date: run `python -m gateway.shell.api_schema` and commit it"


def test_openapi_document_is_built_from_the_same_schema_dicts():
    doc = api.openapi_document()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for name, (method, path, _summary, request, _resp, _errors, secured) in api.ENDPOINTS.items():
        op = doc["paths"][path][method]
        if request:
            assert schemas[request] is api.REQUESTS[name]  # one definition, not a copy
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(request)
            assert {"400", "401", "403", "413", "422"} <= set(op["responses"])
        assert bool(op["security"]) == secured
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)  # OpenAPI 3.1's dialect
        jsonschema.Draft7Validator.check_schema(schema)       # fastjsonschema's
    assert doc["components"]["securitySchemes"]["terminal"]["scheme"] == "bearer"
    events = doc["paths"]["/lanes/{lane}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert any(p["name"] == "Last-Event-ID" and p["in"] == "header" for p in events["parameters"])


def test_openapi_paths_are_the_readme_table():
    expected = {("get", "/health"), ("get", "/status"), ("get", "/lanes"), ("get", "/lanes/{lane}/member"),
                ("get", "/lanes/{lane}/events"), ("post", "/lanes/{lane}/taps"), ("post", "/lanes/{lane}/quote"),
                ("post", "/lanes/{lane}/sales"), ("post", "/lanes/{lane}/topups"),
                ("post", "/lanes/{lane}/packages/{package_id}/uses"), ("post", "/lanes/{lane}/packages"),
                ("post", "/lanes/{lane}/gifts"), ("post", "/returns"),
                ("post", "/cards/services"), ("post", "/members"), ("post", "/withdrawals"),
                ("get", "/openapi.json")}
    doc = api.openapi_document()
    assert {(m, p) for p, ops in doc["paths"].items() for m in ops} == expected


def test_openapi_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator not installed")
    validator.validate(api.openapi_document())


def test_patterns_agree_with_the_rest_of_the_code():
    from gateway.shell import config
    from gateway.shell import counter
    from wire import ruleset

    assert api.CODE == ruleset._KEY["pattern"]            # coupon and package codes are rule-set keys
    assert api.CARD_NO == ruleset._CARD_NO["pattern"]
    lane_id = config.GATEWAY_CONFIG_SCHEMA["properties"]["lanes"]["items"]["properties"]["id"]["pattern"]
    assert api.LANE_ID == lane_id
    assert tuple(api.PAYMENT["properties"]["method"]["enum"]) == counter.PAYMENT_METHODS


@pytest.mark.parametrize("example", [
    {"error": {"code": "bad_request", "message": "m", "text": {"zh-CN": "请求内容有误", "en": "Invalid"}}},
    {"error": {"code": "points_step", "message": "m", "text": {"zh-CN": "z", "en": "e"}, "field": "tender.points"}},
])
def test_error_schema_takes_the_api_error_shapes(example):
    jsonschema.validate(example, api.ERROR)
