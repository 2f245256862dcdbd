"""Rules-engine figures (issue 3): card validation over a big member snapshot,
the gateway's resident memory, the member-store choice, and quote.

    python -m bench.rules [--quick] [--dir DIR]

JSON lines (bench/common.py emit):

- ``member_load_s``: load 1,000,000 members + 100,000 deny entries from
  JSON-lines part files into the SQLite member store: read, parse, check
  each record (schema and references), bulk insert, index, fsync, switch.
- ``validate_p99_ms``: engine.validate over that store (NFC UIDs, magstripe and
  QR numbers, deny-listed and unknown cards), measured in a fresh
  gateway-like process that opened the store after the load.
- ``rss_mb``: VmRSS of that process (gateway modules imported, policy and
  member store open, after the validations and the quotes).
- ``member_lookup_p99_ms`` / ``member_store_load_s``: SQLite vs TinyDB side by
  side in this run, at sizes TinyDB can manage (lookup by card number; TinyDB
  with its CachingMiddleware, i.e. the table held in memory; its default
  JSONStorage re-reads the whole file on every query and is far slower still),
  with the ratio; the scaling over the sizes shows why TinyDB cannot hold
  1,000,000 members.
- ``quote_p99_ms``: bench/quote_workload.py (the pricing engine), if present,
  run in that same gateway-like process: not in this one, which by then also
  holds the TinyDB comparison's tables and garbage (quotes ran ~2x slower here).

--quick: 100,000 members and 10,000 deny entries, smaller comparison sizes
(said in each baseline text).
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from bench.common import args, emit, median, note, rss_mb
from gateway.core.validate import luhn_check_digit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "deploy" / "examples"
TIERS = ["normal"] * 6 + ["silver"] * 3 + ["gold", "diamond"]
SURNAMES = "王李张刘陈杨赵黄周吴"


def card(i: int) -> str:
    body = f"8800{i:07d}"
    return body + luhn_check_digit(body)


def uid(i: int) -> str:
    return f"04{i:012X}"


def member_records(n: int):
    """Realistic records: masked names, tiers, expiries, birthdays, points,
    balances; 60% with an NFC UID, a few with packages or coupons."""
    for i in range(n):
        rec = {"card_no": card(i), "member_id": f"M{i:08d}", "name": SURNAMES[i % 10] + "*",
               "tier": TIERS[i % len(TIERS)], "expires": f"20{27 + i % 3}-{1 + i % 12:02d}-28",
               "birthday": f"{1 + i % 12:02d}-{1 + i % 28:02d}", "points": (i * 37) % 50000,
               "balance_fen": (i * 101) % 200000}
        if i % 5 < 3:
            rec["nfc_uid"] = uid(i)
        if i % 97 == 0:
            rec["packages"] = {"car_wash10": 1 + i % 9}
        yield rec


def deny_records(n: int, members: int):
    # half of them members' cards (reported lost after the snapshot), half cards not in the snapshot
    for j in range(n):
        i = (j * 7919) % members if j % 2 == 0 else members + j
        yield {"card_no": card(i), "status": ["lost", "frozen", "cancelled"][j % 3], "since": "2026-11-01"}


def write_parts(base: Path, members: int, deny: int) -> None:
    import orjson

    with open(base / "members.jsonl", "wb") as f:
        f.write(orjson.dumps({"part": "members", "as_of": 0, "store_seq": 0}) + b"\n")
        f.writelines(orjson.dumps(r) + b"\n" for r in member_records(members))
    with open(base / "deny.jsonl", "wb") as f:
        f.write(orjson.dumps({"part": "deny", "version": 1}) + b"\n")
        f.writelines(orjson.dumps(r) + b"\n" for r in deny_records(deny, members))


def effective_rules() -> dict:
    from wire.ruleset import effective_ruleset

    layers = [tomllib.loads((EXAMPLES / f"{n}.toml").read_text()) for n in ("chain", "region-east", "store-S001")]
    return effective_ruleset(layers, store="S001", region="east")


# ---------------------------------------------------------------- the gateway-like process

CHILD = r"""
import json, random, sys, time
sys.path.insert(0, sys.argv[1])
try:
    import gateway.shell.service  # noqa: F401  (what the gateway process has loaded anyway)
