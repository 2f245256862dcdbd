"""The POS API's HTTP server under the attacks of the "safe by default" issue
(gateway/shell/http_server.py), on real sockets on loopback.

Two servers: a real ``storegate run`` (rules installed on disk, terminal
credentials, no broker needed) limited to 1,024 file descriptors as systemd
gives a service by default, for the attacks the issue saw on a store gateway;
and a tiny Microdot app in this process, with small timeouts, for each limit
on its own. The attacker uses the loopback address 127.0.0.2 so that the POS
(127.0.0.1) is another host.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import logging
import socket
import ssl
import time

import pytest
from microdot import Microdot
from microdot.sse import sse_response

from gateway.shell import config as gw_config
from gateway.shell.http_server import PosServer, ServerLimits, StartError
from tests import support

ATTACKER = "127.0.0.2"
FAST = ServerLimits(max_connections=8, max_connections_per_host=8, header_timeout_s=0.5, body_timeout_s=0.5,
                    max_header_bytes=4096, max_body_bytes=256 * 1024, max_event_streams=2)


# -- a client that shows what a POS would see ----------------------------------------

def request_bytes(method: str, path: str, body: bytes | dict | None = None, *, port: int = 0,
                  token: str | None = None) -> bytes:
    data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
            f"Content-Length: {len(data)}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def parse_answer(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, (json.loads(body) if body.strip() else {})


async def send(port: int, raw: bytes, *, source: str | None = None, ssl_ctx=None,
               timeout: float = 5.0) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                   local_addr=(source, 0) if source else None)
    try:
        writer.write(raw)
        return parse_answer(await asyncio.wait_for(reader.read(), timeout))
    finally:
        writer.close()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """What arrived before EOF or a reset."""
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def assert_error(answer: tuple[int, dict], status: int, code: str) -> None:
    got, body = answer
    assert got == status, answer
    error = body["error"]
    assert error["code"] == code and error["message"], answer
    assert error["text"]["zh-CN"] and error["text"]["en"], answer


# -- the tiny app ------------------------------------------------------------------------

def tiny_app() -> Microdot:
    app = Microdot()

    @app.get("/ping")
    async def ping(request):
        return {"ok": True}

    @app.post("/echo")
    async def echo(request):
        return {"length": len(request.body), "sha256": hashlib.sha256(request.body).hexdigest()}

    @app.get("/lanes/1/events")
    async def events(request):
        async def stream(request, sse):
            await sse.send("hello")
            await asyncio.sleep(3600)
        return sse_response(request, stream)

    @app.get("/lanes/2/events")
    async def plain_events(request):  # a plain async generator, not Microdot's SSE helper
        async def stream():
            try:
                yield b"data: hello\n\n"
                await asyncio.sleep(3600)
            finally:
                app.streams_ended += 1
        return stream(), 200, {"Content-Type": "text/event-stream"}

    app.streams_ended = 0
    return app


def tiny_server(limits: ServerLimits = FAST, **kw) -> PosServer:
    return PosServer(tiny_app(), limits, host="127.0.0.1", port=0, **kw)


# -- a real gateway ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """`storegate run` with the demo rules and a POS credential, 1,024 file
    descriptors, and limits sized so an attacker's sockets outlive the test."""
    api = """
max_connections = 64
max_connections_per_host = 16
header_timeout_s = 2
body_timeout_s = 2
"""
    lanes = """
[[lanes]]
id = "1"
reader = "terminal"
"""
    with support.offline_gateway(tmp_path_factory.mktemp("http-limits"), api=api, lanes=lanes, nofile=1024) as gw:
        yield gw


def vm_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def basket(n: int) -> list[dict]:
    categories = ["dairy", "snacks", "fresh"]
    return [{"sku": f"69{i:011d}", "name": f"商品 {i} 原味酸奶 450g", "category": categories[i % 3],
             "qty": 1 + i % 3, "unit_price": 150 + (i * 397) % 4800} for i in range(n)]


