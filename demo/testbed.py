"""A whole store on one machine: the broker and the network the demo and the
tests run against. Not used by the gateway in production.

- MosquittoBroker: a real mosquitto on a free loopback port, killable and
  restartable (outages), with persistence so QoS 1 sessions survive restarts.
- EmbeddedBroker: amqtt in-process, for a demo machine without mosquitto.
- LinkProxy: a TCP proxy between gateway and broker that can cut the link
  (drop connections, refuse new ones) and add latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


@dataclass(frozen=True)
class TestPKI:
    """A throwaway CA, a server certificate for 127.0.0.1 and client
    certificates (CN = the MQTT username under use_identity_as_username)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def mqtt_tls(self, name: str | None) -> dict:
        """The ``[mqtt.tls]`` table for a client with certificate ``name`` (None: no client cert)."""
        tls = {"ca_file": str(self.ca)}
        if name:
            tls |= {"cert_file": str(self.cert(name)), "key_file": str(self.key(name))}
        return tls


def make_test_pki(directory: str | Path, clients: list[str], *, days: int = 2) -> TestPKI:
    """Generate the test PKI with ``cryptography`` (EC P-256 keys, key files mode 0600)."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "storegate test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key) -> None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("storegate test CA")).issuer_name(name("storegate test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        stem = "server" if server else cn
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(d / f"{stem}.key", key)

    issue("localhost", True)
    for cn in clients:
        issue(cn, False)
    return TestPKI(d, d / "ca.pem", d / "server.pem", d / "server.key")


class MosquittoBroker:
    """A real mosquitto on 127.0.0.1; ``kill()`` and ``start()`` simulate outages.

    With ``pki`` the listener speaks TLS only and requires a client
    certificate whose CN becomes the username (``use_identity_as_username``);
    with ``acl_file`` (e.g. deploy/mosquitto/acl) access is limited by it."""

    def __init__(self, workdir: str | Path | None = None, port: int | None = None, *,
                 pki: TestPKI | None = None, acl_file: str | Path | None = None) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (Debian package 'mosquitto')")
        self.exe = exe
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sg-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        conf = self.workdir / "mosquitto.conf"
        security = "allow_anonymous true\n"
        if pki is not None:
            security = (f"user {getpass.getuser()}\n"  # as root, mosquitto would become 'mosquitto' and not read the keys
                        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
                        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n")
        if acl_file is not None:
            security += f"acl_file {acl_file}\n"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + security +
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"   # no cap on a persistent session's queue
            "max_inflight_messages 0\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        self.conf = conf

    def start(self) -> "MosquittoBroker":
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """An outage: SIGKILL, no goodbye to anyone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedBroker:
    """amqtt inside this process (``pip install storegate[embedded-broker]``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._broker = None

    async def start(self) -> "EmbeddedBroker":
        from amqtt.broker import Broker  # optional dependency

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        await self._broker.start()
        return self

    async def stop(self) -> None:
        if self._broker:
            await self._broker.shutdown()
            self._broker = None


class LinkProxy:
    """TCP proxy on a free port forwarding to ``target_port``.

    ``cut()`` drops every open connection and refuses new ones until
    ``restore()``; ``stall()`` keeps connections open but forwards nothing
    until ``unstall()``; ``latency_s`` delays every byte by that much in each
    direction (a delay line: throughput is not limited by the latency).
    """

    def __init__(self, target_port: int, *, latency_s: float = 0.0) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.latency_s = latency_s
        self.up = True
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> "LinkProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.up = False
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()

    def restore(self) -> None:
        self.up = True
        self._flowing.set()

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if not self.up:
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._conns.update((client_w, server_w))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w),
                                 return_exceptions=True)
        for w in (client_w, server_w):
            self._conns.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due, data = await line.get()
                if data is None:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while self.up:
                data = await reader.read(65536)
                if not data:
                    break
                line.put_nowait((asyncio.get_running_loop().time() + self.latency_s, data))
            line.put_nowait((0, None))
            await sender
        finally:
            sender.cancel()
            writer.transport.abort()


def provision_terminals(path, lanes=("*",)) -> dict[str, str]:
    """One terminal of each role acting for ``lanes``, written as the
    terminals file at ``path`` (replacing it): role -> token. The demo's and
    the tests' credentials; a real store adds its own with `storegate terminals add`."""
    from pathlib import Path

    from gateway.shell import terminals

    tokens, rows = {}, {}
    for role in terminals.ROLES:
        tid, secret = f"test-{role.replace('_', '-')}", terminals.new_secret()
        rows[tid] = terminals.Terminal(tid, role, tuple(lanes), terminals.digest(secret), int(time.time()))
        tokens[role] = f"{tid}.{secret}"
    terminals.write_file(Path(path), rows)
    return tokens


def role_for(method: str, path: str) -> str:
    """The role a POS-side caller of this endpoint would have."""
    if path.endswith("/taps"):
        return "lane_terminal"
    if path.startswith(("/cards/", "/returns", "/withdrawals")):
        return "service_desk"
    if method == "POST":
        return "pos"
    return "manager"


def http_json(port: int, method: str, path: str, body=None, *, raw: bytes | None = None,
              token: str | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    """A POS-like HTTP/JSON call to the gateway (blocking; use asyncio.to_thread)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, (json.loads(payload) if payload else {})
    finally:
        conn.close()
