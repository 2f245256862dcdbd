"""The POS API on the store LAN (Microdot, HTTP/JSON).

    GET  /health                       liveness, store, rules version, backlog
    GET  /status                       everything `storegate status` shows
    GET  /lanes                        the lanes and their readers
    GET  /metrics                      Prometheus metrics (gateway/shell/metrics.py), "read" like /status
    GET  /status/page[.js|.css|.json]  the store manager's page (gateway/shell/status_page/); not in openapi.json
    GET  /lanes/<lane>/member          the member accepted on the lane (or null)
    GET  /lanes/<lane>/events          server-sent events: taps and sales on the lane
    POST /lanes/<lane>/taps            a card read from a lane terminal or simulated reader
    POST /lanes/<lane>/quote           price a basket   {"lines": [...], "member": true|false, "tender"?}
    POST /lanes/<lane>/sales           commit a sale    {"idempotency_key", "lines", "tender"?, "expected_total"?}
    POST /lanes/<lane>/topups          stored-value top-up for the lane's member {"idempotency_key", "package_id" | "amount_fen"}
    POST /lanes/<lane>/packages/<id>/uses   use a count package {"idempotency_key", "uses"}
    POST /lanes/<lane>/packages        sell or renew a count package {"idempotency_key", "package_id", "payment"}
    POST /lanes/<lane>/gifts           points for a gift (礼品兑换) {"idempotency_key", "gift_id", "qty"?}
    POST /returns                      full or partial return {"idempotency_key", "sale_seq" | "sale_id", "lines": [{"line", "qty"}]}
    POST /cards/services               service desk {"idempotency_key", "kind", "card_no", "new_card_no"?, "months"?, "reason"?}
    POST /members                      register a member with a new card (办卡), offline {"idempotency_key", "card_no", "consent", "name"?, "birthday"?, ...}
    POST /withdrawals                  service desk 取款 {"idempotency_key", "card_no", "amount_fen", "payout", "reason"?}

Every POST body may carry "operator" (the cashier's id), journaled with the record.

A tender is {"points": n, "stored_value_fen": x, "coupons": [codes]} (gateway/core/pricing.py).
Every journaled operation answers 201 after fsync with its "seq" and "id",
and 200 with the first answer when retried with the same idempotency key.

Errors are JSON ``{"error": {"code", "message", "text": {"zh-CN", "en"}}}``
with a 4xx status for the caller's mistakes; nothing is written on an error.
Every refusal is a DomainError (gateway/core/errors.py: code, status, texts,
field), answered by ``error_answer`` alone.

Every body is validated against its endpoint's schema (gateway/shell/api_schema.py,
also served as OpenAPI 3.1 at ``/openapi.json``) before anything else runs:
a refused request names the field and writes nothing.

Safe by default (gateway/shell/terminals.py): every call but ``/health`` and
``/openapi.json`` needs a terminal's credential (401 without, 429 after too
many failures from one address); the terminal's role and lanes decide what
it may do (403). Bodies are ``application/json`` only (415), the Host header
must name this box (421: DNS rebinding), and browsers of other origins are
refused unless ``api.cors_origins`` lists them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import inspect
import logging
import socket
import time

from microdot import Microdot, Request
from microdot.cors import CORS
from microdot.sse import sse_response

from gateway.core.errors import DomainError
from gateway.shell import status_page
from gateway.shell.api_schema import RequestInvalid, openapi_document, parse_body
from gateway.shell.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.shell.service import Gateway
from gateway.shell.terminals import FailedLogins, Terminal, Terminals, TerminalsError, default_path
from gateway.store.journal import Appended
from hardware.readers import CardRead

log = logging.getLogger("storegate.api")

# The server (gateway/shell/http_server.py) bounds every body by api.max_body_bytes
# before Microdot sees it; these only matter for Microdot's test client.
Request.max_content_length = 256 * 1024
Request.max_body_length = Request.max_content_length

def error_answer(exc: DomainError) -> tuple:
    """The one place a refusal becomes an answer: any DomainError (the door's
    RequestInvalid, the counter's, the journal's, ...) as the API's error body
    ``{"error": {"code", "message", "text": {"zh-CN", "en"}, "field"?}}``."""
    body = {"error": exc.public()}
    return (body, exc.status, exc.headers) if exc.headers else (body, exc.status)


def error(status: int, code: str, message: str, *, headers: dict | None = None) -> tuple:
    """A refusal of this layer's own (authentication, routing), answered like every other."""
    return error_answer(DomainError(message, code=code, status=status, headers=headers))


