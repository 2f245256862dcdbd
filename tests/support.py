"""Helpers for tests that run the real services as processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from demo.testbed import free_port, http_json, provision_terminals, role_for, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RULES_FILE = ROOT / "deploy" / "examples" / "rules.demo.toml"
GOLD_UID = "04A1B2C3D4E5F6"          # 880000000013, gold, 5% off, 1.5x points
SILVER_CARD = "880000000021"
LOST_CARD = "880000000054"


def wait_until(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Service:
    """A storegate process with its config file and log."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def hq_key_path(tmp: Path) -> Path:
    return tmp / "hq-keys" / "hq.key"


def hq_public_key(tmp: Path) -> str | None:
    """HQ's public key for the gateways of a test (made by HQ(tmp, ...))."""
    pub = hq_key_path(tmp).with_name("hq.key.pub")
    return pub.read_text().strip() if pub.exists() else None


class HQ(Service):
    """The HQ bridge process, with a throwaway signing key and a [stores] table.
    ``database``: a database URL (PostgreSQL: tests/pg.py) instead of the
    SQLite file ``db``; ``url`` is the one in use."""

    def __init__(self, tmp: Path, broker_port: int, stores: dict[str, str | None] | None = None,
                 database: str | None = None) -> None:
        from hq_bridge import keys

        self.db = tmp / "hq" / "ledger.sqlite3"
        self.db.parent.mkdir(parents=True, exist_ok=True)   # tests may look for the database before HQ is up
        self.url = database or f"sqlite:///{self.db}"
        self.key = hq_key_path(tmp)
        if not self.key.exists():
            keys.generate(self.key)
        stores = stores if stores is not None else {"S001": None}
        stores_toml = "".join(f'[stores.{s}]\n' + (f'region = "{r}"\n' if r else "") for s, r in stores.items())
        self.config = write_toml(tmp / "hq.toml", f"""
[hq]
database = "{database or self.db}"
parts_dir = "{tmp / 'hq' / 'parts'}"
signing_key = "{self.key}"
resync_min_interval_s = 1
[mqtt]
host = "127.0.0.1"
port = {broker_port}
keepalive = 5
{stores_toml}
""")
        super().__init__([str(BIN / "storegate-hq"), "run", "--config", str(self.config)], tmp / "hq.log")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "storegate-hq"), *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout)

    def publish_rules(self, store: str | None = None, rules_file: Path = RULES_FILE) -> subprocess.CompletedProcess:
        """The demo rule set is a chain layer: to every store, or as a store layer with ``store``."""
        scope = ["--store", store] if store else ["--all"]
        return self.cli("rules", "publish", str(rules_file), *scope)

    def rows(self, store: str = "S001") -> list[tuple]:
        if not self.url.startswith("sqlite"):
            import sqlalchemy as sa

            from hq_bridge import db
            engine = db.open_engine(self.url)
            try:
                with engine.connect() as conn:
                    t = db.transactions
                    return [tuple(r) for r in conn.execute(sa.select(t.c.seq, t.c.tx_id, t.c.type, t.c.body)
                                                           .where(t.c.store == store).order_by(t.c.seq))]
            except sa.exc.SQLAlchemyError:
                return []
            finally:
                engine.dispose()
        if not self.db.exists():
            return []
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute("SELECT seq, tx_id, type, body FROM transactions WHERE store=? ORDER BY seq",
                                (store,)).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()


class GatewayProc(Service):
    def __init__(self, tmp: Path, mqtt_port: int, store: str = "S001", lanes=("1", "2"), extra: str = "",
                 uplink: dict | None = None) -> None:
        self.api_port = free_port()
        uplink = {"resend_after_s": 2, "status_interval_s": 1, **(uplink or {})}
        uplink_toml = "".join(f"{k} = {v}\n" for k, v in uplink.items())
        self.data_dir = tmp / "store"
        self.terminals_file = tmp / "terminals.json"
        self.tokens = provision_terminals(self.terminals_file)  # role -> token, every lane
        lanes_toml = "".join(f'\n[[lanes]]\nid = "{l}"\nreader = "simulated"\n' for l in lanes)
        key = hq_public_key(tmp)
        rules_toml = f'[rules]\nhq_public_keys = ["{key}"]\n' if key else ""
        self.config = write_toml(tmp / "gateway.toml", f"""
[store]
id = "{store}"
data_dir = "{self.data_dir}"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
keepalive = 5
[api]
host = "127.0.0.1"
port = {self.api_port}
terminals_file = "{self.terminals_file}"
[uplink]
{uplink_toml}
{rules_toml}
{extra}
{lanes_toml}
""")
        super().__init__([str(BIN / "storegate"), "run", "--config", str(self.config)], tmp / "gateway.log")

    def start(self) -> "GatewayProc":
        super().start()
        try:
            wait_for_port(self.api_port, 15)
        except TimeoutError:
            raise AssertionError(f"gateway did not start; its log:\n{self.log()[-3000:]}") from None
        return self

    def call(self, method: str, path: str, body=None, *, role: str | None = None, **kw) -> tuple[int, dict]:
        """A call as the terminal a POS-side caller of ``path`` would be
        (``role`` to choose; ``token=None`` or another token to override)."""
        kw.setdefault("token", self.tokens[role or role_for(method, path)])
        return http_json(self.api_port, method, path, body, **kw)

    def status(self) -> dict:
        return self.call("GET", "/status")[1]

    def journal_seqs(self) -> list[int]:
        """Sequence numbers still pending in the journal on disk."""
        from gateway.store.journal import read_index

        return sorted(read_index(self.data_dir / "journal").pending)


