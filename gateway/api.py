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
    POST /cards/services               service desk {"idempotency_key", "kind", "card_no", "new_card_no"?, "reason"?}

A tender is {"points": n, "stored_value_fen": x, "coupons": [codes]} (gateway/pricing.py).
Every journaled operation answers 201 after fsync with its "seq" and "id",
and 200 with the first answer when retried with the same idempotency key.

Errors are JSON ``{"error": {"code", "message", "text": {"zh-CN", "en"}}}``
with a 4xx status for the caller's mistakes; nothing is written on an error.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging

from microdot import Microdot, Request
from microdot.sse import sse_response

from gateway import engine
from gateway.counter import CounterError
from gateway.journal import Appended, IdempotencyConflict, JournalError, JournalFull
from gateway.pricing import PricingError
from gateway.service import Gateway, NoMember, QuoteChanged
from hardware.readers import SOURCES, CardRead

log = logging.getLogger("storegate.api")

Request.max_content_length = 256 * 1024  # a 500-line basket fits comfortably

# Errors a cashier sees on the POS screen, in both languages.
CASHIER_TEXT = {
    "journal_unavailable": ("交易未能保存，请勿重复收款，稍后重试或联系店长",
                            "The sale could not be saved. Do not take payment again; retry or call the manager"),
    "journal_full": ("门店存储已满，会员交易暂停，请按非会员结账并联系店长",
                     "Store storage is full: member sales are paused. Check out as a non-member and call the manager"),
    "no_member": ("本通道没有已验证的会员卡，请重新刷卡", "No member card accepted on this lane; please tap again"),
    "quote_changed": ("价格已更新，请重新计算", "Prices changed; please quote again"),
}


def error(status: int, code: str, message: str) -> tuple[dict, int]:
    body = {"error": {"code": code, "message": message}}
    if code in CASHIER_TEXT:
        zh, en = CASHIER_TEXT[code]
        body["error"]["text"] = {"zh-CN": zh, "en": en}
    return body, status


def _json_body(request: Request) -> dict:
    try:
        data = json.loads(request.body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise engine.BasketError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise engine.BasketError("request body must be a JSON object")
    return data


def create_app(gw: Gateway) -> Microdot:
    app = Microdot()
    token = gw.config["api"].get("token")

    @app.before_request
    async def authenticate(request):
        if token and request.path != "/health":
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return error(401, "unauthorized", "missing or wrong 'Authorization: Bearer <token>' header")

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
    async def health(request):
        backlog = await gw.journal.backlog()
        rules = gw.rules.current
        return {"status": "ok", "store": gw.store_id, "rules_version": rules.version if rules else None,
                "backlog": backlog["depth"], "uplink": "online" if gw.uplink.state.connected else "offline"}

    @app.get("/status")
    async def status(request):
        return await gw.status()

    @app.get("/lanes")
    async def lanes(request):
        return {"lanes": [{"id": l.id, "reader": l.reader.kind if l.reader else "terminal"}
                          for l in gw.lanes.values()]}

    @app.get("/lanes/<lane_id>/member")
    async def member(request, lane_id):
        lane, err = lane_or_404(lane_id)
        if err:
            return err
        current = gw.current_member(lane)
        return {"lane": lane.id, "member": current.public() if current else None}

    @app.get("/lanes/<lane_id>/events")
    async def events(request, lane_id):
        lane, err = lane_or_404(lane_id)
        if err:
            return err
        return sse_response(request, _event_stream, lane)

    async def _event_stream(request, sse, lane):
        queue: asyncio.Queue = asyncio.Queue(maxsize=32)
        lane.listeners.add(queue)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15)
                    await sse.send(event, event=event["type"])
                except TimeoutError:
                    await sse.send("keepalive", comment=True)
        finally:
            lane.listeners.discard(queue)

    @app.post("/lanes/<lane_id>/taps")
    async def tap(request, lane_id):
        lane, err = lane_or_404(lane_id)
        if err:
            return err
        if lane.reader is not None and lane.reader.kind != "simulated":
            return error(409, "not_a_terminal_lane", f"lane {lane.id} reads cards with its own {lane.reader.kind} reader")
        try:
            data = _json_body(request)
            source, raw = data.get("source"), data.get("raw")
            if source not in SOURCES:
                raise engine.BasketError(f"source: must be one of {list(SOURCES)}")
            if not isinstance(raw, str) or not raw.strip() or len(raw) > 512:
                raise engine.BasketError("raw: required, the card's identifier as a non-empty string")
        except engine.BasketError as exc:
            return error(400, "bad_request", str(exc))
        verdict = await gw.handle_read(CardRead(lane.id, source, raw, gw.clock()))
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
            body, _ = error(status, exc.code, str(exc))
            body["error"].update({"field": exc.field, "text": exc.text})
            return body, status
        except CounterError as exc:
            body, _ = error(exc.status, exc.code, str(exc))
            if exc.text:
                body["error"]["text"] = exc.text
            return body, exc.status
        except NoMember as exc:
            return error(409, "no_member", str(exc))
        except QuoteChanged as exc:
            return error(409, "quote_changed", str(exc))
        except IdempotencyConflict as exc:
            return error(409, "idempotency_conflict", str(exc))
        except JournalFull as exc:
            return error(507, "journal_full", str(exc))
        except JournalError as exc:
            return error(507, "journal_unavailable", str(exc))
        if isinstance(result, Appended):
            body = {**result.response, "duplicate": result.duplicate}  # carries seq and tx_id
            return body, (200 if result.duplicate else 201)
        return result

    def with_lane(handler):
        async def route(request, lane_id, **url_args):
            lane, err = lane_or_404(lane_id)
            if err:
                return err
            try:
                body = _json_body(request)
            except engine.BasketError as exc:
                return error(400, "bad_request", str(exc))
            return await handler(lane, body, **url_args)
        route.__name__ = handler.__name__
        return route

    async def _quote(lane, body):
        return await answer(lambda: gw.quote(lane.id, body))

    async def _sale(lane, body):
        return await answer(lambda: gw.commit_sale(lane.id, body))

    async def _topup(lane, body):
        return await answer(lambda: gw.counter.topup(lane.id, body))

    async def _package_use(lane, body, package_id):
        return await answer(lambda: gw.counter.use_package(lane.id, package_id, body))

    app.post("/lanes/<lane_id>/quote")(with_lane(_quote))
    app.post("/lanes/<lane_id>/sales")(with_lane(_sale))
    app.post("/lanes/<lane_id>/topups")(with_lane(_topup))
    app.post("/lanes/<lane_id>/packages/<package_id>/uses")(with_lane(_package_use))

    def store_wide(operation):
        """A route for a counter operation that belongs to no lane."""
        async def route(request):
            try:
                body = _json_body(request)
            except engine.BasketError as exc:
                return error(400, "bad_request", str(exc))
            return await answer(lambda: operation(body))
        route.__name__ = operation.__name__
        return route

    app.post("/returns")(store_wide(gw.counter.sale_return))
    app.post("/cards/services")(store_wide(gw.counter.card_service))

    return app
