"""HQ ingest with account application, exactly once; and the member snapshot build.

    python -m bench.hq_ingest [--quick] [--engine sqlite|postgresql]

Metrics:

- ``hq_ingest_rate`` (records/s): 100 simulated stores send batches of
  records built like real ones (sales, top-ups, returns of earlier sales,
  from gateway/pricing.py on the demo rules); each batch is committed to the
  ledger and applied to the accounts in one database transaction
  (``db.ledger_insert`` + ``AccountStore.apply_batch``), as the ledger's
  commit will. Every batch is then sent again, and must apply nothing.
  Baseline, in the same run on the same engine: the same records, one
  database transaction per record (a prefix of them: it is slow).
- ``snapshot_build_s`` (s): the member part for 1,000,000 accounts
  (``--quick``: 100,000, and says so): every row from HQ's accounts in one
  read transaction with the store's watermark, encoded into parts as
  ``rules publish`` sends them (wire.messages.encode_table, 100,000 rows per part).

``--engine postgresql`` (the default where it is installed) starts a
throw-away PostgreSQL on a free port (tests/pg.py); ``sqlite`` uses a file
in a temp dir. Both run the same code on the same schema (Alembic migrations).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import orjson

from bench.common import emit, note
from gateway.core import pricing
from hq_bridge import db
from hq_bridge.accounts import AccountStore, audit, import_members, snapshot_rows
from hq_bridge.rules import MEMBERS_PER_PART, _read_doc
from wire.distribution import effective_rules
from wire.messages import encode_table

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
TZ = ZoneInfo("Asia/Shanghai")
STORES = 100
BATCH = 500           # records per store batch (the gateway's uplink sends up to batch_max)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (fewer records and accounts)")
    p.add_argument("--engine", choices=["sqlite", "postgresql"], default=None,
                   help="default: postgresql where it is installed, else sqlite")
    p.add_argument("--dir", default=None, help="where to put files (default: a temp dir)")
    return p.parse_args()


# ---------------------------------------------------------------- records like the gateway's

def policy() -> dict:
    docs = [_read_doc(EXAMPLES / n) for n in ("chain.toml", "region-east.toml", "store-S001.toml")]
    return {**effective_rules(docs, store="S001", region="east"), "version": 1}


def templates(rules: dict, now: datetime) -> tuple[list[dict], list[dict], list[dict]]:
    """Sale bodies (various baskets and tenders), their full returns, top-up bodies: from the real pricing core."""
    member = {"member_id": "M0", "card_no": "880000000013", "tier": "gold", "points_available": 10 ** 7,
              "balance_available_fen": 10 ** 8, "packages": {}, "coupons": []}
    rng = random.Random(7)
    skus = [("HH-001", "household", 3333), ("FR-002", "fresh", 1999), ("DR-003", "drinks", 850),
            ("ST-004", "staples", 4990), ("SN-005", "snacks", 1250)]
    sales, returns = [], []
    for i in range(48):
        lines = [{"sku": s, "name": f"item {s}", "category": c, "qty": rng.randint(1, 3), "unit_price": p}
                 for s, c, p in rng.sample(skus, rng.randint(1, 4))]
        total = pricing.quote(lines, member, rules, now, store="S001", region="east")["total"]
        tender = [None, {"stored_value_fen": min(total, 20000)}, {"points": 100},
                  {"points": 100, "stored_value_fen": min(total // 2, 10000)}][i % 4]
        try:
            q = pricing.quote(lines, member, rules, now, store="S001", region="east", tender=tender)
        except pricing.PricingError:
            q = pricing.quote(lines, member, rules, now, store="S001", region="east")
        sale = {**q["record"], "id": "x" * 32}
        sales.append(q["record"])
        r = pricing.return_quote(sale, [{"line": k, "qty": l["qty"]} for k, l in enumerate(sale["lines"])],
                                 [], rules, now)
        returns.append(r["record"])
    topups = [pricing.topup(rules, member, amount_fen=a, now=now)["record"] for a in (5000, 10000, 50000, 100000)]
    return sales, returns, topups


class Stores:
    """100 stores, each journaling records in seq order; returns reverse earlier sales of the same store."""

    def __init__(self, accounts: list[tuple[str, str]], rules: dict, now: datetime, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.accounts = accounts
        self.sales, self.returns, self.topups = templates(rules, now)
        self.at, self.day = now.isoformat(), now.date().isoformat()
        self.seq = {f"S{i:03d}": 0 for i in range(STORES)}
        self.open_sales: dict[str, list] = {s: [] for s in self.seq}

    def record(self, store: str) -> SimpleNamespace:
        self.seq[store] += 1
        seq = self.seq[store]
        tx_id = f"{store}-{seq:010d}-{self.rng.getrandbits(64):016x}"
        card, account = self.rng.choice(self.accounts)
        counter = {"account_id": account, "day": self.day, "terminal": f"{store}-pos-1",
                   "idempotency_key": f"{store}-pos-1/k-{seq:012d}"}
        roll = self.rng.random()
        opened = self.open_sales[store]
        if roll < 0.15 and opened:
            sale_seq, sale_id, k, card, account = opened.pop(self.rng.randrange(len(opened)))
            body = {**self.returns[k], "sale_id": sale_id, "sale_seq": sale_seq, "at": self.at,
                    "member": {"member_id": account, "card_no": card, "tier": "gold"}, **counter,
                    "account_id": account}
        elif roll < 0.30:
            body = {**self.topups[seq % len(self.topups)], "member_id": account, "card_no": card,
                    "at": self.at, "payment": {"method": "cash"}, "lane": "1", **counter}
        else:
            k = self.rng.randrange(len(self.sales))
            body = {**self.sales[k], "at": self.at, "member": {"member_id": account, "card_no": card, "tier": "gold"},
                    "store": store, "lane": "1", **counter}
            opened.append((seq, tx_id, k, card, account))
        return SimpleNamespace(seq=seq, id=tx_id, type=body["type"], ts=0, body=body)

    def batches(self, n_records: int) -> list[tuple[str, list]]:
        """Store batches, round robin over the stores, BATCH records each."""
        out, made = [], 0
        stores = list(self.seq)
        while made < n_records:
            for s in stores:
                k = min(BATCH, n_records - made)
                if k <= 0:
                    break
                out.append((s, [self.record(s) for _ in range(k)]))
                made += k
        return out


# ---------------------------------------------------------------- databases

@contextlib.contextmanager
def database(engine_name: str, workdir: Path):
    """A function making fresh, migrated databases: name -> engine."""
    engines = []
    if engine_name == "postgresql":
        from tests.pg import PostgresServer
        server = PostgresServer().start()   # its own temp dir: the postgres user must reach it

        def make(name: str):
            url = server.create_database(name)
            db.migrate(url)
            engines.append(db.open_engine(url))
            return engines[-1]
        try:
            yield make
        finally:
            for e in engines:
                e.dispose()
            server.remove()
    else:
        def make(name: str):
            url = f"sqlite:///{workdir / (name + '.db')}"
            db.migrate(url)
            engines.append(db.open_engine(url))
            return engines[-1]
        try:
            yield make
        finally:
            for e in engines:
                e.dispose()


def member_rows(n: int, offset: int = 0, rich: bool = True):
    for i in range(offset, offset + n):
        row = {"card_no": f"88{i:010d}", "member_id": f"M{i:09d}", "name": "王*", "tier": "gold",
               "points": 10 ** 7 if rich else i % 5000, "balance_fen": 10 ** 8 if rich else (i % 1000) * 100,
               "expires": "2030-12-31"}
        if i % 10 == 0:
            row["packages"] = {"car_wash10": 5}
        if i % 7 == 0:
            row["coupons"] = ["C2026-0001"]
        yield row


def populate(engine, n: int, clock, rich: bool = True) -> list[tuple[str, str]]:
    step = 50_000
    for start in range(0, n, step):
        with engine.begin() as conn:
            import_members(conn, member_rows(min(step, n - start), start, rich), clock=clock, start_watermarks=False)
    return [(f"88{i:010d}", f"M{i:09d}") for i in range(n)]


# ---------------------------------------------------------------- runs

def ingest(engine, store: AccountStore, batches) -> tuple[float, int]:
    applied = 0
    t0 = time.perf_counter()
    for name, records in batches:
        with engine.begin() as conn:
            ins = db.ledger_insert(conn, name, records)
            res = store.apply_batch(conn, name, ins.new)
            if res.set_aside:
                raise AssertionError(f"{name}: set aside {res.set_aside[:3]}")
            applied += len(res.applied)
    return time.perf_counter() - t0, applied


def one_per_transaction(engine, store: AccountStore, records: list[tuple[str, object]]) -> float:
    t0 = time.perf_counter()
    for name, r in records:
        with engine.begin() as conn:
            ins = db.ledger_insert(conn, name, [r])
            store.apply_batch(conn, name, ins.new)
    return time.perf_counter() - t0


def main() -> None:
    args = parse()
    from tests.pg import pg_bin
    engine_name = args.engine or ("postgresql" if pg_bin() else "sqlite")
    n_accounts = 20_000 if args.quick else 100_000
    n_records = 20_000 if args.quick else 200_000
    n_baseline = 1_000 if args.quick else 3_000
    n_snapshot = 100_000 if args.quick else 1_000_000
    now = datetime(2026, 11, 25, 15, 0, tzinfo=TZ)
    clock = now.timestamp
    rules = policy()
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sg-bench-hq-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with database(engine_name, workdir) as make:
            note(f"{engine_name}: {n_accounts} accounts, {n_records} records from {STORES} stores "
                 f"in batches of {BATCH}; baseline {n_baseline} records one transaction each")
            base_engine, main_engine = make("baseline"), make("ingest")
            accounts = populate(base_engine, n_accounts, clock)
            populate(main_engine, n_accounts, clock)
            batches = Stores(accounts, rules, now).batches(n_records)
            flat = [(name, r) for name, rs in batches for r in rs]

            # Baseline first: the same records in the same order, one transaction per record.
            base_store = AccountStore(base_engine, clock=clock)
            base_s = one_per_transaction(base_engine, base_store, flat[:n_baseline])
            base_rate = n_baseline / base_s

            store = AccountStore(main_engine, clock=clock)
            elapsed, applied = ingest(main_engine, store, batches)
            assert applied == n_records, (applied, n_records)
            rate = n_records / elapsed
            # exactly once: every batch again applies nothing
            again_s, again = ingest(main_engine, store, batches[:STORES])
            assert again == 0
            with main_engine.begin() as conn:
                problems = audit(conn)
                marks = store.watermarks(conn)
            assert problems == [], problems[:5]
            assert sum(marks.values()) == n_records
            emit("hq_ingest_rate", rate, "records/s", "one transaction per record", base_rate,
                 engine=engine_name, stores=STORES, batch=BATCH, records=n_records, accounts=n_accounts,
                 resent_batches_applied=again, audit="every balance = sum of its history")

            # Snapshot of n_snapshot accounts.
            snap_engine = make("snapshot")
            t0 = time.perf_counter()
            populate(snap_engine, n_snapshot, clock, rich=False)
            note(f"snapshot: {n_snapshot} accounts imported in {time.perf_counter() - t0:.1f} s")
            with snap_engine.connect() as conn:
                if engine_name == "postgresql":
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    t0 = time.perf_counter()
                    snap = snapshot_rows(conn, "S001")
                    parts, part, rows = [], [], 0
                    rows_s = 0.0
                    for row in snap:
                        part.append(row)
                        rows += 1
                        if len(part) >= MEMBERS_PER_PART:
                            t1 = time.perf_counter()
                            parts.append(encode_table(part))
                            rows_s -= time.perf_counter() - t1
                            part = []
                    if part:
                        t1 = time.perf_counter()
                        parts.append(encode_table(part))
                        rows_s -= time.perf_counter() - t1
                    build_s = time.perf_counter() - t0
            assert rows == n_snapshot
            emit("snapshot_build_s", build_s, "s", engine=engine_name, accounts=n_snapshot, rows=rows,
                 parts=len(parts), bytes=sum(map(len, parts)), rows_only_s=round(build_s + rows_s, 3),
                 target="<= 30 s for 1,000,000 accounts",
                 **({"quick": f"{n_snapshot} accounts, not 1,000,000"} if args.quick else {}))
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
