"""Schemathesis against a running gateway, from the OpenAPI document it serves.

For every operation of the POS API (but the endless event stream), valid
bodies (positive) and bodies that break the schema (negative) are sent as a
terminal of the role that would send them. Checked for each answer:

- no 5xx, the status is one the document lists, the body follows its schema;
- a body that breaks the schema is refused (4xx);
- a refused request changes nothing: the journal's last sequence number
  and sales count (GET /status) and the counter archive (counter.db) are as
  they were.

Also: the gateway serves exactly ``api_schema.openapi_document()``, and the
holes of the "Safe by default" issue (huge integers, deep nesting, lone
surrogates, NUL and bidi overrides, full-width card digits, a ~950-billion-
yuan sale, a top-up without its payment) are each refused with a 400 that
writes nothing.

Bounded: about FUZZ_SECONDS for the fuzzing, at most MAX_EXAMPLES per
operation and mode, derandomized (the same examples every run). Needs
schemathesis (skipped without it) and mosquitto, like the other tests that
run the gateway as a process.
"""

from __future__ import annotations

import copy
import hashlib
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from gateway.shell import api_schema

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed: add \"schemathesis>=4.3,<5\" to the test extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests import support  # noqa: E402
from tests.support import GOLD_UID, HQ, GatewayProc, wait_until  # noqa: E402

