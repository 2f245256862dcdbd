"""The POS API on the store LAN (Microdot, HTTP/JSON).

    GET  /health                       liveness, store, rules version, backlog
    GET  /status                       everything `storegate status` shows
    GET  /lanes                        the lanes and their readers
    GET  /lanes/<lane>/member          the member accepted on the lane (or null)
    GET  /lanes/<lane>/events          server-sent events: taps and sales on the lane
    POST /lanes/<lane>/taps            a card read from a lane terminal or simulated reader
    POST /lanes/<lane>/quote           price a basket   {"lines": [...], "member": true|false, "tender"?}
    POST /lanes/<lane>/sales           commit a sale    {"idempotency_key", "lines", "tender"?, "expected_total"?}
    POST /lanes/<lane>/topups          stored-value top-up for the lane's member {"idempotency_key", "package_id" | "amount_fen"}
    POST /lanes/<lane>/packages/<id>/uses   use a count package {"idempotency_key", "uses"}
    POST /returns                      full or partial return {"idempotency_key", "sale_seq" | "sale_id", "lines": [{"line", "qty"}]}
    POST /cards/services               service desk {"idempotency_key", "kind", "card_no", "new_card_no"?, "months"?, "reason"?}
    POST /members                      register a member with a new card (办卡), offline {"idempotency_key", "card_no", "consent", "name"?, "birthday"?, ...}
    POST /withdrawals                  service desk 取款 {"idempotency_key", "card_no", "amount_fen", "payout", "reason"?}

Every POST body may carry "operator" (the cashier's id), journaled with the record.

A tender is {"points": n, "stored_value_fen": x, "coupons": [codes]} (gateway/pricing.py).
Every journaled operation answers 201 after fsync with its "seq" and "id",
and 200 with the first answer when retried with the same idempotency key.

Errors are JSON ``{"error": {"code", "message", "text": {"zh-CN", "en"}}}``
with a 4xx status for the caller's mistakes; nothing is written on an error.

Every body is validated against its endpoint's schema (gateway/api_schema.py,
also served as OpenAPI 3.1 at ``/openapi.json``) before anything else runs:
a refused request names the field and writes nothing.

Safe by default (gateway/terminals.py): every call but ``/health`` and
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

from gateway import engine
from gateway.api_schema import RequestInvalid, openapi_document, parse_body
from gateway.counter import CounterError
from gateway.core.pricing import PricingError
from gateway.service import Gateway, NoMember, QuoteChanged
from gateway.store.journal import Appended, IdempotencyConflict, JournalError, JournalFull, RecordRefused
from gateway.terminals import FailedLogins, Terminal, Terminals, TerminalsError, default_path
from hardware.readers import CardRead

log = logging.getLogger("storegate.api")

# The server (gateway/http_server.py) bounds every body by api.max_body_bytes
# before Microdot sees it; these only matter for Microdot's test client.
Request.max_content_length = 256 * 1024
Request.max_body_length = Request.max_content_length

# What the POS and the people at the counter see for each error code, in both
# languages. Codes are stable; a code without its own text gets its status's.
ERROR_TEXT = {
    "journal_unavailable": ("交易未能保存，请勿重复收款，稍后重试或联系店长",
                            "The sale could not be saved. Do not take payment again; retry or call the manager"),
    "journal_full": ("门店存储已满，会员交易暂停，请按非会员结账并联系店长",
                     "Store storage is full: member sales are paused. Check out as a non-member and call the manager"),
    "no_member": ("本通道没有已验证的会员卡，请重新刷卡", "No member card accepted on this lane; please tap again"),
    "quote_changed": ("价格已更新，请重新计算", "Prices changed; please quote again"),
    "unauthorized": ("终端未登录或凭证无效，请联系店长", "This terminal is not signed in or its credential is not valid; "
                     "call the manager"),
    "forbidden": ("此终端无权进行该操作", "This terminal may not do this"),
    "too_many_failures": ("登录失败次数过多，请稍后再试", "Too many failed sign-ins; try again in a minute"),
    "host_not_allowed": ("请求地址不属于本门店网关", "This request was not addressed to this store's gateway"),
    "origin_not_allowed": ("不允许来自该网页的请求", "Requests from this web page are not allowed"),
    "unsupported_media_type": ("请求格式须为 JSON", "The request body must be JSON (Content-Type: application/json)"),
    "bad_request": ("请求内容有误，请检查后重试", "The request is not valid; check it and retry"),
    "not_found": ("请求的功能不存在", "No such function"),
    "unknown_lane": ("本店没有这个收银通道", "This store has no such lane"),
    "method_not_allowed": ("不支持此请求方式", "This method is not allowed here"),
    "too_large": ("请求内容过大", "The request is too large"),
    "idempotency_conflict": ("交易编号已用于另一笔交易，请重新发起", "This transaction key was used for a different "
                             "request; start the transaction again"),
    "not_a_terminal_lane": ("该通道使用本机读卡器，不接受终端刷卡", "This lane reads cards with its own reader"),
    "internal": ("系统错误，未记录任何交易，请重试或联系店长", "Internal error; nothing was recorded. Retry or call the manager"),
}
STATUS_TEXT = {
    400: ERROR_TEXT["bad_request"], 401: ERROR_TEXT["unauthorized"], 403: ERROR_TEXT["forbidden"],
    404: ERROR_TEXT["not_found"], 409: ("请求与当前状态冲突，请重试", "The request conflicts with the current state; retry"),
    422: ("按门店规则不能办理此业务", "The store's rules do not allow this"), 507: ERROR_TEXT["journal_unavailable"],
}


def error(status: int, code: str, message: str, *, text: dict | None = None, field: str | None = None,
          headers: dict | None = None) -> tuple:
    """The one shape of every error answer; every code carries zh-CN/en text."""
    if text is None:
        zh, en = ERROR_TEXT.get(code) or STATUS_TEXT.get(status) or ERROR_TEXT["internal"]
        text = {"zh-CN": zh, "en": en}
    body = {"error": {"code": code, "message": message, "text": text}}
    if field is not None:
        body["error"]["field"] = field
    return (body, status, headers) if headers else (body, status)


def refused(exc: RequestInvalid) -> tuple:
    return error(exc.status, exc.code, str(exc), text=exc.text, field=exc.field)


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
            return refused(exc)
        verdict = await gw.handle_read(CardRead(lane.id, data["source"], data["raw"], gw.clock()))
        return verdict.public()

    async def answer(call) -> tuple[dict, int] | dict:
        """Run a counter call; map its refusals to clear 4xx/5xx errors."""
        try:
            result = call()
            if inspect.isawaitable(result):
                result = await result
        except engine.BasketError as exc:
            return error(400, "bad_request", str(exc))
        except PricingError as exc:
            # Malformed input is 400; a well-formed request the rules refuse is 422.
            status = 400 if exc.code.endswith("_invalid") else 422
            return error(status, exc.code, str(exc), text=exc.text, field=exc.field)
        except CounterError as exc:
            return error(exc.status, exc.code, str(exc), text=exc.text)
        except NoMember as exc:
            return error(409, "no_member", str(exc))
        except QuoteChanged as exc:
            return error(409, "quote_changed", str(exc))
        except IdempotencyConflict as exc:
            return error(409, "idempotency_conflict", str(exc))
        except RecordRefused as exc:  # the door's schemas should have caught it: the journal's last line
            return error(400, "record_refused", str(exc))
        except JournalFull as exc:
            return error(507, "journal_full", str(exc))
        except JournalError as exc:
            return error(507, "journal_unavailable", str(exc))
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
                return refused(exc)
            return await handler(lane, body, request.g.terminal, **url_args)
        route.__name__ = handler.__name__
        return needs(action)(route)

    async def _quote(lane, body, terminal):
        return await answer(lambda: gw.quote(lane.id, body))

    async def _sale(lane, body, terminal):
        return await answer(lambda: gw.counter.sale(lane.id, body, terminal=terminal))

    async def _topup(lane, body, terminal):
        return await answer(lambda: gw.counter.topup(lane.id, body, terminal=terminal))

    async def _package_use(lane, body, terminal, package_id):
        return await answer(lambda: gw.counter.use_package(lane.id, package_id, body, terminal=terminal))

    app.post("/lanes/<lane_id>/quote")(with_lane("quote", "quote", _quote))
    app.post("/lanes/<lane_id>/sales")(with_lane("sale", "sales", _sale))
    app.post("/lanes/<lane_id>/topups")(with_lane("topup", "topups", _topup))
    app.post("/lanes/<lane_id>/packages/<package_id>/uses")(with_lane("package_use", "package_uses", _package_use))

    def store_wide(action: str, endpoint: str, operation):
        """A route for a counter operation that belongs to no lane."""
        async def route(request):
            try:
                body = parse_body(endpoint, request.body)
            except RequestInvalid as exc:
                return refused(exc)
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