async def test_idle_sockets_from_one_host_leave_the_pos_served(gateway):
    # The issue: 1,100 idle sockets from one host, and 0 of 30 POS calls answered.
    attack = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", gateway.port, local_addr=(ATTACKER, 0))
                                    for _ in range(1100)))
    try:
        await asyncio.sleep(0.3)  # the gateway has seen them all
        quote = request_bytes("POST", "/lanes/1/quote", {"lines": basket(3), "member": False},
                              port=gateway.port, token=gateway.tokens["pos"])
        answers, took = [], []
        for _ in range(30):  # a POS, one call after the other
            t0 = time.monotonic()
            answers.append(await send(gateway.port, quote, timeout=3))
            took.append(time.monotonic() - t0)
        assert [status for status, _ in answers] == [200] * 30, answers[:3]
        assert max(took) < 1.0 and sum(took) < 2.5, took

        # The attacker held exactly its share until the header deadline; every
        # other socket was told why at once and closed.
        replies = [parse_answer(r) for r in await asyncio.gather(*(asyncio.wait_for(read_all(r), 5)
                                                                    for r, _ in attack))]
        held = [r for r in replies if r[0] == 408]
        refused = [r for r in replies if r[0] == 503]
        assert (len(held), len(refused)) == (16, 1100 - 16)
        assert_error(held[0], 408, "request_timeout")
        assert_error(refused[0], 503, "too_many_connections")
    finally:
        for _, writer in attack:
            writer.close()
    # Logged, but not once per socket.
    lines = [l for l in gateway.log().splitlines() if "api.max_connections_per_host" in l]
    assert 1 <= len(lines) <= 2, lines


async def test_a_57_mb_header_block_is_refused_and_memory_stays_bounded(gateway):
    hwm_before = vm_kb(gateway.pid, "VmHWM")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    answer = asyncio.create_task(read_all(reader))
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    pad = b"a" * 1000
    sent = 0
    try:
        while sent < 57 << 20:  # ~1 KiB header lines, each under any line limit, each a new name
            chunk = b"".join(b"X-Pad-%08d: %s\r\n" % (sent + i, pad) for i in range(256))
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)  # let the reader take the answer before the gateway's reset
            sent += len(chunk)
    except OSError:
        pass  # the gateway has stopped listening to us
    finally:
        writer.close()
    assert_error(parse_answer(await asyncio.wait_for(answer, 5)), 431, "headers_too_large")
    grown_mb = (vm_kb(gateway.pid, "VmHWM") - hwm_before) / 1024
    assert grown_mb < 16, f"peak memory grew by {grown_mb:.0f} MB"
    status, health = await send(gateway.port, request_bytes("GET", "/health", port=gateway.port))
    assert status == 200 and health["status"] == "ok"


async def test_a_500_line_basket_reaches_the_quote_intact(gateway):
    body = json.dumps({"lines": basket(500), "member": False}).encode()
    assert len(body) > 64 * 1024  # Microdot's 16 KiB body default refused ~124 lines
    status, quote = await send(gateway.port, request_bytes("POST", "/lanes/1/quote", body, port=gateway.port,
                                                           token=gateway.tokens["pos"]))
    assert status == 200, quote
    assert len(quote["lines"]) == 500
    assert quote["total"] == sum(l["qty"] * l["unit_price"] for l in basket(500))


# -- each limit on its own ------------------------------------------------------------------

async def test_over_the_connection_cap_503_at_once_and_idle_sockets_close_after_header_timeout():
    async with tiny_server() as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(8)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        assert_error(await send(server.port, request_bytes("GET", "/ping"), timeout=1), 503, "too_many_connections")
        assert time.monotonic() - t0 < 0.3
        answers = await asyncio.gather(*(read_all(r) for r, _ in idle))
        waited = time.monotonic() - t0
        assert 0.3 < waited < 1.5, waited
        for answer in answers:
            assert_error(parse_answer(answer), 408, "request_timeout")
        for _, w in idle:
            w.close()
        assert (await send(server.port, request_bytes("GET", "/ping")))[0] == 200
        stats = server.stats
        assert stats["refused_max_connections"] == 1 and stats["header_timeouts"] == 8
        assert stats["connections_open"] == 0 and stats["connections_peak"] == 8