def needs(action: str | None):
    """Mark a route with the action a terminal must be allowed (None: open)."""
    def mark(handler):
        handler.action = action
        return handler
    return mark


class HostCheck:
    """Host headers this box answers to: IP literals (a POS dials the box's
    address), localhost, the box's host name and ``api.allowed_hosts``.
    Another name means a browser was pointed at us through someone else's
    DNS (rebinding): refused."""

    def __init__(self, allowed: list[str]) -> None:
        name = socket.gethostname().lower()
        self.names = {"localhost", name, f"{name}.local", *(h.lower() for h in allowed)}

    def __call__(self, host: str | None) -> bool:
        if not host:
            return False
        host = host.strip().lower()
        if host.startswith("["):  # [v6]:port
            literal = host[1:host.find("]")] if "]" in host else host
        else:
            literal = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        try:
            ipaddress.ip_address(literal)
            return True
        except ValueError:
            return literal in self.names


def create_app(gw: Gateway, terminals: Terminals | None = None) -> Microdot:
    """The POS API of a gateway. ``terminals``: the credentials to accept
    (default: ``api.terminals_file``). Refuses to build without any: a
    gateway nobody may call safely is a gateway anybody may call."""
    api_cfg = gw.config["api"]
    if terminals is None:
        terminals = Terminals(default_path(gw.config))
    if not terminals.configured():
        raise TerminalsError(
            f"api.terminals_file: no POS terminal credentials in {terminals.path}; add one with "
            f"`storegate terminals add pos-1 --role pos --lanes 1,2 --config <gateway.toml>` "
            f"(and one per lane terminal, service desk and manager)")
    app = Microdot()
    app.terminals = terminals
    failures = FailedLogins(api_cfg.get("auth_failures_per_minute", 10))
    host_ok = HostCheck(api_cfg.get("allowed_hosts", []))
    origins = set(api_cfg.get("cors_origins", []))
    pos_return_max = api_cfg.get("pos_return_max_fen", 20000)
    if origins:
        CORS(app, allowed_origins=sorted(origins), allowed_methods=["GET", "POST"],
             allowed_headers=["Authorization", "Content-Type", "Last-Event-ID"], max_age=600)
    last_failure_log = [0.0]

    @app.before_request
    async def guard(request):
        if not host_ok(request.headers.get("Host")):
            return error(421, "host_not_allowed", f"Host {request.headers.get('Host')!r} is not this gateway; "
                         "add it to api.allowed_hosts if it is")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in origins:
            return error(403, "origin_not_allowed", f"cross-origin requests from {origin!r} are not allowed "
                         "(api.cors_origins)")
        if request.method == "POST":
            ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error(415, "unsupported_media_type", "Content-Type must be application/json")
        action = getattr(request.route, "action", None)
        if action is None:
            return None
        addr = (request.client_addr or ("?",))[0]
        if failures.blocked(addr):
            return error(429, "too_many_failures", f"too many failed authentications from {addr}; wait a minute",
                         headers={"Retry-After": "60"})
        terminal = terminals.authenticate(request.headers.get("Authorization"))
        if terminal is None:
            count = failures.failed(addr)
            now = time.monotonic()
            if count <= 3 or now - last_failure_log[0] > 10:  # a flood is logged, not echoed line by line
                last_failure_log[0] = now
                log.warning("authentication failed from %s for %s %s (%d in the last minute)", addr,
                            request.method, request.path, count)
            return error(401, "unauthorized", "missing or wrong 'Authorization: Bearer <terminal>.<secret>' "
                         "header", headers={"WWW-Authenticate": 'Bearer realm="storegate"'})
        lane = request.url_args.get("lane_id") if request.url_args else None
        if not terminal.may(action, lane):
            where = f" on lane {lane}" if lane is not None else ""
            log.warning("terminal %s (%s) refused: %s%s", terminal.id, terminal.role, action, where)
            return error(403, "forbidden", f"terminal {terminal.id} ({terminal.role}) may not {action}{where}")
        request.g.terminal = terminal
        return None

    @app.errorhandler(404)
    async def not_found(request):
        return error(404, "not_found", f"no such endpoint: {request.method} {request.path}")

    @app.errorhandler(405)
    async def not_allowed(request):
        return error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")

    @app.errorhandler(413)
    async def too_large(request):
        return error(413, "too_large", f"request body over {Request.max_content_length} bytes")

    @app.errorhandler(Exception)
    async def internal(request, exc):
        log.exception("API error on %s %s", request.method, request.path)
        return error(500, "internal", "internal error; nothing was recorded")

    def lane_or_404(lane_id: str):
        try:
            return gw.lane(lane_id), None
        except KeyError as exc:
            return None, error(404, "unknown_lane", exc.args[0])

    @app.get("/health")
    @needs(None)
    async def health(request):
        backlog = await gw.journal.backlog()
        rules = gw.rules.current
        return {"status": "ok", "store": gw.store_id, "rules_version": rules.version if rules else None,
                "backlog": backlog["depth"], "uplink": "online" if gw.uplink.state.connected else "offline"}

    contract = openapi_document()

    @app.get("/openapi.json")
    @needs(None)
    async def openapi(request):
        return contract

    @app.get("/status")
    @needs("read")
    async def status(request):
        return await gw.status()

    @app.get("/lanes")
    @needs("read")
    async def lanes(request):
        return {"lanes": [{"id": l.id, "reader": l.reader.kind if l.reader else "terminal"}
                          for l in gw.lanes.values()]}

    @app.get("/metrics")
    @needs("read")
    async def metrics(request):
        return await gw.metrics.exposition(), 200, {"Content-Type": METRICS_CONTENT_TYPE}

    for path, handler, action in status_page.routes(gw):  # the store manager's page: open frame, data "read"
        app.get(path)(needs(action)(handler))

    @app.get("/lanes/<lane_id>/member")
    @needs("lane_read")
    async def member(request, lane_id):
        lane, err = lane_or_404(lane_id)
        if err:
            return err
        current = gw.current_member(lane)
        return {"lane": lane.id, "member": current.public() if current else None}

    @app.get("/lanes/<lane_id>/events")
    @needs("lane_read")
    async def events(request, lane_id):
        lane, err = lane_or_404(lane_id)
        if err:
            return err
        return sse_response(request, _event_stream, lane, request.headers.get("Last-Event-ID"))

    async def _event_stream(request, sse, lane, last_event_id):
        """Events after ``Last-Event-ID`` first (a POS that reconnects misses
        none and sees none twice), then live ones, each with its id."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=32)
        # Subscribed and the backlog taken in one step (no await between):
        # every event is either in the backlog or comes through the queue.
        lane.listeners.add(queue)
        backlog = lane.events_after(last_event_id)
        try:
            for event in backlog:
                await sse.send(dict(event), event=event["type"], event_id=event.id)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15)
                    await sse.send(dict(event), event=event["type"], event_id=event.id)
                except TimeoutError:
                    await sse.send("keepalive", comment=True)
        finally:
            lane.listeners.discard(queue)

    @app.post("/lanes/<lane_id>/taps")
    @needs("tap")
    async def tap(request, lane_id):
        lane, err = lane_or_404(lane_id)
        if err:
            return err
        if lane.reader is not None and lane.reader.kind != "simulated":
            return error(409, "not_a_terminal_lane", f"lane {lane.id} reads cards with its own {lane.reader.kind} reader")
        try:
            data = parse_body("taps", request.body)
        except RequestInvalid as exc:
            return error_answer(exc)
        verdict = await gw.handle_read(CardRead(lane.id, data["source"], data["raw"], gw.clock()))
        return verdict.public()

    async def answer(call) -> tuple[dict, int] | dict:
        """Run a counter call; map its refusals to clear 4xx/5xx errors."""
        try:
            result = call()
            if inspect.isawaitable(result):
                result = await result
        except DomainError as exc:  # the counter's, the pricing core's, the journal's (a RecordRefused: the
            return error_answer(exc)  # door's schemas missed it)
        if isinstance(result, Appended):
            body = {**result.response, "duplicate": result.duplicate}  # carries seq and tx_id
            return body, (200 if result.duplicate else 201)
        return result

    def with_lane(action: str, endpoint: str, handler):
        """A lane's counter operation: the terminal may act for the lane (the
        guard), the lane exists, and the body is valid, before anything runs."""
        async def route(request, lane_id, **url_args):
            lane, err = lane_or_404(lane_id)
            if err:
                return err
            try:
                body = parse_body(endpoint, request.body, url_args or None)
            except RequestInvalid as exc:
                return error_answer(exc)
            return await handler(lane, body, request.g.terminal, **url_args)
        route.__name__ = handler.__name__
        return needs(action)(route)

    async def timed(operation: str, call):
        """``answer``, with its latency in /metrics by outcome (ok, refused, error)."""
        with gw.metrics.timed(operation) as outcome:
            result = await answer(call)
            if isinstance(result, tuple) and result[1] >= 400:
                outcome[0] = "refused"
        return result

    async def _quote(lane, body, terminal):
        return await timed("quote", lambda: gw.quote(lane.id, body))

    async def _sale(lane, body, terminal):
        return await timed("sale", lambda: gw.counter.sale(lane.id, body, terminal=terminal))

    async def _topup(lane, body, terminal):
        return await answer(lambda: gw.counter.topup(lane.id, body, terminal=terminal))

    async def _package_use(lane, body, terminal, package_id):
        return await answer(lambda: gw.counter.use_package(lane.id, package_id, body, terminal=terminal))

    app.post("/lanes/<lane_id>/quote")(with_lane("quote", "quote", _quote))
    app.post("/lanes/<lane_id>/sales")(with_lane("sale", "sales", _sale))
    app.post("/lanes/<lane_id>/topups")(with_lane("topup", "topups", _topup))
    app.post("/lanes/<lane_id>/packages/<package_id>/uses")(with_lane("package_use", "package_uses", _package_use))

    async def _package_sale(lane, body, terminal):
        return await answer(lambda: gw.counter.sell_package(lane.id, body, terminal=terminal))

    async def _gift(lane, body, terminal):
        return await answer(lambda: gw.counter.redeem_gift(lane.id, body, terminal=terminal))

    # Money or points for something of value, like a top-up: the top-up's permission.
    app.post("/lanes/<lane_id>/packages")(with_lane("topup", "package_sales", _package_sale))
    app.post("/lanes/<lane_id>/gifts")(with_lane("topup", "gifts", _gift))

    def store_wide(action: str, endpoint: str, operation):
        """A route for a counter operation that belongs to no lane."""
        async def route(request):
            try:
                body = parse_body(endpoint, request.body)
            except RequestInvalid as exc:
                return error_answer(exc)
            return await answer(lambda: operation(body, terminal=request.g.terminal))
        route.__name__ = operation.__name__
        return needs(action)(route)

    async def sale_return(body, *, terminal: Terminal):
        return await gw.counter.sale_return(body, terminal=terminal, pos_return_max_fen=pos_return_max)

    app.post("/returns")(store_wide("return", "returns", sale_return))
    app.post("/cards/services")(store_wide("card_service", "card_services", gw.counter.card_service))
    app.post("/members")(store_wide("register", "members", gw.counter.register))
    app.post("/withdrawals")(store_wide("withdrawal", "withdrawals", gw.counter.withdraw))

    return app
