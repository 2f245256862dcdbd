"""Issue 12 end to end on real parts: two stores (S001, S002), each a real
gateway process reaching a real mosquitto through its own TCP proxy (so its
link can be cut), one real HQ bridge process on SQLite or PostgreSQL.

The test keeps its own receipts, as a cashier would: what every API answer
said (stored value paid, points earned and redeemed, refunds, top-ups), and
checks against them, exactly (fen and points):

- HQ's account of every member (``storegate-hq members show CARD --json``)
  is the imported start plus the sum of the receipts' effects;
- each store's view of a member (a tap, and ``GET /lanes/1/member``) is HQ's
  account plus that store's own records HQ has not applied yet. Online the
  view is HQ's live answer (``source: live``); offline it is the store's
  snapshot plus its own records after the snapshot's watermark, so what other
  stores did since that snapshot was built is not in it (the model below
  counts that as ``foreign``: zero whenever no other store touched the member).

Between the operations HQ publishes a changed promotion (to both stores),
reports cards lost while a store is away (the store comes back to the latest
deny delta only, sees the gap and asks for a resync: its rule set is built
anew) and rotates its signing key while the other store is away: none of them
hands money back, and a store's records HQ acked after a snapshot's watermark
still count on that snapshot.

Reconciliation (``overdraft_policy = "block"``): both stores, offline, spend
the same stored value; HQ reports the exact overdraft (``storegate-hq
reconcile --json``), blocks the card at both stores with a signed deny delta
(``blocked``: identified, nothing to spend, kept through a republish), and
lifts it at both once the balance is settled (here by returns; a top-up at the
counter settles too: test_a_card_blocked_for_an_overdraft_can_be_topped_up_to_settle),
offline too.

A cut link goes dark (tests/support.py DarkProxyThread): the store notices at
once, its reconnect attempts wait instead of being refused, so it is back as
soon as the link is. Bugs found on the way that are not fixed here are the
strict xfails at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.pg import pg_server  # noqa: F401  (fixture)
from tests.support import (BIN, HQ, RULES_FILE, DarkProxyThread, GatewayProc, hq_public_key, ledger_by_id,
                           wait_until)

GOLD, SILVER, NORMAL, RECON = "880000000013", "880000000021", "880000000062", "880000000070"
MEMBERS = [
    {"card_no": GOLD, "member_id": "M1001", "name": "王*", "tier": "gold", "expires": "2099-12-31",
     "points": 5230, "balance_fen": 20000},
    {"card_no": SILVER, "member_id": "M1002", "name": "李*", "tier": "silver", "points": 880},
    {"card_no": NORMAL, "member_id": "M2001", "name": "周*", "tier": "normal", "points": 12000, "balance_fen": 60000},
    {"card_no": RECON, "member_id": "M2002", "name": "吴*", "tier": "normal", "balance_fen": 30000},
]
START = {m["card_no"]: (m.get("balance_fen", 0), m.get("points", 0)) for m in MEMBERS}

CHAIN = """
[reconciliation]
overdraft_policy = "block"

