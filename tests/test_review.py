"""``storegate-hq review``: records the accounts set aside, unsendable
placeholders and card services to review are listed until a person resolves
them; nothing is dropped. Both engines; the real CLI on SQLite."""

from __future__ import annotations


import orjson
import pytest

from hq_bridge.accounts import AccountStore, import_members
from hq_bridge.ledger import Ledger
from hq_bridge.review import ReviewError, queues, resolve
from tests.hq_support import topup_body
from tests.pg import hq_db_url, pg_server  # noqa: F401  (fixtures)
from tests.support import HQ
from wire.messages import TxBatch, TxRecord

MEMBER = {"card_no": "880000000017", "member_id": "M1", "tier": "normal", "balance_fen": 1000}


def rec(seq: int, body: dict, type_: str | None = None) -> TxRecord:
    return TxRecord(seq, f"tx-{seq:08d}", type_ or body["type"], 0, body)


def troubles(ledger: Ledger) -> None:
    """Store S001: a top-up for a card HQ does not know (set aside), a
    placeholder for a record it could not send, a counter unfreeze (to
    review), and a good top-up."""
    with ledger.engine.begin() as conn:
        import_members(conn, [MEMBER])
    ledger.commit(TxBatch("S001", [
        rec(1, topup_body("880000009999", None, 5000, key="a")),
        rec(2, {"type": "sale", "error": "nested too deep"}, "unsendable"),
        rec(3, topup_body("880000000017", "M1", 2000, key="b"))]))
    ledger.record_card_service("S001", 4, "tx-00000004", "unfreeze", "880000000017", None,
                               "recorded: lift the freeze at HQ if approved", True)


def test_the_queues_keep_what_needs_a_person_until_it_is_resolved(hq_db_url):
    ledger = Ledger(hq_db_url)
    try:
        troubles(ledger)
        with ledger.engine.connect() as conn:
            q = queues(conn)
            assert AccountStore(ledger.engine).account_of_card(conn, "880000000017").stored_value_fen == 3000
        assert [(a.seq, a.error.split(":")[0]) for a in q.set_aside] == [(1, "unknown_card")]
        assert [(u.seq, u.original_type) for u in q.unsendable] == [(2, "sale")]
        assert [(c.seq, c.op) for c in q.card_services] == [(4, "unfreeze")]
        with ledger.engine.begin() as conn:
            done = resolve(conn, "S001", 1, user="alice", clock=lambda: 1_800_000_000)
            assert done.resolved_at == 1_800_000_000_000
            with pytest.raises(ReviewError, match="resolved already"):
                resolve(conn, "S001", 1, user="alice")
            with pytest.raises(ReviewError, match="no record set aside"):
                resolve(conn, "S001", 3, user="alice")
        with ledger.engine.connect() as conn:
            assert queues(conn).set_aside == []
            assert [a.seq for a in queues(conn, include_resolved=True).set_aside] == [1]
            assert len(queues(conn, store="S002")) == 0
    finally:
        ledger.close()


def test_review_on_the_command_line(tmp_path):
    hq = HQ(tmp_path, 1)            # no broker needed: review only reads and marks HQ's database
    ledger = Ledger(hq.url)
    troubles(ledger)
    ledger.close()
    out = hq.cli("review")
    assert out.returncode == 0, out.stderr
    assert "set aside (1)" in out.stdout and "unknown_card" in out.stdout and "card services to review (1)" in out.stdout
    got = orjson.loads(hq.cli("review", "--json").stdout)
    assert [a["seq"] for a in got["set_aside"]] == [1] and [u["seq"] for u in got["unsendable"]] == [2]
    assert hq.cli("review", "resolve", "S001", "1").returncode == 0
    assert orjson.loads(hq.cli("review", "--json").stdout)["set_aside"] == []
    bad = hq.cli("review", "resolve", "S001")
    assert bad.returncode == 2 and "STORE SEQ" in bad.stderr
