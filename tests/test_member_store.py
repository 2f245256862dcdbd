"""The member store: SQLite snapshot switched atomically, crash-safe loads,
deny deltas with gap detection, local deltas between snapshots; and its
in-memory twin behind the same interface."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.core.members import DenyDeltaGap, InMemoryMembers
from gateway.store.members import MemberStore, read_part_lines
from wire.ruleset import RulesetError

ROOT = Path(__file__).resolve().parent.parent


def members(n: int, tier: str = "gold", start: int = 0):
    for i in range(start, start + n):
        yield {"card_no": f"8800{i:08d}", "member_id": f"M{i}", "tier": tier, "points": i,
               "nfc_uid": f"04{i:012X}"}


def deny(n: int, start: int = 10**7):
    for i in range(start, start + n):
        yield {"card_no": f"8800{i:08d}", "status": "lost"}


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = MemberStore(tmp_path, durable=False) if request.param == "sqlite" else InMemoryMembers()
    yield s
    s.close()


def test_lookups(store):
    store.replace_snapshot(members(100), deny(10), version=1, as_of=1000, store_seq=0)
    assert store.get("880000000007")["member_id"] == "M7"
    assert store.get("880000000007")["status"] == "active"         # defaults filled
    assert store.get("889999999999") is None
    assert store.card_for_uid("04:00:00:00:00:00:07") == "880000000007"
    assert store.card_for_uid("04000000000007".lower()) == "880000000007"
    assert store.card_for_uid("04FFFFFFFFFFFF") is None
    assert store.denied("880010000003") == {"card_no": "880010000003", "status": "lost"}
    assert store.denied("880000000007") is None
    assert store.count() == (100, 10)
    assert (store.version, store.as_of, store.store_seq) == (1, 1000, 0)


def test_bad_records_are_named_and_change_nothing(store):
    store.replace_snapshot(members(5), (), version=1, as_of=0, store_seq=0)
    bad = [*members(3), {"card_no": "880000000099", "member_id": "M99", "tier": "gold", "points": 1.5}]
    with pytest.raises(RulesetError, match=r"members\.880000000099\.points"):
        store.replace_snapshot(iter(bad), (), version=2, as_of=0, store_seq=0)
    assert store.count() == (5, 0) and store.version == 1
    with pytest.raises(RulesetError, match=r"deny\.880000000001\.status"):
        store.replace_snapshot(members(3), [{"card_no": "880000000001", "status": "gone"}], version=2, as_of=0,
                               store_seq=0)
    assert store.count() == (5, 0)


def test_duplicate_card_in_a_snapshot_is_refused(tmp_path):
    store = MemberStore(tmp_path, durable=False)
    with pytest.raises(ValueError, match="880000000001: the card appears twice"):
        store.replace_snapshot([*members(3), *members(1, start=1)], (), version=1, as_of=0, store_seq=0)
    assert store.count() == (0, 0)
    assert not list(tmp_path.glob("members.db.loading-*"))
    store.close()


def test_readers_see_the_old_snapshot_until_the_switch(tmp_path):
    store = MemberStore(tmp_path, durable=False)
    store.replace_snapshot(members(1000, tier="silver"), (), version=1, as_of=0, store_seq=0)
    gate = threading.Event()
    seen = []

    def slow_members():
        for i, rec in enumerate(members(1000, tier="gold")):
            if i == 500:
                gate.set()
                time.sleep(0.3)   # half loaded: readers must still see v1 in full
            yield rec

    loader = threading.Thread(target=store.replace_snapshot, args=(slow_members(), ()),
                              kwargs={"version": 2, "as_of": 0, "store_seq": 0})
    loader.start()
    gate.wait(10)
    k = 0
    while loader.is_alive():
        k += 1
        seen.append(store.get(f"8800{k % 1000:08d}")["tier"])   # each lookup: one snapshot or the other
        time.sleep(0.002)
    loader.join()
    assert seen[0] == "silver" and set(seen) <= {"silver", "gold"}
    assert seen == sorted(seen, key=lambda t: t == "gold")      # old until the switch, new after, never back
    assert store.version == 2 and store.get("880000000999")["tier"] == "gold"
    assert not list(tmp_path.glob("members.db.loading-*"))
    store.close()


LOADER = """
import sys, time
from gateway.store.members import MemberStore
store = MemberStore(sys.argv[1], durable=False)
def slow():
    for i in range(200000):
        if i == 50000:
            print("loading", flush=True)
        yield {"card_no": f"8800{i:08d}", "member_id": f"M{i}", "tier": "gold"}
        if i >= 50000:
            time.sleep(0.0001)
