"""HQ ingest with account application, exactly once; and the member snapshot build.

    python -m bench.hq_ingest [--quick] [--engine sqlite|postgresql] [--workers N]

Metrics:

- ``hq_ingest_rate`` (records/s): 100 simulated stores send batches of
  records built like real ones (sales, top-ups, returns of earlier sales,
  from gateway/core/pricing.py on the demo rules, on accounts drawn at
  random from the whole member base) as the wire's tx batch payloads; each
  is decoded (``TxBatch.decode``) and committed by HQ's ledger
  (``Ledger.commit``: the ledger insert and the accounts applied in one
  database transaction, with the on-ingest hooks the ledger wires, tier
  upgrades and reconciliation, fed by the chain's rules stored in the
  database), as the bridge does with every batch it receives. The chain
  layer is the demo's with the account rules of wire/RULESET.md (tier
  upgrades, points expiry, reconciliation's block). ``--workers N``: N
  ingest processes, each with its own connections and a share of the
  stores (N bridges in one ``hq.share_group`` get batches round robin
  instead, so two may hold one store's batches, and the per-store lock
  makes one wait: this is the better case); the rate is over the span from
  the first start to the last end. ``python_cpu_us_per_record``: the
  ingest processes' CPU (the database server's not included). Every batch
  is then sent again, and must apply nothing. Baseline, in the same run on
  the same engine: the same records, one batch (so one transaction) per
  record, one worker (a prefix of them: it is slow).
- ``snapshot_build_s`` (s): the member part for 1,000,000 accounts
  (``--quick``: 100,000, and says so): every row from HQ's accounts in one
  read transaction with the store's watermark, encoded into parts as
  ``rules publish`` sends them (wire.messages.encode_table, 100,000 rows per part).

Where the time goes (one worker, 20,000 records on 20,000 accounts, the
2-core development machine with PostgreSQL 15 on the same cores; phase
timers and pg_stat_statements, December 2026): per record about 240 us of
wall time, of which about 160 us of Python in the ingest process and about
100 us of PostgreSQL server CPU. By phase (wall, Python and server): decoding
the wire batch 21 (of which JSON 11), the ledger insert 28 (its COPY 16),
the body schemas 17, loading the accounts 39, applying the records 27,
writing the accounts 51 (history 12, accounts 16, points lots 13), the tier
hook 21 (the window sums 9 of server time), the reconciliation hook 9 (both
now take the tiers and overdrafts of the batch's accounts from the batch
instead of reading them again). With
the collector at CPython's defaults the same run took 290 us a record
(common/runtime.py). Two workers: the cores are busy (about 270 us of CPU a
record between the workers and the server: at most about 7,400 records/s),
and sampling pg_stat_activity shows the two backends waiting on each
other's row locks a fifth of the time (two batches of 500 records on
100,000 accounts share a few accounts); store batches of 250 halve the
waits but cost more per record, for the same rate.

``--engine postgresql`` (the default where it is installed) starts a
throw-away PostgreSQL on a free port (tests/pg.py); ``sqlite`` uses a file
in a temp dir. Both run the same code on the same schema (Alembic migrations).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson

from bench.common import emit, note
from common import runtime
from gateway.core import pricing
from hq_bridge import db, migrations
from hq_bridge.accounts import AccountStore, audit, import_members, snapshot_rows
from hq_bridge.ledger import Ledger
from hq_bridge.rules import MEMBERS_PER_PART, _read_doc
from wire.distribution import effective_rules
from wire.messages import TxBatch, TxRecord, encode_table

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
TZ = ZoneInfo("Asia/Shanghai")
STORES = 100
BATCH = 500           # records per store batch (the gateway's uplink sends up to batch_max)
TIERS = ("normal", "silver", "gold")
WORKERS = 2


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (fewer records and accounts)")
    p.add_argument("--engine", choices=["sqlite", "postgresql"], default=None,
                   help="default: postgresql where it is installed, else sqlite")
    p.add_argument("--dir", default=None, help="where to put files (default: a temp dir)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"ingest workers, each a process taking a share of the stores (default: {WORKERS} on "
                        "PostgreSQL, 1 on SQLite, which has one writer at a time)")
    return p.parse_args()


# ---------------------------------------------------------------- records like the gateway's

def policy() -> dict:
    docs = [_read_doc(EXAMPLES / n) for n in ("chain.toml", "region-east.toml", "store-S001.toml")]
    return {**effective_rules(docs, store="S001", region="east"), "version": 1}


def chain_layer() -> dict:
    """The demo chain layer with HQ's account rules as wire/RULESET.md shows
    them ("Accounts at HQ"): tiers that move up on ingest, points that
    expire, overdrafts blocked."""
    doc = _read_doc(EXAMPLES / "chain.toml")
    tiers = doc["tiers"]
    tiers["silver"]["upgrade"] = {"spend_fen": 100000, "window_days": 365}
    tiers["gold"]["upgrade"] = {"spend_fen": 500000, "points_earned": 5000, "window_days": 365}
    tiers["gold"]["downgrade"] = {"spend_fen": 200000, "window_days": 365}
    tiers["diamond"]["upgrade"] = {"spend_fen": 2000000, "window_days": 365}
    return {**doc, "accounts": {"spend_order": "proportional", "points_expiry_months": 24, "card_valid_months": 36},
            "reconciliation": {"overdraft_policy": "block", "tolerance_fen": 500, "tolerance_points": 100}}


def store_chain_layer(engine) -> None:
    """What ``storegate-hq rules publish`` keeps of the chain layer, read by the ledger's ChainRules."""
    with engine.begin() as conn:
        db.upsert(conn, db.rule_layers, [{"scope": "chain", "doc": orjson.dumps(chain_layer()).decode(),
                                          "updated_at": int(time.time())}], ["scope"])


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

    def record(self, store: str) -> TxRecord:
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
        return TxRecord(seq, tx_id, body["type"], 0, body)

    def batches(self, n_records: int) -> list[TxBatch]:
        """Store batches, round robin over the stores, BATCH records each."""
        out, made = [], 0
        stores = list(self.seq)
        while made < n_records:
            for s in stores:
                k = min(BATCH, n_records - made)
                if k <= 0:
                    break
                out.append(TxBatch(s, [self.record(s) for _ in range(k)]))
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
            migrations.migrate(url)
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
            migrations.migrate(url)
            engines.append(db.open_engine(url))
            return engines[-1]
        try:
            yield make
        finally:
            for e in engines:
                e.dispose()


