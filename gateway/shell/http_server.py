"""The HTTP server of the POS API: Microdot's routes, our own connections.

Microdot's ``start_server`` waits for a request head forever, takes headers of
any total size, accepts any number of connections and leaves a body over
``Request.max_body_length`` unread. ``PosServer`` serves the same Microdot app
(through ``app.dispatch_request``) and guarantees, per connection:

- at most ``max_connections`` connections are being served, at most
  ``max_connections_per_host`` from one client address; one over a cap is
  answered 503 without being read, so one client cannot take the POS API
  away from the others. An error answer is followed by up to ``LINGER_S``
  of reading and dropping (at most ``max_connections`` connections at
  once), so that it reaches the client: file descriptors in use stay under
  about twice ``max_connections`` plus TLS handshakes in progress;
- the request line and headers arrive within ``header_timeout_s`` (else 408)
  and fit in ``max_header_bytes`` (else 431; no more than about twice that is
  ever buffered); a malformed head is 400; on TLS the handshake must also
  finish within ``header_timeout_s``;
- the body is exactly ``Content-Length`` bytes (a chunked body: 411) of at
  most ``max_body_bytes`` (else 413, before any of it is read), complete
  within ``body_timeout_s`` (else 408); the handler sees all of it in
  ``request.body``;
- a client that does not take its answer for ``body_timeout_s`` is cut off;
- server-sent event streams (``GET .../events``) stay open; they count
  against ``max_event_streams`` (else 503) instead of the connection caps,
  and end as soon as their client goes away;
- one request per connection, then close (as Microdot does).

Our own error answers have the API's shape ``{"error": {"code", "message",
"text": {"zh-CN", "en"}}}``. Every limit hit is counted in ``stats`` and
logged at most once per ``LOG_EVERY_S`` per limit, with how many there were.

    async with PosServer.from_config(app, cfg["api"]) as server:
        ...                       # server.port, server.stats

``StartError`` names the config key to fix (``api.tls.cert_file``,
``api.tls.key_file``, ``api.host``/``api.port``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from microdot import Microdot, Request, Response
from microdot.microdot import NoCaseDict

from gateway.core.errors import DomainError

log = logging.getLogger("storegate.http")

LOG_EVERY_S = 10.0
# After an error answer, read (and drop) what the client still sends for a
# moment before closing: closing with unread data makes the kernel send a
# reset, which can destroy the answer before the client has read it. At most
# max_connections connections linger at once; more are closed at once.
LINGER_S = 1.0

REASONS = {400: "Bad Request", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}
STAT_KEYS = ("connections", "requests", "refused_max_connections", "refused_max_connections_per_host",
             "refused_max_event_streams", "header_timeouts", "body_timeouts", "head_too_large",
             "body_too_large", "length_required", "bad_requests", "send_timeouts")


class StartError(RuntimeError):
    """The server cannot start; the message names the config key to fix."""


@dataclass(frozen=True)
class ServerLimits:
    """The ``api`` section's limits (gateway/shell/config.py documents each)."""

    max_connections: int = 256
    max_connections_per_host: int = 32
    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    max_header_bytes: int = 16384
    max_body_bytes: int = 262144
    max_event_streams: int = 64

    @classmethod
    def from_config(cls, api: dict) -> "ServerLimits":
        return cls(**{f.name: api[f.name] for f in fields(cls) if f.name in api})


