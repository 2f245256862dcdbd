"""Property: whatever the order in which a store journals records, HQ applies
them (in batches, exactly once) and snapshots reach the store, the store's
view of every member (the snapshot's row plus its own records after the
snapshot's watermark) equals applying all its records in seq order; and at
the end HQ's account of record equals it too.

The real parts on both sides: HQ's AccountStore and snapshot_rows on SQLite
(the same code runs on PostgreSQL in test_accounts.py), the gateway's member
store (InMemoryMembers: the same local_totals contract as the SQLite
MemberStore, tests/test_live_accounts.py). The store spends only what its
view holds, as the counter does, so no balance goes below zero (an overdraft
is reconciliation's business: tests/test_reconcile.py).
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.members import InMemoryMembers
from hq_bridge import db
from hq_bridge.accounts import AccountStore, StoreRecord, audit, import_members, snapshot_rows
from tests.hq_support import sale_body
from tests.test_accounts import return_body, topup_body, tx

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)
DAY = "2026-11-25"
CARDS = {"880000000100": "A0", "880000000200": "A1"}
STORE = "S1"

# A store's next operation, scaled to what its view holds when it happens:
# ("sale", card, share of stored value, share of points, points earned) | ("topup", card, pay, bonus) |
# ("return", nth open sale, numerator of a third)
operation = st.one_of(
    st.tuples(st.just("sale"), st.sampled_from(list(CARDS)), st.integers(0, 4), st.integers(0, 4),
              st.integers(0, 800)),
    st.tuples(st.just("topup"), st.sampled_from(list(CARDS)), st.integers(1, 30_000), st.integers(0, 3_000)),
    st.tuples(st.just("return"), st.integers(0, 30), st.integers(1, 3)),
)
step = st.one_of(st.tuples(st.just("journal"), operation),
                 st.tuples(st.just("hq"), st.integers(1, 6)),          # HQ commits the next k records it has
                 st.tuples(st.just("snapshot"), st.just(0)))


class Store:
    """The store's side: its journal (records in seq order) and its member store."""

    def __init__(self, rows: list[dict], mark: int) -> None:
        self.members = InMemoryMembers(rows, store_seq=mark)
        self.records: list[StoreRecord] = []
        self.sales: list[list] = []            # [body, tx_id, seq, sv returned, points returned, earned returned]
        self.version = 1

    def view(self, card: str) -> tuple[int, int]:
        row = self.members.get(card)
        t = self.members.local_totals(row["member_id"], DAY)
        return row.get("balance_fen", 0) + t["stored_value_fen"], row.get("points", 0) + t["points"]

    def journal(self, o: tuple) -> None:
        seq = len(self.records) + 1
        tx_id = f"{STORE}-{seq:06d}"
        if o[0] == "sale":
            _, card, sv_share, red_share, earned = o
            sv_have, points_have = self.view(card)
            sv, red = sv_have * sv_share // 4, points_have * red_share // 4
            body = sale_body(card, CARDS[card], sv=sv, red=red, earned=earned, key=f"-{seq}")
            self.sales.append([body, tx_id, seq, 0, 0, 0])
        elif o[0] == "topup":
            _, card, pay, bonus = o
            body = {**topup_body(card, pay, bonus), "account_id": CARDS[card], "idempotency_key": f"pos/top-{seq}"}
        else:
            if not self.sales:
                return
            s = self.sales[o[1] % len(self.sales)]
            sale, t = s[0], s[0]["totals"]
            card = sale["member"]["card_no"]
            _sv, points_have = self.view(card)
            sv = (t["stored_value_fen"] - s[3]) * o[2] // 3
            red = (t["points_redeemed"] - s[4]) * o[2] // 3
            # the points the return takes back, at most what the member holds then (no negative points)
            earned = min((t["points_earned"] - s[5]) * o[2] // 3, points_have + red)
            s[3], s[4], s[5] = s[3] + sv, s[4] + red, s[5] + earned
            body = return_body(sale, s[1], s[2], sv=sv, red=red, earned=earned)
        self.records.append(StoreRecord(STORE, seq, tx_id, body["type"], body))
        self.members.record_deltas(seq, body["account_id"], DAY, body["deltas"])


def by_records(start: dict[str, tuple[int, int]], records: list[StoreRecord]) -> dict[str, tuple[int, int]]:
    """Each member's (stored value, points): the start plus every record's effect, in seq order."""
    out = dict(start)
    account_card = {a: c for c, a in CARDS.items()}
    for r in records:
        d, card = r.body["deltas"], account_card[r.body["account_id"]]
        sv, pts = out[card]
        out[card] = (sv + d.get("stored_value_fen", 0), pts + d.get("points", 0))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=40),
       start_sv=st.lists(st.integers(0, 20_000), min_size=2, max_size=2),
       start_points=st.lists(st.integers(0, 3_000), min_size=2, max_size=2))
def test_any_interleaving_of_records_batches_and_snapshots_gives_the_records_in_seq_order(steps, start_sv,
                                                                                          start_points):
    with tempfile.TemporaryDirectory() as tmp:
        engine = db.open_engine(f"sqlite:///{Path(tmp) / 'hq.db'}")
        db.metadata.create_all(engine)
        hq = AccountStore(engine, clock=NOW.timestamp)
        rows = [{"card_no": c, "member_id": a, "tier": "normal", "balance_fen": sv, "points": p}
                for (c, a), sv, p in zip(CARDS.items(), start_sv, start_points)]
        with engine.begin() as conn:
            import_members(conn, rows, clock=NOW.timestamp)
            snap = snapshot_rows(conn, STORE)
            store = Store(list(snap), snap.watermark)
        start = {c: (sv, p) for c, sv, p in zip(CARDS, start_sv, start_points)}
        committed = 0

        def hq_commits(k: int) -> None:
            nonlocal committed
            batch = store.records[committed:committed + k]
            if not batch:
                return
            with engine.begin() as conn:
                ins = db.ledger_insert(conn, STORE, [tx(r.seq, r.body, r.tx_id) for r in batch])
                res = hq.apply_batch(conn, STORE, ins.new)
            assert res.set_aside == [] and res.applied == [r.seq for r in batch]
            committed += len(batch)

        for kind, arg in steps:
            if kind == "journal":
                store.journal(arg)
            elif kind == "hq":
                hq_commits(arg)
            else:
                with engine.begin() as conn:
                    snap = snapshot_rows(conn, STORE)
                    store.version += 1
                    store.members.replace_snapshot(list(snap), [], version=store.version, as_of=0,
                                                   store_seq=snap.watermark)
            want = by_records(start, store.records)
            assert {c: store.view(c) for c in CARDS} == want, (kind, arg)

        hq_commits(len(store.records))
        want = by_records(start, store.records)
        with engine.begin() as conn:
            accounts = hq.load_accounts(conn, CARDS.values())
            assert audit(conn) == []
            assert conn.execute(sa.select(sa.func.count()).select_from(db.transactions)).scalar() == len(store.records)
        assert {c: (accounts[a].stored_value_fen, accounts[a].points) for c, a in CARDS.items()} == want
        engine.dispose()
