"""Safe by default: nobody on the store LAN acts without a terminal's
credential, and a terminal acts only in its role and for its lanes.

Each test first does what an intruder on the LAN did before this work
(top up for free, tap for any lane, return another lane's sale, report any
card lost, call from a web page) and asserts it is refused and writes nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from microdot.test_client import TestClient

from gateway.shell import terminals
from gateway.shell.api import create_app
from gateway.shell.service import Gateway
from gateway.shell.terminals import Terminals, TerminalsError
from tests.support import BIN, api_client
from tests.test_counter import DIAMOND, GOLD, T0, basket, config, install, journal_depth, tap

CASH = {"method": "cash"}


@pytest.fixture
async def gw(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)
        yield gw


def lane_tokens(gw: Gateway) -> dict[str, str]:
    """Real store credentials: a POS per lane, a lane terminal on lane 1, the desk."""
    path = Path(gw.config["store"]["data_dir"]) / "terminals.json"
    return {"pos1": terminals.add(path, "pos-1", "pos", ["1"]),
            "pos2": terminals.add(path, "pos-2", "pos", ["2"]),
            "reader1": terminals.add(path, "reader-1", "lane_terminal", ["1"]),
            "desk": terminals.add(path, "desk", "service_desk", ["*"]),
            "manager": terminals.add(path, "manager", "manager", ["*"])}


def client_for(gw: Gateway) -> TestClient:
    return TestClient(create_app(gw, Terminals(Path(gw.config["store"]["data_dir"]) / "terminals.json")),
                      host="127.0.0.1:8080")


def auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def test_without_a_credential_nothing_is_done(gw):
    lane_tokens(gw)
    gw.config["api"]["auth_failures_per_minute"] = 100  # every attempt answered 401, none 429
    client = client_for(gw)
    await tap(gw, DIAMOND)
    depth = await journal_depth(gw)
    attacks = [
        ("/lanes/1/topups", {"idempotency_key": "free-money-1", "amount_fen": 10_000_000, "payment": CASH}),
        ("/lanes/1/taps", {"source": "magstripe", "raw": GOLD}),
        ("/lanes/1/sales", {"idempotency_key": "free-sale-01", "lines": basket(100)}),
        ("/returns", {"idempotency_key": "free-return", "sale_seq": 1}),
        ("/cards/services", {"idempotency_key": "lost-it-001", "kind": "report_lost", "card_no": GOLD}),
    ]
    for path, body in attacks:
        for header in ({}, auth("pos-1.wrongsecretwrongsecretwrongsecretwrong1"), {"Authorization": "Basic eA=="}):
            res = await client.post(path, headers=header, body=body)
            assert res.status_code == 401, (path, header, res.json)
            assert res.json["error"]["code"] == "unauthorized"
            assert res.json["error"]["text"]["zh-CN"] and res.headers["WWW-Authenticate"].startswith("Bearer")
    assert await journal_depth(gw) == depth
    assert (await client.get("/status")).status_code == 401
    assert (await client.get("/health")).status_code == 200   # liveness stays open


async def test_each_role_does_only_its_own_work_on_its_own_lanes(gw):
    tokens = lane_tokens(gw)
    client = client_for(gw)
    depth = await journal_depth(gw)
    refused = [
        ("reader1", "/lanes/2/taps", {"source": "magstripe", "raw": GOLD}),      # impersonate lane 2's member
        ("reader1", "/lanes/1/sales", {"idempotency_key": "reader-sale", "lines": basket(100)}),
        ("pos1", "/lanes/2/quote", {"lines": basket(100)}),
        ("pos1", "/lanes/1/taps", {"source": "magstripe", "raw": GOLD}),          # a POS does not read cards
        ("pos1", "/cards/services", {"idempotency_key": "pos-lost-01", "kind": "report_lost", "card_no": GOLD}),
        ("manager", "/lanes/1/sales", {"idempotency_key": "mgr-sale-01", "lines": basket(100)}),
    ]
    for who, path, body in refused:
        res = await client.post(path, headers=auth(tokens[who]), body=body)
        assert res.status_code == 403, (who, path, res.json)
        assert res.json["error"]["code"] == "forbidden" and res.json["error"]["text"]["en"]
    assert await journal_depth(gw) == depth

    ok = await client.post("/lanes/1/taps", headers=auth(tokens["reader1"]), body={"source": "magstripe", "raw": GOLD})
    assert ok.status_code == 200 and ok.json["verdict"] == "accept"
    assert (await client.get("/lanes/1/member", headers=auth(tokens["pos1"]))).status_code == 200
    assert (await client.get("/lanes/1/member", headers=auth(tokens["pos2"]))).status_code == 403
    assert (await client.get("/status", headers=auth(tokens["manager"]))).status_code == 200
    assert (await client.get("/status", headers=auth(tokens["reader1"]))).status_code == 403


async def test_a_pos_returns_only_its_own_lanes_small_sales(gw):
    tokens = lane_tokens(gw)
    client = client_for(gw)
    await tap(gw, GOLD, lane="2")
    sale = await client.post("/lanes/2/sales", headers=auth(tokens["pos2"]),
                             body={"idempotency_key": "lane2-sale-01", "lines": basket(30000)})
    assert sale.status_code == 201, sale.json
    depth = await journal_depth(gw)

    other = await client.post("/returns", headers=auth(tokens["pos1"]),
                              body={"idempotency_key": "steal-ret-01", "sale_seq": sale.json["seq"],
                                    "lines": [{"line": 0, "qty": 1}]})
    assert other.status_code == 403 and other.json["error"]["code"] == "return_other_lane"
    large = await client.post("/returns", headers=auth(tokens["pos2"]),
                              body={"idempotency_key": "large-ret-01", "sale_seq": sale.json["seq"],
                                    "lines": [{"line": 0, "qty": 1}]})
    assert large.status_code == 403 and large.json["error"]["code"] == "return_needs_service_desk"
    assert large.json["error"]["text"]["zh-CN"]
    assert await journal_depth(gw) == depth

    desk = await client.post("/returns", headers=auth(tokens["desk"]),
                             body={"idempotency_key": "desk-ret-01", "sale_seq": sale.json["seq"],
                                    "lines": [{"line": 0, "qty": 1}]})
    assert desk.status_code == 201, desk.json
    assert await journal_depth(gw) == depth + 1


async def test_top_ups_say_how_they_were_paid_and_stay_within_caps(gw):
    tokens = lane_tokens(gw)
    client = client_for(gw)
    await tap(gw, DIAMOND)
    depth = await journal_depth(gw)
    unpaid = await client.post("/lanes/1/topups", headers=auth(tokens["pos1"]), body={"idempotency_key": "unpaid-0001",
                                                                       "amount_fen": 10000})
    assert unpaid.status_code == 400 and "payment" in unpaid.json["error"]["message"]
    huge = await client.post("/lanes/1/topups", headers=auth(tokens["pos1"]), body={"idempotency_key": "huge-00001",
                                                                     "amount_fen": 10_000_000, "payment": CASH})
    assert huge.status_code == 422 and huge.json["error"]["code"] == "topup_over_limit", huge.json
    assert await journal_depth(gw) == depth

    # 5,000 yuan a top-up, 20,000 yuan a terminal a day (the rule set's defaults).
    for i in range(4):
        await tap(gw, DIAMOND)
        ok = await client.post("/lanes/1/topups", headers=auth(tokens["pos1"]), body={
            "idempotency_key": f"topup-cap-{i}", "amount_fen": 500_000, "payment": {"method": "wechat",
                                                                                   "reference": f"wx{i}"}})
        assert ok.status_code == 201, ok.json
    await tap(gw, DIAMOND)
    over = await client.post("/lanes/1/topups", headers=auth(tokens["pos1"]), body={"idempotency_key": "topup-cap-x",
                                                                     "amount_fen": 100, "payment": CASH})
    assert over.status_code == 422 and over.json["error"]["code"] == "topup_terminal_day_limit"
    records = await gw.journal.pending(depth, 10)
    assert [r.body["payment"]["method"] for r in records] == ["wechat"] * 4
    assert {r.body["terminal"] for r in records} == {"pos-1"}


async def test_idempotency_keys_belong_to_their_terminal(gw):
    """One terminal's key neither replays another's answer nor blocks it."""
    tokens = lane_tokens(gw)
    client = client_for(gw)
    body = {"idempotency_key": "same-key-0001", "lines": basket(100), "member": False}
    first = await client.post("/lanes/1/sales", headers=auth(tokens["pos1"]), body=body)
    again = await client.post("/lanes/1/sales", headers=auth(tokens["pos1"]), body=body)
    other = await client.post("/lanes/1/sales", headers=auth(tokens["desk"]), body=body)
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert first.json["seq"] == again.json["seq"] != other.json["seq"]


async def test_a_web_page_cannot_call_the_api(gw):
    """A page in the cashier's browser could POST text/plain or a form to
    the gateway, or reach it through a DNS name it controls (rebinding)."""
    tokens = lane_tokens(gw)
    client = client_for(gw)
    depth = await journal_depth(gw)
    body = json.dumps({"idempotency_key": "web-sale-001", "lines": basket(100), "member": False})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        res = await client.post("/lanes/1/sales", headers={**auth(tokens["pos1"]), "Content-Type": ctype}, body=body)
        assert res.status_code == 415, ctype
    rebound = await client.post("/lanes/1/sales", headers={**auth(tokens["pos1"]), "Host": "evil.example:8080"},
                                body=json.loads(body))
    assert rebound.status_code == 421 and rebound.json["error"]["code"] == "host_not_allowed"
    cross = await client.post("/lanes/1/sales", headers={**auth(tokens["pos1"]), "Origin": "http://evil.example"},
                              body=json.loads(body))
    assert cross.status_code == 403 and cross.json["error"]["code"] == "origin_not_allowed"
    assert await journal_depth(gw) == depth


async def test_an_allowed_browser_pos_gets_cors_headers(tmp_path):
    cfg = config(tmp_path)
    cfg["api"]["cors_origins"] = ["https://pos.example.com"]
    async with Gateway(cfg, clock=lambda: T0) as gw:
        install(gw)
        client = api_client(gw)
        res = await client.get("/lanes/1/member", headers={"Origin": "https://pos.example.com"})
        assert res.status_code == 200
        assert res.headers["Access-Control-Allow-Origin"] == "https://pos.example.com"


async def test_failed_logins_are_rate_limited_and_logged(gw, caplog):
    tokens = lane_tokens(gw)
    client = client_for(gw)
    statuses = [(await client.get("/status", headers=auth(f"manager.{'x' * 43}"))).status_code for _ in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    assert (await client.get("/status", headers=auth(tokens["manager"]))).status_code == 429  # the address waits
    assert "authentication failed from 127.0.0.1" in caplog.text


async def test_a_revoked_terminal_is_refused_without_a_restart(gw):
    tokens = lane_tokens(gw)
    client = client_for(gw)
    assert (await client.get("/lanes", headers=auth(tokens["pos1"]))).status_code == 200
    terminals.revoke(Path(gw.config["store"]["data_dir"]) / "terminals.json", "pos-1")
    client.app.terminals._checked = -1e9  # as if a second had passed
    assert (await client.get("/lanes", headers=auth(tokens["pos1"]))).status_code == 401


async def test_a_gateway_without_credentials_does_not_serve(gw):
    with pytest.raises(TerminalsError, match="storegate terminals add"):
        create_app(gw)


def test_storegate_run_without_credentials_says_how_to_add_one(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[store]\nid = "S001"\ndata_dir = "{tmp_path / "store"}"\n[mqtt]\nhost = "127.0.0.1"\n'
                   f'[[lanes]]\nid = "1"\nreader = "terminal"\n')
    run = subprocess.run([str(BIN / "storegate"), "run", "--config", str(cfg)], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2
    assert "storegate terminals add" in run.stderr and "api.terminals_file" in run.stderr

    add = subprocess.run([str(BIN / "storegate"), "terminals", "add", "pos-1", "--role", "pos", "--lanes", "1",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip().splitlines()[-1]
    assert token.startswith("pos-1.") and token not in (tmp_path / "store" / "terminals.json").read_text()
    assert oct((tmp_path / "store" / "terminals.json").stat().st_mode & 0o777) == "0o600"
    bad_lane = subprocess.run([str(BIN / "storegate"), "terminals", "add", "pos-9", "--role", "pos", "--lanes",
                               "9", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert bad_lane.returncode == 2 and "no lane 9" in bad_lane.stderr
    listed = subprocess.run([str(BIN / "storegate"), "terminals", "list", "--json", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert [t["id"] for t in json.loads(listed.stdout)] == ["pos-1"]


async def test_sse_resumes_after_the_last_event_id(gw):
    """A POS that reconnects with Last-Event-ID gets what it missed, once."""
    lane = gw.lanes["1"]
    for card in (GOLD, DIAMOND, GOLD):
        await tap(gw, card)
    ids = [e.id for e in lane.recent]
    assert len(set(ids)) == 3
    missed = lane.events_after(ids[0])
    assert [e.id for e in missed] == ids[1:]
    assert lane.events_after(ids[-1]) == []
    assert [e.id for e in lane.events_after("0-1")] == ids      # an id of another boot: all kept events
    assert lane.events_after(None) == []                        # a new stream starts now


async def test_a_sale_of_billions_is_refused_by_the_rules_caps(gw):
    """A sale of ~950 billion yuan was committed and credited 1.4 trillion
    points; the rules' sale_limits refuse it, naming the field, and write nothing."""
    from gateway.shell.counter import CounterError

    await tap(gw, GOLD)
    depth = await journal_depth(gw)
    cases = [
        ([{"sku": "A", "name": "gold bar", "category": "household", "qty": 9000, "unit_price": 100_000_000}],
         "line_over_limit", "lines[0]"),
        ([{"sku": f"A{i}", "name": "tv", "category": "household", "qty": 1, "unit_price": 4_000_000}
          for i in range(6)], "sale_over_limit", "lines"),
    ]
    for lines, code, field in cases:
        with pytest.raises(CounterError) as refused:
            await gw.counter.sale("1", {"idempotency_key": f"billions-{code}", "lines": lines})
        assert refused.value.code == code and refused.value.status == 422
        assert str(refused.value).startswith(field) and refused.value.text["zh-CN"]
    assert await journal_depth(gw) == depth


async def test_only_what_the_record_schema_allows_is_journaled(gw):
    """An in-process caller (no API door) with a line name HQ could not
    apply: refused before the fsync, no sequence number used."""
    from gateway.store.journal import RecordRefused

    depth, last = await journal_depth(gw), (await gw.journal.backlog())["last_seq"]
    line = {"sku": "A1", "name": "x" * 5000, "category": "household", "qty": 1, "unit_price": 100}
    with pytest.raises(RecordRefused, match=r"lines\[0\]\.name"):
        await gw.counter.sale("1", {"idempotency_key": "long-name-01", "lines": [line], "member": False})
    assert await journal_depth(gw) == depth
    ok = await gw.counter.sale("1", {"idempotency_key": "short-name-01", "member": False,
                                     "lines": [{**line, "name": "rice"}]})
    assert ok.seq == last + 1