[stored_value.topup_packages.p300]
pay_fen = 30000
bonus_fen = 3000
name = { "zh-CN" = "充300送30", en = "Top up 300, get 30" }
"""
PROMOTION = """
[promotions.rice_week]
name = { "zh-CN" = "大米周满100减10", en = "Rice week: spend 100 save 10" }
kind = "threshold"
steps = [ { min_fen = 10000, off_fen = 1000 } ]
priority = 50
"""

RICE = {"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "unit_price": 5000}
OIL = {"sku": "6902222222229", "name": "花生油 5L", "category": "grocery", "unit_price": 8990}
TEA = {"sku": "6903333333336", "name": "绿茶", "category": "drinks", "unit_price": 3800}
CASH = {"method": "cash"}


def lines(*items) -> list[dict]:
    return [{**item, "qty": qty} for item, qty in items]


def add(into: dict, card: str, effect: tuple[int, int]) -> None:
    sv, pts = into.get(card, (0, 0))
    into[card] = (sv + effect[0], pts + effect[1])


class Store:
    """A gateway process behind its own link to the broker, and what the
    model knows of it: its records HQ has not applied (``unacked``, while its
    link is cut) and what other stores did since its running snapshot was
    built (``foreign``)."""

    def __init__(self, tmp, broker_port: int, store: str, key: str) -> None:
        self.id = store
        self.proxy = DarkProxyThread(broker_port)
        home = tmp / store
        home.mkdir()
        # A generous wait for HQ's live answer: this checks what a tap is told, not how fast (a
        # loaded test machine must not turn a live answer into the snapshot's).
        self.gw = GatewayProc(home, self.proxy.port, store=store, lanes=("1",), uplink={"live_lookup_ms": 2000},
                              extra=f'[rules]\nhq_public_keys = ["{key}"]\n')
        self.cut = False
        self.unacked: dict[str, tuple[int, int]] = {}
        self.foreign: dict[str, tuple[int, int]] = {}
        self.awaiting = 0          # a rule-set version published to it while its link was cut
        self.told: dict[str, int] = {}   # tx id -> seq of every record the POS was told is committed
        self.n = 0

    def key(self, what: str) -> str:
        self.n += 1
        return f"{self.id}-{what}-{self.n:06d}"

    def call(self, method: str, path: str, body=None, **kw):
        return self.gw.call(method, path, body, **kw)

    def status(self) -> dict:
        return self.gw.status()

    def tap(self, card: str) -> dict:
        """The member as the tap and the lane's member endpoint show it."""
        status, verdict = self.call("POST", "/lanes/1/taps", {"source": "magstripe", "raw": card})
        assert status == 200 and verdict["verdict"] == "accept", (self.id, verdict)
        status, lane = self.call("GET", "/lanes/1/member")
        assert status == 200 and lane["member"]["member"] == verdict["member"], (self.id, lane)
        member = verdict["member"]
        assert member["source"] == ("snapshot" if self.cut else "live"), (self.id, member)
        return member

    def verdict(self, card: str) -> dict:
        status, verdict = self.call("POST", "/lanes/1/taps", {"source": "magstripe", "raw": card})
        assert status == 200, verdict
        return verdict

    def committed(self, answer: dict) -> None:
        self.told[answer["tx_id"]] = answer["seq"]

    def go_offline(self) -> None:
        self.proxy.cut()
        self.cut = True
        wait_until(lambda: self.status()["uplink"] == "offline", timeout=20, what=f"{self.id} offline")

    def go_online(self) -> None:
        self.proxy.restore()
        wait_until(lambda: self.status()["uplink"] == "online", timeout=60, what=f"{self.id} back online")
        self.drained()
        if self.awaiting:
            wait_until(lambda: self.status()["rules_version"] >= self.awaiting, timeout=30,
                       what=f"{self.id} applying rules v{self.awaiting} after the outage")
            self.awaiting = 0
        self.cut = False
        self.unacked = {}

    def drained(self) -> None:
        """Every record HQ's ack has freed: HQ committed and applied them."""
        wait_until(lambda: self.gw.journal_seqs() == [], timeout=40, what=f"HQ's acks at {self.id}")

    def stop(self) -> None:
        self.gw.stop()
        self.proxy.close()


