"""The rule-part cache keeps what the running and the previous rule set need
and deletes the rest (gateway/store/rules.py ``prune_parts``, invariants 1-4
in its docstring): a member snapshot is ~50 MB a time, and a store box whose
disk fills up refuses member sales.

HQ publishes a new snapshot every night; the layers (chain, region, store)
stay the same, the member part changes with the balances."""

from __future__ import annotations

import json

from gateway.store.rules import RulesStore
from tests.test_rules_distribution import PUB, _members, rule_set


def nightly(version: int):
    """Rule set ``version``: the same layers, a member part of that night's balances."""
    members = [dict(m, points=m.get("points", 0) + version) for m in _members()]
    return rule_set(version, members=members)


def names(payload: bytes) -> dict[str, str]:
    return {p["sha256"]: p["name"] for p in json.loads(payload)["parts"]}


def cached(store: RulesStore) -> set[str]:
    return {p.name for p in store.parts_dir.iterdir()}


def test_three_nights_keep_only_the_running_and_the_previous_sets_parts(tmp_path):
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    (v1, p1), (v2, p2), (v3, p3) = nightly(1), nightly(2), nightly(3)
    members = [next(sha for sha, n in names(v).items() if n == "members") for v in (v1, v2, v3)]
    assert len(set(members)) == 3                          # three different snapshots
    layers = {sha for sha, n in names(v1).items() if n.startswith("layer:")}
    assert layers == {sha for sha, n in names(v3).items() if n.startswith("layer:")}   # shared by all three

    store.install(v1, p1)
    assert cached(store) == set(names(v1))
    store.install(v2, p2)
    assert cached(store) == set(names(v1)) | set(names(v2))          # running v2, previous v1
    store.install(v3, p3)
    assert cached(store) == set(names(v2)) | set(names(v3))          # v1's snapshot is gone
    assert members[0] not in cached(store) and {members[1], members[2]} <= cached(store)
    assert layers <= cached(store)                                    # still named by v3
    assert store.counters["parts_pruned"] == 1


def test_leftovers_of_rejected_or_half_fetched_sets_go_with_the_next_prune(tmp_path):
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    (v1, p1), (v2, p2) = nightly(1), nightly(2)
    store.install(v1, p1)
    stray = store.parts_dir / ("ab" * 32)                  # a part of a set that never went live
    stray.write_bytes(b"half a snapshot")
    fresh_tmp = store.parts_dir / (("cd" * 32) + ".tmp")   # a part being written right now
    fresh_tmp.write_bytes(b"...")
    store.install(v2, p2)
    assert not stray.exists() and fresh_tmp.exists()
    assert cached(store) == set(names(v1)) | set(names(v2)) | {fresh_tmp.name}


def test_a_power_cut_before_the_prune_loses_nothing_the_reboot_needs(tmp_path):
    """Applied (manifest durable), cut before pruning: the reboot comes up on
    the new set, and the next set's prune takes the leftovers."""
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    (v1, p1), (v2, p2), (v3, p3), (v4, p4) = nightly(1), nightly(2), nightly(3), nightly(4)
    store.install(v1, p1)
    store.install(v2, p2)
    m3 = store.check_manifest(v3)
    for p in store.missing_parts(m3):
        store.store_part(p, p3[p.sha256])
    store.commit(m3, store.build(m3))                      # ... and the power goes before prune_parts
    store.members.close()

    again = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    again.load()
    assert again.current.version == 3 and again.last_rejection is None
    assert cached(again) == set(names(v1)) | set(names(v2)) | set(names(v3))
    again.install(v4, p4)
    assert cached(again) == set(names(v3)) | set(names(v4))


def test_a_power_cut_between_the_member_store_switch_and_the_manifest_keeps_the_old_sets_parts(tmp_path):
    """The member store has switched to v3, manifest.json still names v2: the
    reboot rebuilds v2's member store from v2's parts, which no prune has
    touched (pruning runs only after the manifest is durable)."""
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    (v1, p1), (v2, p2), (v3, p3) = nightly(1), nightly(2), nightly(3)
    store.install(v1, p1)
    store.install(v2, p2)
    m3 = store.check_manifest(v3)
    for p in store.missing_parts(m3):
        store.store_part(p, p3[p.sha256])
    store.build(m3)                                        # member store switched; the power goes here
    assert store.members.version == 3
    store.members.close()

    again = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    again.load()                                           # rebuilds v2's member store from its parts
    assert again.current.version == 2 and again.members.version == 2 and again.last_rejection is None
    again.install(v3, p3)
    assert cached(again) == set(names(v2)) | set(names(v3))


def test_nothing_is_pruned_before_a_rule_set_is_running(tmp_path):
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    (store.parts_dir / ("ef" * 32)).write_bytes(b"a part of the first set, still being fetched")
    assert store.prune_parts() == []
    assert len(cached(store)) == 1