async def test_a_slow_head_or_body_times_out():
    async with tiny_server() as server:
        async def trickle(data: bytes, head: bytes = b"", every_s: float = 0.05) -> tuple[tuple[int, dict], float]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            answer = asyncio.create_task(read_all(reader))
            writer.write(head)
            t0 = time.monotonic()
            try:
                for i in range(len(data)):
                    if answer.done():
                        break
                    writer.write(data[i:i + 1])
                    await asyncio.sleep(every_s)
            except OSError:
                pass
            got = parse_answer(await asyncio.wait_for(answer, 3))
            writer.close()
            return got, time.monotonic() - t0

        # Slowloris: a byte at a time keeps a per-read timeout happy, not a deadline.
        answer, took = await trickle(b"POST /echo HTTP/1.1\r\n" + b"X-Slow: 1\r\n" * 40)
        assert_error(answer, 408, "request_timeout")
        assert took < 1.5
        answer, took = await trickle(b"x" * 1000, head=b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        assert_error(answer, 408, "request_timeout")
        assert "body" in answer[1]["error"]["message"] and took < 1.5
        assert server.stats["header_timeouts"] == 1 and server.stats["body_timeouts"] == 1


async def test_content_length_over_the_cap_is_413_without_reading_the_body():
    async with tiny_server() as server:
        t0 = time.monotonic()
        answer = await send(server.port, b"POST /echo HTTP/1.1\r\nContent-Length: 57000000\r\n\r\n", timeout=2)
        assert_error(answer, 413, "too_large")
        assert time.monotonic() - t0 < 0.4  # answered, not waiting for 57 MB (or the body deadline)
        assert server.stats["body_too_large"] == 1


async def test_a_head_over_max_header_bytes_is_431():
    async with tiny_server() as server:
        answer = await send(server.port, b"GET /ping HTTP/1.1\r\n" + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n")
        assert_error(answer, 431, "headers_too_large")
        assert server.stats["head_too_large"] == 1


@pytest.mark.parametrize("raw,status,code", [
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "length_required"),
    (b"GET /ping\r\n\r\n", 400, "bad_request"),
    (b"GET /ping HTTP/2.0\r\n\r\n", 400, "bad_request"),
    (b"GET /ping HTTP/1.1\r\nno colon here\r\n\r\n", 400, "bad_request"),
    (b"GET /ping HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400, "bad_request"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, "bad_request"),
    (b"GET /ping HTTP/1.1\r\nX-Bytes: \xff\xfe\r\n\r\n", 400, "bad_request"),
])
async def test_malformed_and_chunked_requests_are_refused(raw, status, code):
    async with tiny_server() as server:
        assert_error(await send(server.port, raw), status, code)


async def test_a_large_body_reaches_the_handler_whole():
    body = json.dumps({"lines": basket(500)}).encode()
    async with tiny_server() as server:
        status, echo = await send(server.port, request_bytes("POST", "/echo", body))
    assert status == 200
    assert echo == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_event_streams_have_their_own_cap_and_end_with_their_client():
    async with tiny_server() as server:
        streams = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request_bytes("GET", "/lanes/1/events"))
            await asyncio.wait_for(reader.readuntil(b"data: hello\n\n"), 2)
            streams.append((reader, writer))
        assert server.stats["event_streams_open"] == 2
        assert server.stats["connections_open"] == 0  # streams do not hold the POS's connection slots
        assert_error(await send(server.port, request_bytes("GET", "/lanes/1/events")), 503, "too_many_event_streams")
        assert (await send(server.port, request_bytes("GET", "/ping")))[0] == 200

        streams.pop()[1].close()  # a POS goes away
        for _ in range(50):
            if server.stats["event_streams_open"] == 1:
                break
            await asyncio.sleep(0.01)
        assert server.stats["event_streams_open"] == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes("GET", "/lanes/1/events"))
        await asyncio.wait_for(reader.readuntil(b"data: hello\n\n"), 2)
        streams.append((reader, writer))
    # Closing the server ends the streams that are left.
    for reader, writer in streams:
        await asyncio.wait_for(read_all(reader), 2)
        writer.close()


