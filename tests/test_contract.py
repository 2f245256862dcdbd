"""Wire messages and config files: bad input named, nothing changed. (The rules store:
tests/test_rules_distribution.py.)"""

import json

import pytest

from common.configfile import ConfigError
from gateway.shell import config as gw_config
from hq_bridge.ledger import Ledger
from wire.messages import Ack, TxBatch, TxRecord, WireError
from wire.schema import OUT, render
from wire.topics import Topics

def test_schemas_on_disk_match_the_code():
    for name, text in render().items():
        assert (OUT / name).read_text() == text, f"run python -m wire.schema ({name} is stale)"


def test_tx_batch_round_trip_and_compression():
    recs = [TxRecord(i, f"id{i:08d}", "sale", 1000 + i, {"total": i, "pad": "收银" * 50}) for i in range(1, 40)]
    payload = TxBatch("S001", recs).encode()
    assert payload[:4] == b"SGZ1"                       # compressed: it pays at this size
    assert TxBatch.decode(payload).records == recs


@pytest.mark.parametrize("payload,words", [
    (b"", "not JSON"),
    (b"\x78garbage", "zlib"),
    (b'{"store": "S001", "records": []}', "records"),
    (b'{"store": "S 1", "records": [{"seq":1,"id":"abcdefgh","type":"sale","ts":1,"body":{}}]}', "store"),
    (b'{"store": "S001", "records": [{"seq":0,"id":"abcdefgh","type":"sale","ts":1,"body":{}}]}', r"records\[0\]\.seq"),
])
def test_bad_batches_are_named(payload, words):
    with pytest.raises(WireError, match=words):
        TxBatch.decode(payload)


def test_ack_ranges():
    ack = Ack.of("S001", [5, 1, 2, 3, 7, 7])
    assert ack.acked == [[1, 3], [5, 5], [7, 7]]
    assert Ack.decode(ack.encode()).acked == [[1, 3], [5, 5], [7, 7]]
    with pytest.raises(WireError, match="backwards"):
        Ack.decode(b'{"store": "S001", "acked": [[3, 1]]}')


def test_topics():
    t = Topics()
    assert t.tx("S001") == "sg/v1/stores/S001/tx"
    assert t.store_of("sg/v1/stores/S001/ack") == "S001"
    with pytest.raises(ValueError):
        t.tx("S001/#")


GOOD_CONFIG = {"store": {"id": "S001"}, "mqtt": {"host": "h"}, "lanes": [{"id": "1", "reader": "simulated"}]}


@pytest.mark.parametrize("mutate,words", [
    (lambda c: c.pop("mqtt"), "mqtt: required key is missing"),
    (lambda c: c["mqtt"].update(port="x"), "mqtt.port: 'x' is not of type 'integer'"),
    (lambda c: c["mqtt"].update(hots="h"), "mqtt.hots: unknown key"),
    (lambda c: c["store"].pop("id"), "store.id: required key is missing"),
    (lambda c: c["store"].update(timezone="Mars/Base"), "store.timezone: unknown time zone"),
    (lambda c: c["lanes"][0].update(reader="laser"), "lanes.0.reader"),
    (lambda c: c["lanes"].append({"id": "1", "reader": "simulated"}), "duplicate lane id '1'"),
    (lambda c: c["lanes"][0].update(indicator="gpio"), "lanes[0].gpio: required"),
])
def test_config_errors_name_the_key(mutate, words):
    cfg = json.loads(json.dumps(GOOD_CONFIG))
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        gw_config.check(cfg, "gateway.toml")
    assert words in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        gw_config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[store\nid=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        gw_config.load(bad)
    cfg = gw_config.check(json.loads(json.dumps(GOOD_CONFIG)))
    assert cfg["mqtt"]["port"] == 1883 and cfg["api"]["port"] == 8080  # defaults filled in


def test_example_config_is_valid():
    from pathlib import Path
    cfg = gw_config.load(Path(__file__).parent.parent / "deploy" / "gateway.example.toml")
    assert cfg["store"]["id"] == "S001"


def test_ledger_applies_once_and_keeps_conflicts(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite3")
    batch = TxBatch("S001", [TxRecord(1, "id-00000001", "sale", 1, {}), TxRecord(2, "id-00000002", "sale", 1, {})])
    first = ledger.commit(batch)
    again = ledger.commit(batch)
    assert (first.applied, first.duplicates) == (2, 0)
    assert (again.applied, again.duplicates, again.seqs) == (0, 2, [1, 2])
    reused = ledger.commit(TxBatch("S001", [TxRecord(1, "id-99999999", "sale", 1, {})]))
    assert reused.conflicts == 1 and reused.seqs == [1]
    assert ledger.counts() == {"transactions": 2, "conflicts": 1}
    # the same seq at another store is another transaction
    assert ledger.commit(TxBatch("S002", [TxRecord(1, "id-00000003", "sale", 1, {})])).applied == 1
    assert ledger.next_rules_version("store:S001") == 1 and ledger.next_rules_version("store:S001") == 2


def test_drain_progress_line():
    from gateway.shell.cli import progress_line, render_status

    assert progress_line(1000, 250, 100.0, width=10) == "drain [#######...]   75%  250 left  100 rec/s  ~2 s"
    assert progress_line(0, 0, 0.0, width=4) == "drain [####]  100%  0 left  0 rec/s"
    text = render_status({"store": "S001", "uplink": "offline", "last_hq_contact": None, "rules_version": None,
                          "backlog": 3, "oldest_unsent_age_s": 42.0, "acked_records": 0, "last_seq": 3,
                          "lanes": {"1": {"reader": "simulated", "taps": 2}}, "faults": ["journal damaged"]},
                         now=100.0)
    assert "backlog          3 record(s), oldest 42 s" in text and "last HQ contact  never" in text
    assert "FAULT            journal damaged" in text

