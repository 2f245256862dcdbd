"""Bad POS requests get a 4xx with a clear message and write nothing."""

import pytest

from tests.support import GOLD_UID, running_shop, sale_body


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    from demo.testbed import MosquittoBroker

    tmp = tmp_path_factory.mktemp("api")
    broker = MosquittoBroker(tmp / "broker").start()
    with running_shop(tmp, broker.port) as (_hq, gw):
        yield gw
    broker.stop()


GOOD_LINE = {"sku": "A1", "qty": 1, "unit_price": 100}
BAD_SALES = [
    # (path, raw body or JSON, expected status, words the message must contain)
    ("/lanes/1/sales", b"{not json", 400, "not valid JSON"),
    ("/lanes/1/sales", b"[1, 2]", 400, "JSON object"),
    ("/lanes/9/sales", sale_body("pos9-000001"), 404, "unknown lane '9'"),
    ("/lanes/1/sales", {"lines": [GOOD_LINE]}, 400, "idempotency_key"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-01"}, 400, "lines"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-02", "lines": []}, 400, "lines"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-03", "lines": [{"qty": 1, "unit_price": 1}]}, 400, "lines[0].sku"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-04", "lines": [{**GOOD_LINE, "qty": 0}]}, 400, "lines[0].qty"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-05", "lines": [{**GOOD_LINE, "unit_price": 1.5}]}, 400,
     "lines[0].unit_price"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-06", "lines": [GOOD_LINE, {**GOOD_LINE, "unit_price": -1}]},
     400, "lines[1].unit_price"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-07", "lines": [{**GOOD_LINE, "colour": "red"}]}, 400,
     "unknown field(s) colour"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-08", "lines": [GOOD_LINE], "member": "yes"}, 400, "member"),
    ("/lanes/2/sales", {"idempotency_key": "pos2-bad-09", "lines": [GOOD_LINE], "member": True}, 409,
     "no member card"),
    ("/lanes/1/sales", {"idempotency_key": "pos1-bad-10", "lines": [GOOD_LINE], "member": False,
                        "expected_total": 99}, 409, "expected_total 99"),
    ("/lanes/1/taps", {"source": "barcode", "raw": "1"}, 400, "source"),
    ("/lanes/1/taps", {"source": "nfc"}, 400, "raw"),
    ("/nowhere", {}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_SALES)
def test_bad_request_is_refused_clearly_and_writes_nothing(gw, path, body, status, words):
    before = gw.status()
    raw = body if isinstance(body, bytes) else None
    got, answer = gw.call("POST", path, None if raw else body, raw=raw)
    assert got == status, answer
    assert words in answer["error"]["message"], answer
    after = gw.status()
    assert after["last_seq"] == before["last_seq"]          # no journal record
    assert after["stats"]["sales"] == before["stats"]["sales"]


def test_wrong_method_and_cashier_texts(gw):
    got, answer = gw.call("GET", "/lanes/1/sales")
    assert got == 405 and "not allowed" in answer["error"]["message"]
    got, answer = gw.call("POST", "/lanes/2/quote", {"lines": [GOOD_LINE], "member": True})
    assert got == 409
    assert answer["error"]["text"]["zh-CN"] and answer["error"]["text"]["en"]


def test_good_request_after_bad_ones_still_works(gw):
    assert gw.call("POST", "/lanes/1/taps", {"source": "nfc", "raw": GOLD_UID})[0] == 200
    got, sale = gw.call("POST", "/lanes/1/sales", {"idempotency_key": "pos1-good-1", "lines": [GOOD_LINE]})
    assert got == 201 and sale["total"] == 95  # gold: 5% off 1.00 yuan