def error_response(refusal: DomainError) -> bytes:
    """A complete HTTP answer with the API's error body, for a refusal made
    before the request reaches the app (the app answers its own with
    gateway/shell/api.py ``error_answer``: the same body)."""
    body = json.dumps({"error": refusal.public()}, ensure_ascii=False).encode()
    lines = [f"HTTP/1.1 {refusal.status} {REASONS[refusal.status]}", "Content-Type: application/json; charset=UTF-8",
             f"Content-Length: {len(body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in (refusal.headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Refused(DomainError):
    """A request answered with an error before it reaches the app; ``stat``: the counter it adds to."""

    def __init__(self, status: int, code: str, message: str, stat: str, headers: dict | None = None) -> None:
        super().__init__(message, code=code, status=status, headers=headers)
        self.message, self.stat = message, stat


def _bad(message: str) -> Refused:
    return Refused(400, "bad_request", message, "bad_requests")


def parse_head(head: bytes) -> tuple[str, str, str, NoCaseDict, int]:
    """(method, target, HTTP version, headers, Content-Length) of a request
    head ending in CRLF CRLF; ``Refused`` if it is not one."""
    try:
        text = head[:-4].decode()  # UTF-8, as Microdot decodes it
    except UnicodeDecodeError:
        raise _bad("the request head is not UTF-8") from None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if (len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper() or not parts[1]
            or parts[2] not in ("HTTP/1.0", "HTTP/1.1")):
        raise _bad(f"malformed request line {request_line[:100]!r}")
    headers = NoCaseDict()
    lengths = set()
    for line in header_lines:
        name, colon, value = line.partition(":")
        # No whitespace in or around a name: that also refuses obsolete line folding.
        if not colon or not name or name != name.strip() or " " in name or "\t" in name:
            raise _bad(f"malformed header line {line[:100]!r}")
        value = value.strip()
        headers[name] = value
        if name.lower() == "content-length":
            lengths.add(value)
    if len(lengths) > 1:
        raise _bad("conflicting Content-Length headers")
    length = lengths.pop() if lengths else "0"
    if not (length.isascii() and length.isdigit()) or len(length) > 15:
        raise _bad(f"Content-Length {length[:20]!r} is not a byte count")
    return parts[0], parts[1], parts[2][5:], headers, int(length)


def is_event_stream(method: str, target: str) -> bool:
    return method == "GET" and target.split("?", 1)[0].rstrip("/").endswith("/events")


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server's TLS context; ``StartError`` names the file that cannot be used."""
    for key, path in (("api.tls.cert_file", cert_file), ("api.tls.key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise StartError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise StartError(_tls_problem(cert_file, key_file, exc)) from None
    return ctx


def _tls_problem(cert_file: str, key_file: str, exc: ssl.SSLError) -> str:
    """Which of the two files OpenSSL refused (its own message does not say)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except Exception:
        return f"api.tls.cert_file: {cert_file} holds no PEM certificate ({exc.reason or exc})"
    try:
        load_pem_private_key(Path(key_file).read_bytes(), None)
    except Exception:
        return f"api.tls.key_file: {key_file} holds no unencrypted PEM private key ({exc.reason or exc})"
    return f"api.tls.key_file: {key_file} is not the key of the certificate in api.tls.cert_file {cert_file}"


class _Throttled:
    """Warnings at most once per ``every_s`` per key, with how many occurred."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._count: Counter[str] = Counter()

    def __call__(self, key: str, message: str) -> None:
        self._count[key] += 1
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) >= self.every_s:
            self._last[key] = now
            n = self._count.pop(key)
            log.warning("POS API: %s%s", message, f" ({n} times since the last such line)" if n > 1 else "")


class _Out:
    """What Microdot writes its response to: the connection, with a deadline
    on every send so a client that stops reading cannot hold it. Holds what
    it is given until ``flush()`` (one send for a whole answer instead of one
    per header line); after that, each write goes out at once (event streams)."""

    __slots__ = ("_writer", "_timeout", "_stats", "_held", "_held_bytes")

    def __init__(self, writer: asyncio.StreamWriter, timeout: float, stats: Counter) -> None:
        self._writer, self._timeout, self._stats = writer, timeout, stats
        self._held: list[bytes] | None = []
        self._held_bytes = 0

    async def awrite(self, data: bytes) -> None:
        if self._held is None:
            await self._send(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= 65536:  # a large answer goes out in pieces rather than copied whole
            await self._send(b"".join(self._held))
            self._held.clear()
            self._held_bytes = 0

    async def flush(self) -> None:
        """Send what is held; from now on every write is sent at once."""
        held, self._held = self._held, None
        if held:
            await self._send(b"".join(held))

    async def _send(self, data: bytes) -> None:
        transport = self._writer.transport
        if transport.is_closing():
            raise OSError("Connection lost")  # Microdot ends a response quietly on this
        self._writer.write(data)
        if transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(self._timeout):
                    await self._writer.drain()
            except TimeoutError:
                self._stats["send_timeouts"] += 1
                transport.abort()
                raise OSError("Connection lost") from None

    async def aclose(self) -> None:
        self._writer.close()

    def get_extra_info(self, name: str, default=None):
        return self._writer.get_extra_info(name, default)


class PosServer:
    """A Microdot app served with the guarantees of this module's docstring."""

    def __init__(self, app: Microdot, limits: ServerLimits = ServerLimits(), *, host: str = "0.0.0.0",
                 port: int = 8080, cert_file: str | None = None, key_file: str | None = None) -> None:
        self.app = app
        self.limits = limits
        self.host = host
        self.port = port  # the bound port once started (useful with port 0)
        self.tls = (cert_file, key_file) if cert_file or key_file else None
        self._server: asyncio.AbstractServer | None = None
        self._open = 0
        self._peak = 0
        self._per_host: Counter[str] = Counter()
        self._streams = 0
        self._lingering = 0
        self._live_streams: set = set()  # stop() of each open event stream
        self._tasks: set[asyncio.Task] = set()
        self._stats: Counter[str] = Counter()
        self._warn = _Throttled()

    @classmethod
    def from_config(cls, app: Microdot, api: dict) -> "PosServer":
        """From the config's ``api`` section."""
        tls = api.get("tls") or {}
        return cls(app, ServerLimits.from_config(api), host=api.get("host", "0.0.0.0"), port=api.get("port", 8080),
                   cert_file=tls.get("cert_file"), key_file=tls.get("key_file"))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def stats(self) -> dict:
        """Counters since start, for /status."""
        return {"connections_open": self._open, "connections_peak": self._peak,
                "event_streams_open": self._streams, **{k: self._stats[k] for k in STAT_KEYS}}

    # -- lifetime -------------------------------------------------------------

    async def start(self) -> "PosServer":
        limits = self.limits
        tls = {}
        if self.tls:
            tls = {"ssl": tls_context(*self.tls), "ssl_handshake_timeout": limits.header_timeout_s}
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, limit=limits.max_header_bytes,
                # A burst over the cap is accepted and answered 503 rather than left in SYN retries
                # (a queued connection costs no file descriptor).
                backlog=max(1024, limits.max_connections), **tls)
        except OSError as exc:
            raise StartError(f"api.host/api.port: cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop listening, end event streams, give requests in progress
        ``grace_s`` to finish (a sale being journaled), then cut the rest."""
        if self._server is None:
            return
        self._server.close()
        for stop in list(self._live_streams):
            await stop()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        try:
            await asyncio.wait_for(self._server.wait_closed(), 1)
        except TimeoutError:
            pass
        self._server = None

    async def __aenter__(self) -> "PosServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- one connection -------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # stopped by close() or by the end of its event stream: done, not failed
        except Exception:
            log.exception("POS API: connection handling failed")
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.limits
        peer = writer.get_extra_info("peername")
        addr = peer[0] if peer else "?"
        self._stats["connections"] += 1
        if self._open >= limits.max_connections:
            await self._refuse(reader, writer, "refused_max_connections",
                               f"{self._open} connections open (api.max_connections)")
            return
        if self._per_host[addr] >= limits.max_connections_per_host:
            await self._refuse(reader, writer, "refused_max_connections_per_host",
                               f"{self._per_host[addr]} connections open from {addr} "
                               "(api.max_connections_per_host)")
            return
        self._open += 1
        self._peak = max(self._peak, self._open)
        self._per_host[addr] += 1
        held = True

        def release() -> None:  # once: an event stream gives its slot back early
            nonlocal held
            if held:
                held = False
                self._open -= 1
                self._per_host[addr] -= 1
                if not self._per_host[addr]:
                    del self._per_host[addr]

        try:
            await self._serve(reader, writer, peer, release)
        finally:
            release()

    async def _refuse(self, reader, writer, stat: str, why: str) -> None:
        """Over a connection cap: 503 without reading the request."""
        self._stats[stat] += 1
        self._warn(stat, f"connection refused (503): {why}")
        await self._answer_and_close(reader, writer, error_response(Refused(
            503, "too_many_connections", f"the gateway is busy: {why}; retry", stat, {"Retry-After": "1"})))

    async def _serve(self, reader, writer, peer, release) -> None:
        limits = self.limits
        try:
            method, target, version, headers, body = await self._read_request(reader, writer)
        except Refused as refused:
            self._stats[refused.stat] += 1
            self._warn(refused.stat, f"{refused.status} {refused.code} for {peer[0] if peer else '?'}: "
                                     f"{refused.message}")
            release()  # lingering has its own budget
            await self._answer_and_close(reader, writer, error_response(refused))
            return
        except (asyncio.IncompleteReadError, OSError):
            writer.transport.abort()  # the client went away (an empty connect is a port check)
            return
        stream = is_event_stream(method, target)
        if stream:
            if self._streams >= limits.max_event_streams:
                why = f"{self._streams} event streams open (api.max_event_streams)"
                self._stats["refused_max_event_streams"] += 1
                self._warn("refused_max_event_streams", f"event stream refused (503): {why}")
                release()
                await self._answer_and_close(reader, writer, error_response(Refused(
                    503, "too_many_event_streams", f"too many event streams: {why}; retry later",
                    "refused_max_event_streams", {"Retry-After": "5"})))
                return
            self._streams += 1  # reserved before the app runs: concurrent requests cannot overshoot the cap
        try:
            self._stats["requests"] += 1
            out = _Out(writer, limits.body_timeout_s, self._stats)
            request = Request(self.app, peer, method, target, version, headers, body=body,
                              sock=(reader, out), scheme=self.scheme)
            request.max_content_length = limits.max_body_bytes  # checked here already; Microdot checks again
            response = await self.app.dispatch_request(request)
            if response is Response.already_handled:
                return
            try:
                if stream and response.headers.get("Content-Type", "").startswith("text/event-stream"):
                    release()
                    await out.flush()
                    await self._stream(reader, out, response)
                else:
                    await response.write(out)
                    await out.flush()
            except OSError:
                pass  # the client went away before its answer
        finally:
            if stream:
                self._streams -= 1
            await self._close(writer)

    async def _read_request(self, reader, writer) -> tuple[str, str, str, NoCaseDict, bytes]:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.header_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise Refused(408, "request_timeout", f"no complete request head within {limits.header_timeout_s} s "
                          "(api.header_timeout_s)", "header_timeouts") from None
        except asyncio.LimitOverrunError:
            raise Refused(431, "headers_too_large", f"request head over {limits.max_header_bytes} bytes "
                          "(api.max_header_bytes)", "head_too_large") from None
        method, target, version, headers, length = parse_head(head)
        if "Transfer-Encoding" in headers:
            raise Refused(411, "length_required", "send the body with a Content-Length; Transfer-Encoding "
                          f"{headers['Transfer-Encoding']!r} is not accepted", "length_required")
        if length > limits.max_body_bytes:
            raise Refused(413, "too_large", f"request body of {length} bytes is over {limits.max_body_bytes} "
                          "(api.max_body_bytes)", "body_too_large")
        if not length:
            return method, target, version, headers, b""
        if headers.get("Expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                body = await reader.readexactly(length)
        except TimeoutError:
            raise Refused(408, "request_timeout", f"request body of {length} bytes not complete within "
                          f"{limits.body_timeout_s} s (api.body_timeout_s)", "body_timeouts") from None
        return method, target, version, headers, body

    async def _stream(self, reader, out: _Out, response: Response) -> None:
        """Write an event stream until the app ends it, the client goes away
        or the server closes."""
        writing = asyncio.current_task()

        async def stop() -> None:
            try:
                await response.body.aclose()  # Microdot's SSE: ends its event task, then the response
            except (AttributeError, RuntimeError):  # a body without one, or a generator in use
                writing.cancel()

        async def until_client_leaves() -> None:
            try:
                await reader.read(1)  # EOF (or anything: a stream client has nothing more to say)
            except OSError:
                pass
            await stop()

        self._live_streams.add(stop)
        watcher = asyncio.create_task(until_client_leaves())
        try:
            await response.write(out)
        finally:
            watcher.cancel()
            self._live_streams.discard(stop)

    async def _answer_and_close(self, reader, writer, answer: bytes) -> None:
        writer.write(answer)
        if writer.can_write_eof() and self._lingering < self.limits.max_connections:
            self._lingering += 1
            try:
                writer.write_eof()
                async with asyncio.timeout(LINGER_S):
                    while await reader.read(65536):
                        pass
            except (TimeoutError, OSError):
                pass
            finally:
                self._lingering -= 1
        await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()  # the FIN goes now, not after the loop gets round to the close
        writer.close()
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()  # the client does not take the rest of its answer
        except OSError:
            pass