async def test_a_plain_generator_stream_ends_with_its_client_and_with_the_server():
    async with tiny_server() as server:
        clients = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request_bytes("GET", "/lanes/2/events"))
            await asyncio.wait_for(reader.readuntil(b"data: hello\n\n"), 2)
            clients.append((reader, writer))
        clients[0][1].close()
        for _ in range(50):
            if server.app.streams_ended == 1:
                break
            await asyncio.sleep(0.01)
        assert server.app.streams_ended == 1 and server.stats["event_streams_open"] == 1
    assert server.app.streams_ended == 2
    assert await asyncio.wait_for(clients[1][0].read(), 2) == b""
    clients[1][1].close()


async def test_limit_hits_are_logged_once_per_interval_with_a_count(caplog):
    caplog.set_level(logging.WARNING, logger="storegate.http")
    limits = ServerLimits(max_connections=50, max_connections_per_host=2, header_timeout_s=1)
    async with tiny_server(limits) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(22)]
        await asyncio.sleep(0.1)
        for _, w in idle:
            w.close()
        assert server.stats["refused_max_connections_per_host"] == 20
    lines = [r.getMessage() for r in caplog.records if "max_connections_per_host" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0]


# -- TLS and start-up failures ----------------------------------------------------------

def self_signed(tmp_path, name: str = "gw") -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storegate test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


async def test_tls_serves_and_an_idle_handshake_is_cut_at_the_header_timeout(tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    client = ssl.create_default_context(cafile=cert_file)
    async with tiny_server(cert_file=cert_file, key_file=key_file) as server:
        assert server.scheme == "https"
        assert await send(server.port, request_bytes("GET", "/ping"), ssl_ctx=client) == (200, {"ok": True})
        body = json.dumps({"lines": basket(500)}).encode()
        status, echo = await send(server.port, request_bytes("POST", "/echo", body), ssl_ctx=client)
        assert status == 200 and echo["length"] == len(body)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # no ClientHello
        t0 = time.monotonic()
        await asyncio.wait_for(read_all(reader), 3)
        assert time.monotonic() - t0 < 1.5
        writer.close()


async def test_unusable_tls_files_fail_start_naming_the_key(tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        (str(tmp_path / "missing.crt"), key_file, "api.tls.cert_file"),
        (cert_file, str(tmp_path / "missing.key"), "api.tls.key_file"),
        (str(junk), key_file, "api.tls.cert_file"),
        (cert_file, str(junk), "api.tls.key_file"),
        (cert_file, other_key, "api.tls.key_file"),
    ]
    for cert, key, named in cases:
        cfg = gw_config.check({
            "store": {"id": "S001", "data_dir": str(tmp_path / "store")}, "mqtt": {"host": "127.0.0.1"},
            "api": {"host": "127.0.0.1", "port": 0, "tls": {"cert_file": cert, "key_file": key}},
            "lanes": [{"id": "1", "reader": "terminal"}]})
        with pytest.raises(StartError, match=named.replace(".", r"\.")) as failed:
            await PosServer.from_config(tiny_app(), cfg["api"]).start()
        assert (cert if named.endswith("cert_file") else key) in str(failed.value)


async def test_a_port_in_use_fails_start_naming_host_and_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError, match=rf"api\.host/api\.port: cannot listen on 127\.0\.0\.1:{port}"):
            await PosServer(tiny_app(), host="127.0.0.1", port=port).start()


def test_limits_come_from_the_api_section(tmp_path):
    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path)}, "mqtt": {"host": "127.0.0.1"},
        "api": {"max_connections": 100, "header_timeout_s": 2.5, "max_body_bytes": 131072},
        "lanes": [{"id": "1", "reader": "terminal"}]})
    server = PosServer.from_config(tiny_app(), cfg["api"])
    assert server.limits == ServerLimits(max_connections=100, max_connections_per_host=32, header_timeout_s=2.5,
                                         body_timeout_s=10, max_header_bytes=16384, max_body_bytes=131072,
                                         max_event_streams=64)
    assert (server.host, server.port, server.scheme) == ("0.0.0.0", 8080, "http")