except Exception as exc:
    print(f"gateway.shell.service not importable ({exc}); measuring without it", file=sys.stderr)
from datetime import datetime
from zoneinfo import ZoneInfo
from bench.rules import card, uid, effective_rules
from bench.common import rss_mb
from gateway.core import validate as engine
from gateway.store.members import MemberStore

data_dir, members, deny, samples = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
now = datetime(2026, 11, 24, 10, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
store = MemberStore(data_dir)
rules = engine.Rules.from_rule_set(effective_rules(), version=9, issued_at=int(now.timestamp()) - 3600,
                                   scope={"store": "S001"}, members=store)
rng = random.Random(7)
reads = []
for k in range(samples):
    i = rng.randrange(members)
    kind = k % 10
    if kind < 4:
        reads.append(("nfc", uid(i - i % 5)))              # members with a UID
    elif kind < 7:
        reads.append(("magstripe", card(i)))
    elif kind < 8:
        reads.append(("qr", card(members + rng.randrange(deny))))    # deny-listed / not in snapshot
    elif kind < 9:
        reads.append(("qr", card(members * 2 + k)))                 # valid number, unknown
    else:
        reads.append(("qr", card(i)[:-1] + str((int(card(i)[-1]) + 1) % 10)))   # bad check digit
verdicts = {}
for src, raw in reads[: samples // 10]:                        # warm-up
    engine.validate(src, raw, rules, now)
times = []
for src, raw in reads:
    t0 = time.perf_counter_ns()
    v = engine.validate(src, raw, rules, now)
    times.append(time.perf_counter_ns() - t0)
    verdicts[v.reason] = verdicts.get(v.reason, 0) + 1
times.sort()
gets = []
for k in range(samples):
    c = card(rng.randrange(members))
    t0 = time.perf_counter_ns()
    store.get(c)
    gets.append(time.perf_counter_ns() - t0)
gets.sort()
quote = None
if sys.argv[6] != "-":  # the quote benchmark, in this process that holds the gateway's data
    from bench.quote_workload import run_quote_bench
    quote = run_quote_bench(sys.argv[6] == "quick")
print(json.dumps({"p50_ms": times[len(times) // 2] / 1e6, "p99_ms": times[int(len(times) * 0.99)] / 1e6,
                  "get_p99_ms": gets[int(len(gets) * 0.99)] / 1e6, "rss_mb": rss_mb(), "verdicts": verdicts,
                  "n": len(times), "quote": quote}))
"""


def gateway_process(data_dir: Path, members: int, deny: int, samples: int, quote: str = "-") -> dict:
    """Validation (and, with ``quote`` "quick" or "full", the quote benchmark) in
    a fresh process holding what the gateway holds: the rules and the member
    store. Not in this one, which also holds the TinyDB comparison's garbage."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(data_dir), str(members), str(deny),
                          str(samples), quote], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"gateway-like process failed:\n{out.stderr[-3000:]}")
    if out.stderr.strip():
        note(out.stderr.strip())
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- SQLite vs TinyDB

def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def compare_stores(base: Path, n: int, lookups: int) -> dict:
    from tinydb import Query, TinyDB
    from tinydb.middlewares import CachingMiddleware
    from tinydb.storages import JSONStorage

    from gateway.store.members import MemberStore

    rng = random.Random(n)
    probes = [card(rng.randrange(n)) for _ in range(lookups)]

    d = base / f"sqlite-{n}"
    t0 = time.perf_counter()
    store = MemberStore(d, durable=False)
    store.replace_snapshot(member_records(n), (), version=1, as_of=0, store_seq=0)
    sqlite_load = time.perf_counter() - t0
    sq = []
    for c in probes:
        t0 = time.perf_counter_ns()
        assert store.get(c) is not None
        sq.append((time.perf_counter_ns() - t0) / 1e6)
    store.close()

    path = base / f"tinydb-{n}.json"
    rss_before = rss_mb()
    t0 = time.perf_counter()
    db = TinyDB(path, storage=CachingMiddleware(JSONStorage))
    db.insert_multiple(member_records(n))
    db.storage.flush()
    tiny_load = time.perf_counter() - t0
    tiny_rss = rss_mb() - rss_before     # TinyDB holds the whole table in memory
    q = Query()
    tiny = []
    for c in probes:
        t0 = time.perf_counter_ns()
        assert db.get(q.card_no == c) is not None
        tiny.append((time.perf_counter_ns() - t0) / 1e6)
    # TinyDB's default storage (no cache) re-reads and parses the file for every query
    plain = TinyDB(path)
    raw = []
    for c in probes[: max(3, lookups // 20)]:
        t0 = time.perf_counter_ns()
        plain.get(q.card_no == c)
        raw.append((time.perf_counter_ns() - t0) / 1e6)
    plain.close()
    db.close()
    return {"n": n, "sqlite_p99": p99(sq), "tiny_p99": p99(tiny), "tiny_plain_median": median(raw),
            "sqlite_load": sqlite_load, "tiny_load": tiny_load, "tiny_rss_mb": tiny_rss}


# ---------------------------------------------------------------- main

def main() -> None:
    a = args("rules-engine benchmarks: validation, memory, member store, quote")
    quick = a.quick
    members, deny = (100_000, 10_000) if quick else (1_000_000, 100_000)
    sizes = (2_000, 10_000) if quick else (10_000, 50_000)
    samples = 20_000 if quick else 50_000
    scale = f"{members:,} members, {deny:,} deny entries" + (" (--quick)" if quick else "")
    base = Path(tempfile.mkdtemp(prefix="sg-bench-rules-", dir=a.dir))
    try:
        from gateway.store.members import MemberStore, load_part_files

        rules = effective_rules()
        from wire.ruleset import with_defaults

        note(f"writing {scale} as JSON-lines parts, then loading them into SQLite at {base} ...")
        write_parts(base, members, deny)
        store = MemberStore(base / "gateway", durable=False)
        t0 = time.perf_counter()   # read + parse + check (schema and references) + load + switch
        load_part_files(store, base / "members.jsonl", base / "deny.jsonl", rules=with_defaults(rules))
        load_s = time.perf_counter() - t0
        assert store.count() == (members, deny)
        store.close()
        size_mb = (base / "gateway" / "members.db").stat().st_size / 2**20
        emit("member_load_s", load_s, "s", f"issue-5 apply budget 20 s for 1,000,000 + 100,000 ({scale})", 20.0,
             members=members, deny=deny, file_mb=round(size_mb, 1))

        quote = "quick" if quick else "full"
        if importlib.util.find_spec("bench.quote_workload") is None:
            note("bench/quote_workload.py not present: no quote_p99_ms")
            quote = "-"
        g = gateway_process(base / "gateway", members, deny, samples, quote)
        emit("validate_p99_ms", g["p99_ms"], "ms", f"target p99 <= 1 ms ({scale})", 1.0,
             p50_ms=round(g["p50_ms"], 4), samples=g["n"], member_get_p99_ms=round(g["get_p99_ms"], 4),
             verdicts=g["verdicts"])
        emit("rss_mb", g["rss_mb"], "MB", f"target <= 150 MB (gateway-like process, {scale})", 150.0)

        for n in sizes:
            c = compare_stores(base, n, 2000 if not quick else 500)
            emit("member_lookup_p99_ms", c["sqlite_p99"], "ms",
                 f"TinyDB (CachingMiddleware) lookup by card number, same {n:,} members, same run",
                 c["tiny_p99"], store="sqlite", members=n,
                 tinydb_default_storage_median_ms=round(c["tiny_plain_median"], 3),
                 tinydb_rss_growth_mb=round(c["tiny_rss_mb"], 1))
            emit("member_store_load_s", c["sqlite_load"], "s",
                 f"TinyDB insert_multiple + flush, same {n:,} members, same run", c["tiny_load"],
                 store="sqlite", members=n)

        q = g["quote"]
        if q:
            emit("quote_p99_ms", q["p99_ms"], "ms", "target p99 <= 5 ms (50-line basket, 200 promotions)", 5.0,
                 **{k: v for k, v in q.items() if k != "p99_ms"})
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