store.replace_snapshot(slow(), (), version=2, as_of=0, store_seq=0)
print("done", flush=True)
"""


def test_a_crash_mid_load_leaves_the_old_snapshot(tmp_path):
    store = MemberStore(tmp_path, durable=False)
    store.replace_snapshot(members(100, tier="silver"), deny(5), version=1, as_of=7, store_seq=3)
    store.close()
    proc = subprocess.Popen([sys.executable, "-c", LOADER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "loading"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("members.db.loading-*"))            # the half-loaded file is there ...
    store = MemberStore(tmp_path, durable=False)
    assert not list(tmp_path.glob("members.db.loading-*"))        # ... and gone at the next open
    assert (store.version, store.as_of, store.store_seq) == (1, 7, 3)
    assert store.count() == (100, 5) and store.get("880000000050")["tier"] == "silver"
    store.close()


def test_a_crash_after_the_switch_has_the_new_snapshot(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LOADER.replace("200000", "60000"), str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "done" in proc.stdout, proc.stderr
    store = MemberStore(tmp_path, durable=False)
    assert store.version == 2 and store.count() == (60000, 0)
    store.close()


def test_deny_deltas_in_order_gap_and_duplicate(store):
    store.replace_snapshot(members(10), deny(2), version=1, as_of=0, store_seq=0, deny_version=4)
    assert store.deny_version == 4
    assert store.apply_deny_delta(5, {"880000000003": {"status": "frozen", "since": "2026-11-24"}}) is True
    assert store.denied("880000000003")["status"] == "frozen"
    assert store.apply_deny_delta(5, {"880000000004": {"status": "lost"}}) is False      # already applied
    assert store.denied("880000000004") is None
    with pytest.raises(DenyDeltaGap) as gap:
        store.apply_deny_delta(7, {"880000000004": {"status": "lost"}})
    assert (gap.value.have, gap.value.got) == (5, 7) and "resync" in str(gap.value)
    assert store.denied("880000000004") is None and store.deny_version == 5             # nothing changed
    assert store.apply_deny_delta(6, {"880000000003": None}) is True                    # unfreeze
    assert store.denied("880000000003") is None
    with pytest.raises(RulesetError, match=r"deny\.880000000004\.status"):
        store.apply_deny_delta(7, {"880000000004": {"status": "gone"}})
    assert store.deny_version == 6


def test_deny_deltas_survive_a_snapshot_cut_before_them(store):
    store.replace_snapshot(members(10), (), version=1, as_of=0, store_seq=0, deny_version=1)
    store.apply_deny_delta(2, {"880000000001": {"status": "lost"}})
    store.apply_deny_delta(3, {"880000000002": {"status": "frozen"}})
    # a snapshot HQ cut at deny version 2 arrives after delta 3 was applied
    store.replace_snapshot(members(10), [{"card_no": "880000000001", "status": "lost"}], version=2, as_of=0,
                           store_seq=0, deny_version=2)
    assert store.denied("880000000002")["status"] == "frozen"    # delta 3 re-applied on top
    assert store.deny_version == 3
    store.apply_deny_delta(4, {"880000000005": {"status": "cancelled"}})
    assert store.denied("880000000005")["status"] == "cancelled"


def test_deny_delta_during_a_load_is_not_lost(tmp_path):
    store = MemberStore(tmp_path, durable=False)
    store.replace_snapshot(members(10), (), version=1, as_of=0, store_seq=0, deny_version=1)
    started = threading.Event()

    def slow():
        for i, rec in enumerate(members(2000)):
            if i == 1000:
                started.set()
                time.sleep(0.2)
            yield rec

    loader = threading.Thread(target=store.replace_snapshot, args=(slow(), ()),
                              kwargs={"version": 2, "as_of": 0, "store_seq": 0, "deny_version": 1})
    loader.start()
    started.wait(10)
    store.apply_deny_delta(2, {"880000000007": {"status": "lost"}})
    assert store.denied("880000000007")["status"] == "lost"     # refused at once, on the old snapshot
    loader.join()
    assert store.version == 2 and store.denied("880000000007")["status"] == "lost" and store.deny_version == 2
    store.close()


def test_local_deltas_and_snapshot_apply(store):
    store.replace_snapshot(members(10), (), version=1, as_of=0, store_seq=100)
    day = "2026-11-24"
    store.record_deltas(99, "M1", day, {"points": -500})                 # already in the snapshot: ignored
    store.record_deltas(101, "M1", day, {"points": -500, "points_redeemed": 500, "stored_value_fen": -3000,
                                         "promotion_uses": {"spend100": 1}, "coupons_used": ["C1"]})
    store.record_deltas(102, "M1", "2026-11-23", {"points": 120, "points_earned": 120, "stored_value_fen": -1000})
    store.record_deltas(103, "M1", day, {"stored_value_fen": 50000, "packages": {"car_wash10": 10},
                                         "package_expires": {"car_wash10": "2027-11-24"}})   # top-up, package sold
    store.record_deltas(104, "M1", day, {"stored_value_fen": 1000, "points_redeemed": -200, "points": 200})   # a return
    store.record_deltas(105, "M2", day, {"points": 7})
    store.record_deltas(101, "M1", day, {"points": -500, "points_redeemed": 500, "stored_value_fen": -3000,
                                         "promotion_uses": {"spend100": 1}, "coupons_used": ["C1"]})  # retry: once
    t = store.local_totals("M1", day)
    assert t == {"points": -180, "stored_value_fen": 47000, "packages": {"car_wash10": 10},
                 "package_expires": {"car_wash10": "2027-11-24"}, "coupons_used": ["C1"],
                 "today": {"points_redeemed": 500, "stored_value_paid_fen": 3000,
                           "promotion_uses": {"spend100": 1}, "coupons_used": ["C1"]}}
    assert store.local_totals("M3", day)["points"] == 0
    # the next snapshot already reflects seq <= 103: only 104 still counts
    store.replace_snapshot(members(10), (), version=2, as_of=0, store_seq=103)
    t = store.local_totals("M1", day)
    assert (t["points"], t["stored_value_fen"], t["today"]["points_redeemed"]) == (200, 1000, 0)
    assert t["package_expires"] == {}                            # the package's sale is in the snapshot now
    assert store.local_totals("M2", day)["points"] == 7


def test_bad_deltas_are_refused(store):
    for bad, where in [({"points": 1.5}, "deltas.points"), ({"balance": 1}, "unknown field"),
                       ({"packages": {"x": "1"}}, "deltas.packages"), ({"coupons_used": "C1"}, "deltas.coupons_used")]:
        with pytest.raises(ValueError, match=where):
            store.record_deltas(1, "M1", "2026-11-24", bad)


def test_deltas_and_deny_version_survive_a_restart(tmp_path):
    store = MemberStore(tmp_path)
    store.replace_snapshot(members(10), (), version=3, as_of=5, store_seq=10, deny_version=1)
    store.apply_deny_delta(2, {"880000000001": {"status": "lost"}})
    store.record_deltas(11, "M1", "2026-11-24", {"points": -100})
    store.close()
    store = MemberStore(tmp_path)
    assert (store.version, store.store_seq, store.deny_version) == (3, 10, 2)
    assert store.denied("880000000001")["status"] == "lost"
    assert store.local_totals("M1", "2026-11-24")["points"] == -100
    store.close()


def test_part_lines():
    header, recs = read_part_lines([b'{"part": "members", "as_of": 5, "store_seq": 1}\n', b'{"card_no": "1"}\n', b"\n"])
    assert header["as_of"] == 5 and list(recs) == [{"card_no": "1"}]
    with pytest.raises(ValueError, match="header"):
        read_part_lines(['{"card_no": "1"}'])
    _h, recs = read_part_lines(['{"part": "deny", "version": 1}', "{nope"])
    with pytest.raises(ValueError, match="part line 2"):
        list(recs)


def test_empty_store_comes_up_empty(tmp_path):
    store = MemberStore(tmp_path)
    assert store.count() == (0, 0) and store.get("880000000013") is None and store.version == 0
    store.close()
    assert (tmp_path / "members.db").exists()
    assert os.stat(tmp_path / "members.db").st_size > 0


def test_unsorted_and_sorted_parts_load_the_same(tmp_path):
    import random

    recs = list(members(3000))
    shuffled = recs[:1000] + random.Random(1).sample(recs[1000:], 2000)   # in order, then not
    a, b = MemberStore(tmp_path / "a", durable=False), MemberStore(tmp_path / "b", durable=False)
    a.replace_snapshot(iter(recs), (), version=1, as_of=0, store_seq=0)
    b.replace_snapshot(iter(shuffled), (), version=1, as_of=0, store_seq=0)
    for c in ("880000000000", "880000001500", "880000002999"):
        assert a.get(c) == b.get(c) is not None
        assert a.card_for_uid(a.get(c)["nfc_uid"]) == c
    assert a.count() == b.count() == (3000, 0)
    with pytest.raises(ValueError, match="880000000001, 880000000002 have the same nfc_uid"):
        a.replace_snapshot([{"card_no": f"88000000000{i}", "member_id": "M", "tier": "gold",
                             "nfc_uid": "04AABBCCDDEEFF"} for i in (1, 2)], (), version=2, as_of=0, store_seq=0)
    with pytest.raises(ValueError, match="880000002000: the card appears twice"):
        b.replace_snapshot([*members(3000), *members(1, start=2000)], (), version=2, as_of=0, store_seq=0)
    assert a.version == b.version == 1
    a.close(), b.close()


def test_records_come_back_as_they_went_in(tmp_path):
    store = MemberStore(tmp_path, durable=False)
    rec = {"card_no": "880000000013", "member_id": "M1001", "name": "王*", "tier": "gold", "status": "active",
           "expires": "2027-12-31", "birthday": "02-29", "birthday_calendar": "lunar", "nfc_uid": "04A1B2C3D4E5F6",
           "points": 5230, "balance_fen": 0, "packages": {"car_wash10": 3}, "coupons": ["C1"],
           "primary_card": "880000000021", "group_id": "G1", "card_type": "subsidiary"}
    store.replace_snapshot([rec], (), version=1, as_of=0, store_seq=0)
    assert store.get("880000000013") == rec
    assert InMemoryMembers([rec]).get("880000000013") == rec
    store.close()


def test_delta_spellings(store):
    store.replace_snapshot(members(3), (), version=1, as_of=0, store_seq=0)
    store.record_deltas(1, "M1", "2026-11-24", {"balance_fen": -500, "package_uses": {"car_wash10": 2},
                                                "coupons": ["C9"], "promotions": {"p": 1}})
    t = store.local_totals("M1", "2026-11-24")
    assert (t["stored_value_fen"], t["packages"], t["coupons_used"]) == (-500, {"car_wash10": -2}, ["C9"])
    assert t["today"]["promotion_uses"] == {"p": 1} and t["today"]["stored_value_paid_fen"] == 500


def test_a_deny_delta_logged_but_not_applied_is_applied_at_the_next_open(tmp_path):
    import sqlite3

    import orjson

    store = MemberStore(tmp_path)
    store.replace_snapshot(members(3), (), version=1, as_of=0, store_seq=0, deny_version=1)
    store.close()
    # the crash window: logged in member_deltas.db, not yet in members.db
    db = sqlite3.connect(tmp_path / "member_deltas.db")
    db.execute("INSERT INTO deny_log VALUES (2, ?)", (orjson.dumps({"880000000001": {"status": "lost"}}),))
    db.commit()
    db.close()
    store = MemberStore(tmp_path)
    assert store.deny_version == 2 and store.denied("880000000001")["status"] == "lost"
    assert store.apply_deny_delta(2, {"880000000001": {"status": "lost"}}) is False   # HQ's resend: no-op
    store.close()


def test_a_damaged_snapshot_is_set_aside_and_the_store_comes_up_empty(tmp_path):
    store = MemberStore(tmp_path)
    store.replace_snapshot(members(3), (), version=4, as_of=0, store_seq=0)
    store.record_deltas(1, "M1", "2026-11-24", {"points": -5})
    store.close()
    (tmp_path / "members.db").write_bytes(b"this is not a database" * 100)
    store = MemberStore(tmp_path)
    assert store.fault and "set aside" in store.fault
    assert list(tmp_path.glob("members.db.damaged-*"))
    assert store.count() == (0, 0) and store.version == 0
    assert store.local_totals("M1", "2026-11-24")["points"] == -5     # the local deltas are kept
    store.close()