FUZZ_SECONDS = 45.0   # for all operations and modes together; start-up comes on top (~5 s)
MAX_EXAMPLES = 30
MIN_CALLS = 3     # made even past the budget: an operation is never left untested
LANE = "1"
# The event stream never ends and the document is not a request: not fuzzed.
SKIPPED = {"events", "openapi"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@dataclass
class Target:
    """What the fuzzing needs of a gateway, whichever way it runs."""

    base_url: str
    headers_for: Callable[[str, str], dict]   # (method, path) -> headers with the terminal's credential
    snapshot: Callable[[], tuple]              # what a refused request must leave as it was
    tap_member: Callable[[], None]             # put a member on LANE, so member operations get far


def auth_provider(gw: GatewayProc) -> Callable[[str, str], dict]:
    """Headers for a call as a terminal of the role that would make it:
    ``tests.support.auth_headers(role=...)`` where there is one, else the
    tokens GatewayProc provisioned. Skips when neither is there."""
    from demo.testbed import role_for

    helper = getattr(support, "auth_headers", None)
    if helper is not None:
        return lambda method, path: helper(role=role_for(method, path))
    tokens = getattr(gw, "tokens", None)
    if not tokens:
        pytest.skip("no terminal credentials for the test gateway yet: tests.support.auth_headers(role=...) "
                    "or GatewayProc.tokens is needed")
    return lambda method, path: {"Authorization": f"Bearer {tokens[role_for(method, path)]}"}


def archive_digest(db_path: Path) -> str:
    """Everything the counter archive holds, as one digest."""
    if not db_path.exists():
        return "absent"
    digest = hashlib.sha256()
    conn = sqlite3.connect(db_path, timeout=5)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for table in tables:
            digest.update(table.encode())
            for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY 1'):
                digest.update(repr(row).encode())
    finally:
        conn.close()
    return digest.hexdigest()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from demo.testbed import MosquittoBroker

    tmp = tmp_path_factory.mktemp("fuzz")
    broker = MosquittoBroker(tmp / "broker").start()
    hq = HQ(tmp, broker.port).start()
    gw = None
    try:
        assert hq.publish_rules().returncode == 0
        gw = GatewayProc(tmp, broker.port).start()
        headers_for = auth_provider(gw)
        wait_until(lambda: gw.status()["rules_version"] == 1, what="rules applied")

        def snapshot() -> tuple:
            status = gw.status()
            return status["last_seq"], status["stats"]["sales"], archive_digest(gw.data_dir / "counter.db")

        def tap_member() -> None:
            gw.call("POST", f"/lanes/{LANE}/taps", {"source": "nfc", "raw": GOLD_UID})

        yield Target(f"http://127.0.0.1:{gw.api_port}", headers_for, snapshot, tap_member)
    finally:
        if gw is not None:
            gw.stop()
        hq.stop()
        broker.stop()


def served_document(target: Target) -> dict | None:
    """The OpenAPI document the gateway serves (None while it serves none)."""
    import requests

    resp = requests.get(f"{target.base_url}/openapi.json", timeout=10)
    return resp.json() if resp.status_code == 200 else None


@pytest.fixture(scope="module")
def api(target):
    """The served document with its security left out: the test sends each
    call with a valid credential itself. (Schemathesis would otherwise send
    broken credentials too, and the gateway rightly locks the address out
    after ten of them; wrong credentials are tests/test_terminals.py's.)"""
    document = copy.deepcopy(served_document(target) or api_schema.openapi_document())
    document.pop("security", None)
    document["components"].pop("securitySchemes", None)
    for operations in document["paths"].values():
        for operation in operations.values():
            operation.pop("security", None)
    return schemathesis.openapi.from_dict(document)


def test_the_gateway_serves_the_generated_document(target):
    served = served_document(target)
    if served is None:
        pytest.skip("GET /openapi.json is not served yet (gateway/shell/api.py: return api_schema.openapi_document())")
    assert served == api_schema.openapi_document()


KEY = b'"idempotency_key": "fuzz-0001-abcd"'
LINE = b'{"sku": "A1", "qty": %s, "unit_price": %s%s}'
ISSUE_ATTACKS = [  # the holes of "Safe by default": each got a 500, or was journaled
    ("/lanes/1/sales", b'{%s, "member": false, "lines": [%s]}' % (KEY, LINE % (b"%d" % 2**70, b"1", b""))),
    ("/lanes/1/sales", b'{%s, "member": false, "lines": [%s]}' % (KEY, LINE % (b"1", b"9" * 5000, b""))),
    ("/lanes/1/sales", b'{%s, "member": false, "lines": [%s]}' % (KEY, LINE % (b"1", b"1", b', "name": "\\ud800"'))),
    ("/lanes/1/sales", b'{%s, "member": false, "lines": [%s]}' % (KEY, LINE % (b"1", b"1", b', "name": "a\\u0000"'))),
    ("/lanes/1/sales", b'{%s, "member": false, "lines": [%s]}' % (KEY, LINE % (b"1", b"1", b', "name": "\\u202e"'))),
    ("/lanes/1/sales", b'{%s, "member": false, "lines": [%s]}' % (KEY, LINE % (b"9999", b"95000000", b""))),
    ("/lanes/1/quote", b'{"lines": [%s], "tender": %s}' % (LINE % (b"1", b"1", b""), b"[" * 2000 + b"]" * 2000)),
    ("/returns", b'{%s, "sale_seq": %d, "lines": [{"line": 0, "qty": 1}]}' % (KEY, 2**63)),
    ("/cards/services", b'{%s, "kind": "freeze", "card_no": "880000000013", "reason": %s}'
     % (KEY, b"[" * 253 + b"]" * 253)),
    ("/cards/services", b'{%s, "kind": "freeze", "card_no": "880000000013", "reason": {"a": 1}}' % KEY),
    ("/cards/services", ('{"idempotency_key": "fuzz-0001-abcd", "kind": "issue", "card_no": "８８０００００００１２３"}'
                         .encode())),
    ("/cards/services", ('{"idempotency_key": "fuzz-0001-abcd", "kind": "issue", "card_no": "٨٨٠٠٠٠٠٠٠١٢٣"}'
                         .encode())),
    ("/lanes/1/topups", b'{%s, "amount_fen": 100}' % KEY),
]


@pytest.mark.parametrize("path,raw", ISSUE_ATTACKS, ids=[f"{i}-{p}" for i, (p, _) in enumerate(ISSUE_ATTACKS)])
def test_the_issue_attacks_are_refused_at_the_door(target, path, raw):
    import requests

    raw = raw.replace(b"fuzz-0001-abcd", f"fuzz-{uuid.uuid4().hex[:12]}".encode())  # one key per attack
    before = target.snapshot()
    resp = requests.post(target.base_url + path, data=raw, timeout=10,
                         headers={**target.headers_for("POST", path), "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["error"]["text"]["zh-CN"]
    assert target.snapshot() == before


CASES = [(name, mode) for name in api_schema.ENDPOINTS if name not in SKIPPED
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         # Negative: bodies that break the schema. A GET has no body, and its lane is fixed.
         if mode is GenerationMode.POSITIVE or api_schema.ENDPOINTS[name][3]]


def _integral(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def _number(qty) -> float:
    return float(qty) if isinstance(qty, str) else qty


def as_the_api_means_it(case):
    """Positive examples that parse_body takes. JSON Schema counts 1.0 as an
    integer; this API does not (money is whole fen, written as such), so
    whole numbers go as integers. And a basket's qty x unit_price, which no
    schema keyword can sum, is scaled under the cap on one sale."""
    if not isinstance(case.body, (dict, list)):
        return case
    body = case.body = _integral(case.body)
    lines = body.get("lines") if isinstance(body, dict) else None
    if isinstance(lines, list) and all(isinstance(l, dict) and "unit_price" in l for l in lines):
        # a measured line's qty is a decimal string ("0.532" kg) and its unit_price per unit
        total = sum(_number(l.get("qty", 1)) * l["unit_price"] for l in lines)   # a price label: one
        if total > api_schema.MAX_SALE_FEN:
            for line in lines:
                line["unit_price"] = int(line["unit_price"] * api_schema.MAX_SALE_FEN // total)
    return case


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_fuzz(target, api, name, mode):
    method, path = api_schema.ENDPOINTS[name][:2]
    operation = api[path][method.upper()]
    fixed = {"lane": LANE} if "{lane}" in path else {}
    budget = FUZZ_SECONDS / len(CASES)
    headers = target.headers_for(method.upper(), path.replace("{lane}", LANE))
    target.tap_member()
    seen: dict[int, int] = {}
    stop_at = time.monotonic() + budget

    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed or None)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(as_the_api_means_it)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        if time.monotonic() > stop_at and sum(seen.values()) >= MIN_CALLS:
            return  # the budget is spent: the remaining examples are no-ops (a loaded machine still makes a few)
        before = target.snapshot()
        response = case.call(base_url=target.base_url, headers=headers, timeout=10)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)  # negative_data_rejection: a broken body gets a 4xx
        if response.status_code >= 400:
            assert target.snapshot() == before, f"refused with {response.status_code} but something was " \
                f"written: {case.method} {case.formatted_path} {response.text[:300]}"
        if name == "sales" and response.status_code in (200, 201):
            target.tap_member()  # a sale ends the member's visit: the next example has one again

    run()
    print(f"\n{name} {mode.value}: statuses {dict(sorted(seen.items()))}")
    assert seen, f"no request was made for {name} ({mode.value})"