def start_shop(tmp: Path, broker_port: int, *, database: str | None = None,
               rules_file: Path = RULES_FILE) -> tuple[HQ, GatewayProc]:
    """A store as the end-to-end tests start it: HQ running with the rule set
    published (its inline members imported into HQ's accounts) and a gateway
    that has applied it (rules version 1). The caller stops both."""
    hq = HQ(tmp, broker_port, database=database).start()
    published = hq.publish_rules(rules_file=rules_file)
    assert published.returncode == 0, published.stderr
    gw = GatewayProc(tmp, broker_port).start()
    wait_until(lambda: gw.status()["rules_version"] == 1, what="rules applied at the gateway")
    return hq, gw


@contextmanager
def running_shop(tmp: Path, broker_port: int, **kw):
    """``start_shop`` for a ``with`` block (or a fixture): (hq, gw), both stopped after."""
    hq, gw = start_shop(tmp, broker_port, **kw)
    try:
        yield hq, gw
    finally:
        gw.stop()
        hq.stop()


@contextmanager
def offline_gateway(tmp: Path, *, lanes: str, api: str = "", nofile: int | None = None):
    """`storegate run` on its own, the link to HQ down (no broker at its
    address): the demo rules installed on disk, one terminal of each role,
    the ``lanes`` tables ([[lanes]] TOML), more ``api`` keys, and with
    ``nofile`` that limit on file descriptors (systemd gives a service 1,024).
    Yields port, tokens (role -> token), pid, tmp and log(); stops it after."""
    import resource
    from types import SimpleNamespace

    from gateway.store.rules import RulesStore

    data_dir = tmp / "store"
    hq_key = test_hq_public_key()
    install_rules(RulesStore(data_dir / "rules", "S001", public_keys=[hq_key]))
    tokens = provision_terminals(data_dir / "terminals.json")
    port = free_port()
    config = write_toml(tmp / "gateway.toml", f"""
[store]
id = "S001"
data_dir = "{data_dir}"
[mqtt]
host = "127.0.0.1"
port = {free_port()}
[api]
host = "127.0.0.1"
port = {port}
{api}
[rules]
hq_public_keys = ["{hq_key}"]
{lanes}
""")
    log_path = tmp / "gateway.log"
    limit = None
    if nofile is not None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))  # noqa: E731
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(BIN / "storegate"), "run", "--config", str(config)], stdout=log_file,
                                stderr=subprocess.STDOUT, preexec_fn=limit)
    gw = SimpleNamespace(port=port, tokens=tokens, pid=proc.pid, tmp=tmp,
                         log=lambda: log_path.read_text(errors="replace"))
    try:
        try:
            wait_for_port(port, 20)
        except TimeoutError:
            raise AssertionError(f"gateway did not start:\n{gw.log()[-3000:]}") from None
        yield gw
    finally:
        proc.terminate()
        proc.wait(15)


def api_client(gw):
    """The POS API of an in-process Gateway under Microdot's test client,
    each call made as the terminal a POS-side caller of its path would be
    (``client.tokens``: role -> token)."""
    from microdot.test_client import TestClient

    from gateway.shell.api import create_app
    from gateway.shell.terminals import Terminals

    path = Path(gw.config["store"]["data_dir"]) / "terminals.json"
    tokens = provision_terminals(path)

    class Client(TestClient):
        async def request(self, method, path, headers=None, body=None, sock=None):
            headers = {"Authorization": f"Bearer {tokens[role_for(method, path)]}", **(headers or {})}
            return await super().request(method, path, headers, body, sock)

    client = Client(create_app(gw, Terminals(path)), host="127.0.0.1:8080")
    client.tokens = tokens
    return client