class Chain:
    """HQ, two stores, and the receipts."""

    def __init__(self, tmp, broker, database: str | None) -> None:
        self.tmp, self.broker = tmp, broker
        self.hq = HQ(tmp, broker.port, stores={"S001": None, "S002": None}, database=database)
        self.stores: dict[str, Store] = {}
        self.receipts: dict[str, tuple[int, int]] = dict(START)
        self._engine = None

    def start(self) -> None:
        """HQ with the members imported and the chain's rules published, and
        both stores online with them, answered live by HQ."""
        self.hq.start()
        members_file = self.tmp / "members.jsonl"
        members_file.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in MEMBERS), encoding="utf-8")
        self.publish("rules-v1.toml", CHAIN, "--members", str(members_file))
        key = hq_public_key(self.tmp)
        for s in ("S001", "S002"):
            self.stores[s] = Store(self.tmp, self.broker.port, s, key)
            self.stores[s].gw.start()
        for st in self.stores.values():
            wait_until(lambda: st.status()["rules_version"] == 1 and st.status()["uplink"] == "online",
                       timeout=30, what=f"{st.id} online with rules v1")
            wait_until(lambda: (st.verdict(GOLD)["member"] or {}).get("source") == "live", timeout=30,
                       what=f"HQ answering {st.id}'s look-ups")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        for st in self.stores.values():
            st.stop()
        self.hq.stop()

    # -- what HQ publishes ----------------------------------------------------

    def published(self, out: subprocess.CompletedProcess) -> None:
        assert out.returncode == 0, out.stderr
        self.snapshots(re.findall(r"published rules v(\d+) to store (\S+)", out.stdout))

    def snapshots(self, sent: list[tuple[str, str]]) -> None:
        """(version, store) of new member parts HQ built: a store's snapshot
        then holds everything HQ has applied, which is everything but the
        records of stores whose link is cut."""
        for version, store in sent:
            st = self.stores.get(store)
            if st is None:
                continue
            st.foreign = {}
            for other in self.stores.values():
                if other is not st:
                    for card, e in other.unacked.items():
                        add(st.foreign, card, e)
            if st.cut:
                st.awaiting = int(version)
            else:
                wait_until(lambda: st.status()["rules_version"] >= int(version), timeout=30,
                           what=f"rules v{version} at {store}")

    def publish(self, name: str, extra: str, *args: str) -> None:
        for st in self.stores.values():
            if not st.cut:
                st.drained()
        path = self.tmp / name
        path.write_text(RULES_FILE.read_text(encoding="utf-8") + extra, encoding="utf-8")
        self.published(self.hq.cli("rules", "publish", str(path), "--all", *args))

    def rotate_keys(self) -> None:
        for st in self.stores.values():
            if not st.cut:
                st.drained()
        self.published(self.hq.cli("keys", "rotate"))

    def deny(self, card: str) -> int:
        """HQ reports a card lost: a signed deny delta to every store, now."""
        out = self.hq.cli("card", "deny", card, "--reason", "reported by phone")
        assert out.returncode == 0, out.stderr
        version = int(re.search(r"deny delta v(\d+)", out.stdout).group(1))
        for st in self.stores.values():
            if not st.cut:
                wait_until(lambda: st.status()["deny_version"] == version, timeout=20,
                           what=f"deny delta v{version} at {st.id}")
        return version

    def reconnect_after_a_gap(self, st: Store, deny_version: int) -> None:
        """The store comes back to the latest deny delta only (retained), sees
        the versions it missed and asks HQ for a resync: HQ builds its rule set
        anew, member parts from the accounts included."""
        before = st.status()["rules_version"]
        st.go_online()
        wait_until(lambda: st.status()["deny_version"] == deny_version and st.status()["rules_version"] > before,
                   timeout=30, what=f"the resync of {st.id}")
        self.snapshots([(st.status()["rules_version"], st.id)])

    # -- counter operations, with their receipts ------------------------------

    def effect(self, st: Store, card: str, e: tuple[int, int], live: bool = True) -> None:
        add(self.receipts, card, e)
        if st.cut:
            add(st.unacked, card, e)
        for other in self.stores.values():
            if other is not st:
                add(other.foreign, card, e)
        if live and not st.cut:
            self.live_at_once(st, card)

    def live_at_once(self, st: Store, card: str) -> None:
        """A tap right after an online operation, whether or not HQ has
        applied its record yet (the answer's watermark says which): the
        member's receipts, less what stores whose link is cut still hold."""
        for other in self.stores.values():
            if other is not st and not other.cut:
                other.drained()
        want = self.receipts[card]
        for other in self.stores.values():
            if other.cut:
                held = other.unacked.get(card, (0, 0))
                want = (want[0] - held[0], want[1] - held[1])
        m = st.tap(card)
        assert (m["balance_fen"], m["points"]) == want, (st.id, card, want)

    def sell(self, st: Store, card: str, basket: list[dict], *, sv: int = 0, points: int = 0) -> dict:
        member = st.tap(card)
        body = {"idempotency_key": st.key("sale"), "lines": basket}
        if sv or points:
            body["tender"] = {"stored_value_fen": sv, "points": points}
        status, quote = st.call("POST", "/lanes/1/quote", body)
        assert status == 200, quote
        status, sale = st.call("POST", "/lanes/1/sales", {**body, "expected_total": quote["total"]})
        assert status == 201, sale
        assert (sale["tender"]["stored_value_fen"], sale["tender"]["points"]) == (sv, points)
        earned = sale["points_earned"]
        # The receipt's balances: the view the sale was decided on, less what it paid, plus what it earned.
        assert sale["balances_after"] == {"points": member["points"] - points + earned,
                                          "stored_value_fen": member["balance_fen"] - sv}
        sale["card"] = card
        st.committed(sale)
        self.effect(st, card, (-sv, earned - points))
        return sale

    def give_back(self, st: Store, sale: dict, returned: list[dict], live: bool = True) -> dict:
        """A return at the service desk (no tap: by the receipt's sale number)."""
        body = {"idempotency_key": st.key("return"), "sale_seq": sale["seq"], "lines": returned}
        status, ret = st.call("POST", "/returns", body, role="service_desk")
        assert status == 201, ret
        t = ret["totals"]
        st.committed(ret)
        self.effect(st, sale["card"], (t["stored_value_fen"], t["points_redeemed"] - t["points_earned"]), live)
        return ret

    def top_up(self, st: Store, card: str, amount: int) -> dict:
        member = st.tap(card)
        status, top = st.call("POST", "/lanes/1/topups", {"idempotency_key": st.key("topup"), "amount_fen": amount,
                                                           "payment": CASH})
        assert status == 201, top
        rec = top["record"]
        assert rec["pay_fen"] == amount and rec["balance_after_fen"] == member["balance_fen"] + rec["credit_fen"]
        st.committed(top)
        self.effect(st, card, (rec["credit_fen"], 0))
        return top

    # -- checks -----------------------------------------------------------------

    def hq_accounts(self, cards=None) -> dict[str, dict]:
        """``storegate-hq members show CARD --json`` of each card (run side by side)."""
        cards = list(cards or self.receipts)
        procs = {c: subprocess.Popen([str(BIN / "storegate-hq"), "members", "show", c, "--json", "--config",
                                      str(self.hq.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in cards}
        out = {}
        for c, p in procs.items():
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr
            out[c] = json.loads(stdout)
        return out

    def hq_view(self, card: str) -> dict:
        """What ``members show CARD --json`` shows, read in-process with the
        command's own function: while an overdraft is open the command itself
        fails (test_members_show_json_with_an_open_overdraft below)."""
        from hq_bridge import db
        from hq_bridge.members import account_view

        if self._engine is None:
            self._engine = db.open_engine(self.hq.url)
        with self._engine.begin() as conn:
            return json.loads(json.dumps(account_view(conn, card), default=str))

    def hq_balances(self, cli: bool, cards=None) -> dict[str, tuple[int, int]]:
        cards = list(cards or self.receipts)
        got = self.hq_accounts(cards) if cli else {c: self.hq_view(c) for c in cards}
        return {c: (a["stored_value_fen"], a["points"]) for c, a in got.items()}

    def settled(self, cli: bool = False, cards=None) -> dict[str, tuple[int, int]]:
        """Every online store's records are at HQ: HQ's accounts are the
        receipts (``cli``: as ``storegate-hq members show`` prints them;
        otherwise read with its function, quicker while a link is cut)."""
        for st in self.stores.values():
            if not st.cut:
                st.drained()
        hq = self.hq_balances(cli, cards)
        pending = {}
        for st in self.stores.values():
            for card, e in st.unacked.items():
                add(pending, card, e)
        want = {c: (sv - pending.get(c, (0, 0))[0], pts - pending.get(c, (0, 0))[1])
                for c, (sv, pts) in self.receipts.items() if c in hq}
        assert hq == want, "HQ's accounts are not what the receipts say"
        return hq

    def views(self, st: Store, hq: dict[str, tuple[int, int]], cards=None) -> None:
        """The store's view of each member: HQ's account + its own records HQ
        has not applied - (offline) what other stores did since its snapshot."""
        assert not st.awaiting, f"{st.id} still runs the rules from before its outage"
        for card in cards or (GOLD, SILVER, NORMAL):
            m = st.tap(card)
            own, foreign = st.unacked.get(card, (0, 0)), (st.foreign.get(card, (0, 0)) if st.cut else (0, 0))
            want = (hq[card][0] + own[0] - foreign[0], hq[card][1] + own[1] - foreign[1])
            assert (m["balance_fen"], m["points"]) == want, (st.id, card, m["source"], hq[card], own, foreign)

    def exactly_once(self) -> None:
        for st in self.stores.values():
            counts = ledger_by_id(self.hq, st.id)
            assert counts == {tx: 1 for tx in st.told}, f"{st.id}: HQ's ledger is not what its POS was told"


@pytest.fixture(params=["sqlite", "postgresql"])
def chain(request, tmp_path, broker):
    database = request.getfixturevalue("pg_server").create_database() if request.param == "postgresql" else None
    c = Chain(tmp_path, broker, database)
    try:
        c.start()
        yield c
    finally:
        c.close()


def reconcile(chain: Chain) -> dict:
    out = chain.hq.cli("reconcile", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_two_stores_online_and_offline_keep_every_account_to_the_receipt(chain):
    a, b = chain.stores["S001"], chain.stores["S002"]

    # -- both online: a top-up in one store is spendable in the other a moment later
    top = chain.top_up(a, GOLD, 30000)
    assert (top["record"]["bonus_fen"], top["record"]["credit_fen"]) == (3000, 33000)   # 充300送30
    a.drained()
    assert b.tap(GOLD)["balance_fen"] == 20000 + 33000            # live, HQ's account
    b1 = chain.sell(b, GOLD, lines((RICE, 4), (OIL, 1)), sv=15000, points=1000)
    a2 = chain.sell(a, NORMAL, lines((OIL, 2), (TEA, 3)), points=2000)
    b2 = chain.sell(b, SILVER, lines((RICE, 2)))
    hq = chain.settled()
    chain.views(a, hq)
    chain.views(b, hq)

    # -- a changed promotion is published to every store; then S001 loses its link
    chain.publish("rules-v2.toml", CHAIN + PROMOTION)
    a.go_offline()
    chain.views(a, hq)                                            # the new snapshot: HQ's accounts exactly
    a3 = chain.sell(a, GOLD, lines((RICE, 3), (TEA, 2)), sv=10000, points=500)
    assert a3["discount"] > 0                                     # priced with the new promotion
    chain.give_back(a, a2, [{"line": 0, "qty": 1}])               # part of an online sale, returned offline
    hq = chain.settled()                                          # HQ has none of S001's offline records
    chain.views(a, hq)                                            # = HQ + S001's unacked records

    # S002, online meanwhile: a top-up, a stored-value sale, and the whole of an earlier sale returned
    chain.top_up(b, SILVER, 10000)
    b4 = chain.sell(b, SILVER, lines((TEA, 2)), sv=5000)
    whole = chain.give_back(b, b1, [{"line": 0, "qty": 4}, {"line": 1, "qty": 1}])
    assert (whole["totals"]["stored_value_fen"], whole["totals"]["points_redeemed"],
            whole["totals"]["points_earned"]) == (15000, 1000, b1["points_earned"])
    # HQ reports two cards lost while S001 is away: S001 comes back to the latest deny delta only,
    # asks for a resync and gets its rule set built anew
    lost = [chain.deny("880000000096"), chain.deny("880000000104")][-1]
    hq = chain.settled()
    chain.views(b, hq)                                            # live: HQ's accounts
    chain.views(a, hq)                                            # offline: its snapshot + its own records
    chain.reconnect_after_a_gap(a, lost)
    assert a.verdict("880000000096")["reason"] == "lost"
    hq = chain.settled()
    chain.views(a, hq)
    chain.views(b, hq)

    # -- S002 loses its link; HQ rotates its key while it is away
    b.go_offline()
    chain.sell(b, GOLD, lines((OIL, 2)), sv=8000, points=1000)
    chain.give_back(b, b2, [{"line": 0, "qty": 1}])
    chain.give_back(b, b4, [{"line": 0, "qty": 2}])
    chain.top_up(a, NORMAL, 20000)
    chain.sell(a, NORMAL, lines((RICE, 6)), sv=20000, points=3000)
    hq = chain.settled()
    chain.views(b, hq)
    chain.views(a, hq)
    chain.rotate_keys()
    b.go_online()                                                 # the rotated rules come with the link
    hq = chain.settled()
    chain.views(a, hq)
    chain.views(b, hq)

    a.drained()
    b.drained()
    accounts = chain.hq_accounts()                                # storegate-hq members show CARD --json
    final = {c: (v["stored_value_fen"], v["points"]) for c, v in accounts.items()}
    assert final == chain.receipts
    assert {c: v["status"] for c, v in accounts.items()} == dict.fromkeys(START, "active")
    chain.exactly_once()
    assert reconcile(chain)["overdrafts"] == []                    # nobody spent what they did not hold

    # offline again: the snapshot made at the rotation + S002's records after its watermark (acked since)
    b.go_offline()
    chain.views(b, final)


@pytest.mark.parametrize("chain", ["sqlite"], indirect=True)   # PostgreSQL: tests/test_reconcile.py
def test_both_stores_spend_the_same_stored_value_offline_blocked_then_lifted_at_both(chain):
    a, b = chain.stores["S001"], chain.stores["S002"]
    assert a.tap(RECON)["balance_fen"] == b.tap(RECON)["balance_fen"] == 30000
    deny = {s.id: s.status()["deny_version"] for s in (a, b)}
    a.go_offline()
    b.go_offline()
    sale_a = chain.sell(a, RECON, lines((RICE, 5)), sv=25000)    # each within its offline limits
    sale_b = chain.sell(b, RECON, lines((RICE, 4)), sv=20000)
    a.proxy.restore()                                             # both links back at once
    b.proxy.restore()
    a.go_online()
    b.go_online()

    # HQ applied both and reports the exact overdraft
    account = chain.hq_view(RECON)
    assert (account["stored_value_fen"], account["paid_fen"], account["status"]) == (-15000, -15000, "blocked")
    assert [(o["kind"], o["amount"], o["action"]) for o in account["overdrafts"]] == [("stored_value", 15000, "block")]
    report = reconcile(chain)
    [od] = report["overdrafts"]
    assert (od["account_id"], od["card_no"], od["kind"], od["amount"], od["action"], od["state"]) == \
        ("M2002", RECON, "stored_value", 15000, "block", "open")
    assert sorted((r["store"], r["seq"], r["tx_id"], r["amount"]) for r in od["records"]) == \
        [("S001", sale_a["seq"], sale_a["tx_id"], 25000), ("S002", sale_b["seq"], sale_b["tx_id"], 20000)]
    assert report["totals"]["stored_value"] == 15000
    assert report["cards_changed"] == []                          # blocked already on ingest, not again

    # the policy reached both stores: a signed deny delta, the card blocked at each (identified, nothing to spend)
    for st in (a, b):
        wait_until(lambda: st.verdict(RECON)["verdict"] == "accept_limited", timeout=20,
                   what=f"the block at {st.id}")
        assert st.verdict(RECON)["reason"] == "blocked"
        assert st.status()["deny_version"] == deny[st.id] + 1

    # HQ republishes while the card is blocked (a key rotation): the new snapshots keep the block
    chain.rotate_keys()
    for st in (a, b):
        assert st.verdict(RECON)["reason"] == "blocked"

    # part of the overdraft paid back (goods returned to stored value): still blocked, the amount follows
    chain.give_back(a, sale_a, [{"line": 0, "qty": 2}], live=False)    # (by the receipt: no tap)
    a.drained()
    account = chain.hq_view(RECON)
    assert (account["stored_value_fen"], account["status"]) == (-5000, "blocked")
    assert [(o["kind"], o["amount"]) for o in account["overdrafts"]] == [("stored_value", 5000)]
    assert [(o["amount"], o["state"]) for o in reconcile(chain)["overdrafts"]] == [(5000, "open")]
    for st in (a, b):
        assert st.verdict(RECON)["reason"] == "blocked"
        assert st.status()["deny_version"] == deny[st.id] + 1

    # settled: HQ's own lift goes out to every store
    chain.give_back(a, sale_a, [{"line": 0, "qty": 3}], live=False)
    for st in (a, b):
        wait_until(lambda: st.verdict(RECON)["verdict"] == "accept", timeout=20, what=f"the lift at {st.id}")
        assert st.status()["deny_version"] == deny[st.id] + 2
    account = chain.hq_accounts([RECON])[RECON]
    assert (account["stored_value_fen"], account["status"], account["overdrafts"]) == (10000, "active", [])
    assert reconcile(chain)["overdrafts"] == []
    assert chain.settled()[RECON][0] == 10000
    chain.views(a, chain.settled(), [RECON])
    chain.views(b, chain.settled(), [RECON])
    # offline, on the snapshot made while the card was blocked: HQ's lift holds there too
    a.go_offline()
    lifted = a.verdict(RECON)
    assert lifted["verdict"] == "accept", lifted                  # before the fix: deny, "frozen"
    assert lifted["member"]["source"] == "snapshot"
    # (its balance there: test_a_snapshot_of_an_overdrawn_account_hands_the_overdraft_back)
    a.go_online()
    chain.top_up(b, RECON, 5000)                                  # and the card works again
    assert chain.settled(cli=True, cards=[RECON])[RECON][0] == 15000
    chain.exactly_once()


# -- the pieces, in-process ------------------------------------------------------------------------------------------

def _demo_rules(members, **kw):
    from gateway.core import validate as engine
    from hq_bridge.rules import _read_doc

    return engine.Rules.from_rule_set(_read_doc(RULES_FILE), version=2, issued_at=int(time.time()), members=members,
                                      **kw)


def _tap(rules, card: str = RECON):
    from datetime import datetime, timezone

    from gateway.core import validate as engine
    return engine.validate("magstripe", card, rules, datetime.now(timezone.utc))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_lift_in_a_deny_delta_lifts_a_snapshot_row_that_showed_the_card_blocked(tmp_path, kind):
    """HQ built the store's snapshot while the account was blocked (its
    card's row says ``blocked``, and the deny list too); the deny delta that
    lifts the block must make the card usable offline, not only take it off
    the deny list. Also when a snapshot older than the lift loads after it."""
    from gateway.core.members import InMemoryMembers
    from gateway.store.members import MemberStore

    row = {"card_no": RECON, "member_id": "M2002", "tier": "normal", "status": "blocked", "balance_fen": 0}
    other = {"card_no": GOLD, "member_id": "M1001", "tier": "gold", "status": "lost"}
    deny = [{"card_no": RECON, "status": "blocked", "since": "2026-12-05"}]
    store = InMemoryMembers() if kind == "memory" else MemberStore(tmp_path / "m")
    try:
        store.replace_snapshot([row, other], deny, version=3, as_of=1, store_seq=7, deny_version=4)
        rules = _demo_rules(store)
        assert (_tap(rules).verdict, _tap(rules).reason) == ("accept_limited", "blocked")
        store.apply_deny_delta(5, {RECON: None})                    # HQ: settled, lifted
        assert _tap(rules).verdict == "accept" and store.get(RECON)["status"] == "active"
        assert store.get(GOLD)["status"] == "lost"                  # a card the delta did not name stays as it was
        # the same snapshot arriving again (a resync) after the lift: the lift is newer, it holds
        store.replace_snapshot([row, other], deny, version=4, as_of=1, store_seq=7, deny_version=4)
        assert _tap(_demo_rules(store)).verdict == "accept"
        # a snapshot made after the lift (deny list at v5) says what HQ says then
        store.replace_snapshot([{**row, "status": "blocked"}], [], version=5, as_of=2, store_seq=8, deny_version=5)
        assert _tap(_demo_rules(store)).reason == "blocked"
    finally:
        store.close()


def _overdrawn(tmp_path):
    """HQ's database: M2002 (10000 fen) spent 8000 at S001 and 7000 at S002
    offline; reconciliation recorded the overdraft (policy carry)."""
    from hq_bridge import db, migrations
    from hq_bridge.accounts import AccountStore, import_members
    from hq_bridge.reconcile import reconcile as find
    from tests.hq_support import RULES, commit, sale_body, tx

    url = f"sqlite:///{tmp_path / 'hq.db'}"
    migrations.migrate(url)
    engine = db.open_engine(url)
    store = AccountStore(engine)
    with engine.begin() as conn:
        import_members(conn, [{"card_no": RECON, "member_id": "M2002", "tier": "normal", "balance_fen": 10000}])
    commit(engine, store, "S001", [tx(1, sale_body(RECON, "M2002", sv=8000, key="a"))])
    commit(engine, store, "S002", [tx(1, sale_body(RECON, "M2002", sv=7000, key="b"))])
    with engine.begin() as conn:
        assert [(o.kind, o.amount) for o in find(conn, RULES).overdrafts] == [("stored_value", 5000)]
    return engine, store


def test_members_show_json_with_an_open_overdraft(tmp_path):
    import argparse
    import io

    from hq_bridge import members

    engine, _ = _overdrawn(tmp_path)
    parser = argparse.ArgumentParser()
    members.register(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    try:
        code = members.run(parser.parse_args(["members", "show", RECON, "--json", "--config", "x"]), engine, out=out)
    finally:
        engine.dispose()
    assert code == 0 and json.loads(out.getvalue())["overdrafts"][0]["amount"] == 5000


def test_a_snapshot_of_an_overdrawn_account_keeps_the_debt_at_the_store(tmp_path):
    """An overdrawn account goes to the stores with its debt (a negative
    balance_fen): a store adds its later records to the debt, not to 0."""
    from gateway.core.members import InMemoryMembers
    from hq_bridge.accounts import snapshot_rows
    from tests.hq_support import commit, topup_body, tx

    engine, store = _overdrawn(tmp_path)
    try:
        with engine.begin() as conn:
            snap = snapshot_rows(conn, "S001")
            rows, mark = list(snap), snap.watermark
        # S001 runs on that snapshot and takes a top-up of 30.00; HQ applies it
        members = InMemoryMembers(rows, version=2, store_seq=mark)
        top = topup_body(RECON, "M2002", 3000, key="t")
        members.record_deltas(mark + 1, "M2002", top["day"], top["deltas"])
        commit(engine, store, "S001", [tx(mark + 1, top)])
        with engine.begin() as conn:
            hq = store.account_of_card(conn, RECON).stored_value_fen
    finally:
        engine.dispose()
    assert hq == -2000
    view = _tap(_demo_rules(members))
    assert view.verdict == "accept"
    assert view.member["balance_fen"] == max(0, hq) == 0  # the store's view (before the fix: 30.00, the debt forgotten)


async def test_a_card_blocked_for_an_overdraft_can_be_topped_up_to_settle(tmp_path):
    from gateway.shell.service import Gateway
    from hardware.readers import CardRead
    from tests.test_live_accounts import gw_config_for, install

    async with Gateway(gw_config_for(tmp_path, "S002", 1)) as gw:       # offline: no broker
        install(gw)
        gw.rules.members.apply_deny_delta(gw.rules.deny_version + 1, {
            "880000000013": {"status": "blocked", "since": "2026-12-05"}})   # HQ's block of M1001
        await gw.handle_read(CardRead("1", "magstripe", "880000000013", time.time()))
        top = await gw.counter.topup("1", {"idempotency_key": "settle-000001", "amount_fen": 5000,
                                           "payment": CASH})
        assert top.response["record"]["credit_fen"] == 5000
