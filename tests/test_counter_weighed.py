"""Weighed goods at the counter: a v3 store layer (units, scale barcodes) over the
demo's v2 chain and region layers; the POS API takes a measured quantity and a
scale label, the sale record carries the quantity in steps with its unit, a
return gives back part of the weight, and a bad quantity or label is refused
naming the field, journaling nothing."""

from __future__ import annotations

from gateway.core.measure import ean13_check_digit
from gateway.shell.service import Gateway
from hq_bridge.rules import _read_doc, read_table_file
from tests.support import api_client, install_rules
from tests.test_counter import EXAMPLES, T0, config, journal_depth

import pytest

KG = {"name": {"zh-CN": "千克", "en": "kg"}, "symbol": "kg", "decimals": 3, "max": 50000}
W21 = {"prefix": "21", "item_digits": 5, "value": "weight", "value_digits": 5, "unit": "kg"}
LABEL = "211234500532"
LABEL += ean13_check_digit(LABEL)            # item 12345, 0.532 kg


@pytest.fixture
async def gw(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        chain, region, store = (_read_doc(EXAMPLES / n) for n in ("chain.toml", "region-east.toml",
                                                                   "store-S001.toml"))
        store = {**store, "format": 3, "units": {"kg": KG}, "scale_barcodes": {"w21": W21}}
        install_rules(gw, [chain, region, store], now=T0 - 60, region="east",
                      members=list(read_table_file(EXAMPLES / "members.demo.jsonl")),
                      deny=list(read_table_file(EXAMPLES / "deny.demo.jsonl")))
        yield gw


async def test_a_weighed_sale_through_the_pos_api_and_its_return(gw):
    client = api_client(gw)
    lines = [{"sku": "FR-APPLE", "name": "苹果", "category": "produce", "unit": "kg", "qty": "0.532",
              "unit_price": 1298},
             {"barcode": LABEL, "name": "牛肉", "category": "produce", "unit_price": 2980}]
    res = await client.post("/lanes/1/sales", body={"idempotency_key": "weighed-0001", "lines": lines,
                                                    "member": False})
    assert res.status_code == 201, res.json
    # 0.532 x 12.98 = 6.90536 -> 6.91; 0.532 x 29.80 = 15.8536 -> 15.85 (no promotion on produce)
    assert res.json["receipt"]["zh-CN"][:2] == ["苹果 0.532kg  6.91", "牛肉 0.532kg  15.85"]
    _, _, record = gw.counter.archive.sale({"seq": res.json["seq"]})   # the journaled sale's body
    assert [(l["sku"], l["qty"], l["unit"], l["scale"], l["amount"]) for l in record["lines"]] == [
        ("FR-APPLE", 532, "kg", 1000, 691), ("2112345", 532, "kg", 1000, 1585)]
    back = await client.post("/returns", body={"idempotency_key": "weighed-ret-1", "sale_seq": res.json["seq"],
                                               "lines": [{"line": 0, "qty": "0.200"}]})
    assert back.status_code == 201, back.json
    assert back.json["receipt"]["en"][1] == "苹果 0.200kg  2.59"    # 691 x 200 / 532 = 259.8 -> 2.59


async def test_bad_weights_and_labels_are_refused_naming_the_field(gw):
    client = api_client(gw)
    depth = await journal_depth(gw)
    apple = {"sku": "FR-APPLE", "unit": "kg", "qty": "0.532", "unit_price": 1298}
    cases = [({**apple, "qty": "0.5321"}, "lines[0].qty"),
             ({**apple, "qty": "999.000"}, "lines[0].qty"),
             ({**apple, "qty": 0.532}, "lines[0].qty"),
             ({**apple, "unit": "lb"}, "lines[0].unit"),
             ({"barcode": LABEL[:-1] + str((int(LABEL[-1]) + 1) % 10), "unit_price": 2980}, "lines[0].barcode"),
             ({"barcode": "21123450053", "unit_price": 2980}, "lines[0].barcode")]
    for k, (line, field) in enumerate(cases):
        res = await client.post("/lanes/1/sales", body={"idempotency_key": f"weighed-bad-{k:04d}",
                                                        "lines": [line], "member": False})
        assert res.status_code in (400, 422), (line, res.json)
        assert res.json["error"]["field"] == field, (line, res.json)
    assert await journal_depth(gw) == depth