def member_rows(n: int, offset: int = 0, rich: bool = True):
    for i in range(offset, offset + n):
        row = {"card_no": f"88{i:010d}", "member_id": f"M{i:09d}", "name": "王*", "tier": TIERS[i % 3],
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

def ingest(ledger: Ledger, payloads: list[bytes]) -> tuple[float, int]:
    """Every payload as the bridge takes it (decoded, committed by the
    ledger): (seconds, records applied to the accounts)."""
    applied = 0
    t0 = time.perf_counter()
    for payload in payloads:
        batch = TxBatch.decode(payload)
        done = ledger.commit(batch)
        if done.accounts is not None:
            if done.accounts.set_aside:
                raise AssertionError(f"{batch.store}: set aside {done.accounts.set_aside[:3]}")
            applied += len(done.accounts.applied)
    return time.perf_counter() - t0, applied


def _ingest_worker(url: str, payloads: list[bytes], ready, out) -> None:
    try:
        engine = db.open_engine(url)
        try:
            ledger = Ledger(engine=engine, migrate=False)
            runtime.tune_gc()   # as the bridge does once its ledger is open (common/runtime.py)
            ready.wait(600)
            t0, c0 = time.perf_counter(), time.process_time()
            elapsed, applied = ingest(ledger, payloads)
            out.put((t0, t0 + elapsed, applied, time.process_time() - c0))
        finally:
            engine.dispose()
    except BaseException as exc:   # the parent says what failed
        out.put(f"{type(exc).__name__}: {exc}")
        raise


def ingest_in_workers(url: str, batches: list[TxBatch], payloads: list[bytes],
                      workers: int) -> tuple[float, int, float]:
    """The payloads shared out by store among ``workers`` processes, each with
    its own ledger and connections taking its stores' batches in order (as
    several bridge processes, each subscribed to a share of the stores):
    (seconds from the first start to the last end, records applied, CPU
    seconds of the workers)."""
    owner: dict[str, int] = {}
    shares: list[list[bytes]] = [[] for _ in range(workers)]
    for b, payload in zip(batches, payloads):
        shares[owner.setdefault(b.store, len(owner) % workers)].append(payload)
    ctx = multiprocessing.get_context("spawn")    # no connections inherited from this process
    ready, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_ingest_worker, args=(url, share, ready, out)) for share in shares]
    for p in procs:
        p.start()
    done = [out.get() for _ in procs]
    for p in procs:
        p.join()
    failed = [d for d in done if isinstance(d, str)]
    if failed:
        raise RuntimeError(f"ingest worker failed: {failed[0]}")
    return (max(d[1] for d in done) - min(d[0] for d in done), sum(d[2] for d in done),
            sum(d[3] for d in done))


def main() -> None:
    args = parse()
    from tests.pg import pg_bin
    engine_name = args.engine or ("postgresql" if pg_bin() else "sqlite")
    workers = args.workers or (WORKERS if engine_name == "postgresql" else 1)
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
            for e in (base_engine, main_engine):
                store_chain_layer(e)
            batches = Stores(accounts, rules, now).batches(n_records)
            payloads = [b.encode() for b in batches]

            # Baseline first: the same records in the same order, one batch (one transaction) per record.
            singles = [TxBatch(b.store, [r]).encode() for b in batches for r in b.records][:n_baseline]
            base_ledger = Ledger(engine=base_engine, migrate=False)
            base_s, _ = ingest(base_ledger, singles)
            base_rate = n_baseline / base_s

            ledger = Ledger(engine=main_engine, migrate=False)
            if workers == 1:
                runtime.tune_gc()
                c0 = time.process_time()
                elapsed, applied = ingest(ledger, payloads)
                cpu = time.process_time() - c0
            else:
                url = main_engine.url.render_as_string(hide_password=False)
                elapsed, applied, cpu = ingest_in_workers(url, batches, payloads, workers)
            assert applied == n_records, (applied, n_records)
            rate = n_records / elapsed
            # exactly once: every batch again applies nothing
            again_s, again = ingest(ledger, payloads[:STORES])
            assert again == 0
            with main_engine.begin() as conn:
                problems = audit(conn)
                marks = AccountStore().watermarks(conn)
            assert problems == [], problems[:5]
            assert sum(marks.values()) == n_records
            emit("hq_ingest_rate", rate, "records/s", "one transaction per record", base_rate,
                 engine=engine_name, workers=workers, stores=STORES, batch=BATCH, records=n_records,
                 accounts=n_accounts, python_cpu_us_per_record=round(cpu / n_records * 1e6, 1),
                 resent_batches_applied=again, audit="every balance = sum of its history",
                 path="TxBatch.decode + Ledger.commit (tier and reconcile hooks, chain rules from the database)")

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