def sale_body(key: str, lines=None, member=None) -> dict:
    body = {"idempotency_key": key, "lines": lines or [
        {"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1, "unit_price": 4990}]}
    if member is not None:
        body["member"] = member
    return body


def ledger_by_id(hq: HQ, store: str = "S001") -> dict[str, int]:
    """tx_id -> how many rows HQ holds for it (must be 1)."""
    out: dict[str, int] = {}
    for _seq, tx_id, _t, _b in hq.rows(store):
        out[tx_id] = out.get(tx_id, 0) + 1
    return out


__all__ = ["json"]


class ProxyThread:
    """demo.testbed.LinkProxy on its own event loop in a thread, for sync tests."""

    def __init__(self, target_port: int, latency_s: float = 0.0) -> None:
        import asyncio
        import threading

        from demo.testbed import LinkProxy

        self.loop = asyncio.new_event_loop()
        self.proxy = LinkProxy(target_port, latency_s=latency_s)
        self.port = self.proxy.port
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.proxy.start())

    def _call(self, coro_or_fn):
        import asyncio

        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(10)
        done = __import__("concurrent.futures").futures.Future()
        self.loop.call_soon_threadsafe(lambda: done.set_result(coro_or_fn()))
        return done.result(10)

    def cut(self):
        self._call(self.proxy.cut)

    def restore(self):
        self._call(self.proxy.restore)

    def stall(self):
        self._call(self.proxy.stall)

    def unstall(self):
        self._call(self.proxy.unstall)

    def set_latency(self, seconds: float):
        self._call(lambda: setattr(self.proxy, "latency_s", seconds))

    def close(self):
        self._call(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class PosLanes:
    """POS terminals committing sales on several lanes, as a real POS does:
    a request that got no answer is retried with the same idempotency key
    until it gets one. ``told`` holds what the POS was told is committed."""

    def __init__(self, gw: "GatewayProc", lanes=("1", "2"), pause_s: float = 0.005) -> None:
        import threading

        self.gw = gw
        self.lanes = lanes
        self.pause_s = pause_s
        self.told: dict[str, int] = {}       # tx_id -> seq
        self.keys: dict[str, str] = {}       # idempotency key -> tx_id
        self.refused: list = []              # 4xx/5xx answers (should stay empty)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(lane,), daemon=True) for lane in lanes]

    def start(self) -> "PosLanes":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, lane: str) -> None:
        import uuid

        n = 0
        while not self._stop.is_set():
            n += 1
            key = f"pos{lane}-{uuid.uuid4().hex[:16]}"
            body = sale_body(key, member=False)
            while True:  # until this sale has a complete answer
                try:
                    status, answer = self.gw.call("POST", f"/lanes/{lane}/sales", body, timeout=5)
                except (OSError, http.client.HTTPException, ValueError):
                    time.sleep(0.05)     # gateway down or the answer cut off: retry the same sale
                    continue
                if status in (200, 201) and "seq" not in answer:
                    continue
                break
            with self._lock:
                if status in (200, 201):
                    self.told[answer["tx_id"]] = answer["seq"]
                    self.keys[key] = answer["tx_id"]
                else:
                    self.refused.append((status, answer))
            time.sleep(self.pause_s)


def assert_hq_holds_exactly(hq: HQ, told: dict[str, int], timeout: float = 60.0) -> None:
    """The invariant: HQ's ledger holds exactly the sales the POS was told
    were committed, each once."""
    def settled():
        return set(ledger_by_id(hq)) == set(told)
    wait_until(settled, timeout, what=f"HQ to hold the {len(told)} committed sales")
    counts = ledger_by_id(hq)
    assert all(n == 1 for n in counts.values()), "a sale applied twice"
    rows = {tx_id: seq for seq, tx_id, _t, _b in hq.rows()}
    assert rows == told, "HQ's sequence numbers differ from what the POS was told"


# -- signed rule sets for in-process tests ------------------------------------

def test_hq_key():
    """A fixed throwaway HQ signing key for in-process tests (never used anywhere else)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def test_hq_public_key() -> str:
    from wire.signing import public_key_b64

    return public_key_b64(test_hq_key())


def signed_rules(rules_file: Path = RULES_FILE, *, store: str = "S001", version: int = 1,
                 now: float | None = None, key=None, **kw) -> tuple[bytes, dict[str, bytes]]:
    """(manifest payload, parts) of the demo rule set, signed like HQ does."""
    from hq_bridge.rules import _read_doc, offline_rule_set

    docs = [_read_doc(rules_file)] if isinstance(rules_file, (str, Path)) else list(rules_file)
    return offline_rule_set(docs, store=store, version=version,
                            issued_at=int(now if now is not None else time.time()), key=key or test_hq_key(), **kw)


def install_rules(target, rules_file: Path = RULES_FILE, *, version: int = 1, now: float | None = None, **kw):
    """Apply a signed rule set to a Gateway (or RulesStore) without a broker;
    the gateway is provisioned with the test HQ key first."""
    rules = getattr(target, "rules", target)
    if test_hq_public_key() not in rules.keyring.public_keys():
        rules.keyring.add(test_hq_public_key())
    payload, parts = signed_rules(rules_file, store=rules.store, version=version, now=now, **kw)
    return rules.install(payload, parts)


class DarkProxyThread(ProxyThread):
    """A ProxyThread whose ``cut()`` makes the link go dark the way a dead
    uplink does: open connections are dropped (the client notices at once),
    and new connection attempts get no answer (they are held, as packets to
    a dead route are, instead of being refused at once, so the client's
    reconnect backoff does not climb for as long as the link is down).
    ``restore()`` lets the attempts held go through to the broker: a client
    in the middle of one is connected at once, as when a link comes back
    within the connect timeout."""

    def __init__(self, target_port: int, latency_s: float = 0.0) -> None:
        import asyncio
        import threading

        from demo.testbed import LinkProxy

        class DarkLinkProxy(LinkProxy):
            def __init__(self, *args, **kw) -> None:
                super().__init__(*args, **kw)
                self.back = asyncio.Event()
                self.back.set()
                self.held: set = set()
                self.closed = False

            def cut(self) -> None:
                self.back.clear()
                super().cut()

            def restore(self) -> None:
                super().restore()
                self.back.set()

            async def stop(self) -> None:
                await super().stop()
                self.closed = True
                for w in list(self.held):
                    w.transport.abort()
                self.back.set()
                await asyncio.sleep(0)

            async def _accept(self, client_r, client_w) -> None:
                self.held.add(client_w)
                try:
                    await self.back.wait()     # held, unanswered, while the link is dark
                finally:
                    self.held.discard(client_w)
                if self.closed:
                    client_w.transport.abort()
                    return
                await super()._accept(client_r, client_w)

        self.loop = asyncio.new_event_loop()
        self.proxy = DarkLinkProxy(target_port, latency_s=latency_s)
        self.port = self.proxy.port
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.proxy.start())


class RefusingProxyThread(ProxyThread):
    """A ProxyThread whose ``cut()`` refuses new connections the way a host
    with nothing listening does (ECONNREFUSED at once): open connections are
    dropped and the port is closed until ``restore()`` listens on it again.
    (LinkProxy's own cut accepts each new connection and then resets it; the
    MQTT client, aiomqtt 2.5, ignores a connection lost before CONNACK and
    waits out its 10 s timeout on every such attempt.)"""

    def cut(self):
        def close_port():
            self.proxy.cut()
            self.proxy._server.close()     # stops listening at once
        self._call(close_port)

    def restore(self):
        import asyncio

        async def listen_again():
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.proxy._server = await asyncio.start_server(self.proxy._accept, "127.0.0.1", self.port)
                    break
                except OSError:   # the kernel lent the port to a client's connection meanwhile: it is short-lived
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            self.proxy.restore()
        self._call(listen_again())


# -- hostile payloads ------------------------------------------------------------

def zlib_bomb(inflated: int, byte: bytes = b" ", step: int = 1 << 20) -> bytes:
    """A zlib stream of about inflated / 1000 bytes that inflates to ``inflated``
    bytes of ``byte``. Made without compressing them all (a gigabyte took
    zlib.compress ~5 s): a full flush resets the compressor, so every step
    compresses to the same block and the stream is that block repeated, then
    the end and the Adler-32 of the whole."""
    assert inflated % step == 0 and len(byte) == 1
    import struct
    import zlib

    c = zlib.compressobj(9)
    head = c.compress(byte * step) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(byte * step) + c.flush(zlib.Z_FULL_FLUSH)
    assert head[2:] == block                       # the same block, after the 2-byte zlib header
    end = c.flush(zlib.Z_FINISH)[:-4]             # the final (empty) block, without its Adler-32
    # Adler-32 of n bytes of value v: A = 1 + n*v, B = n + v*n*(n+1)/2 (both mod 65521).
    n, v = inflated, byte[0]
    adler = ((n + v * n * (n + 1) // 2) % 65521) << 16 | (1 + n * v) % 65521
    return head + block * (inflated // step - 1) + end + struct.pack(">I", adler)
