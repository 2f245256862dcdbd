#!/usr/bin/env python3
"""A small reference client for the storegate POS API (Python standard library only).

What a POS has to get right, in one place:

- **Credentials.** Every call but /health sends ``Authorization: Bearer
  <terminal-id>.<secret>``, the token the store manager issued for this
  terminal (``storegate terminals add``). Read it from a file or the
  environment, never from the command line (other users see that in ``ps``).
- **Events.** ``GET /lanes/<lane>/events`` is a server-sent event stream: a
  ``tap`` event when a member card is read on the lane, a ``sale`` event per
  committed sale. Every event has an id; on reconnect the client sends the
  last one as ``Last-Event-ID`` and the gateway replays what was missed, so
  none is lost or seen twice. A comment arrives every 15 s: silence for much
  longer means the connection is dead.
- **Selling safely.** A sale carries an ``idempotency_key`` made once per
  sale. When the answer is lost (timeout, connection reset, gateway
  restarting) the *same* body is sent again with the *same* key: the gateway
  answers 201 the first time and 200 with the first answer after that, so a
  sale is never recorded twice and the customer never pays twice.
  ``expected_total`` makes the gateway refuse (409 quote_changed) when the
  prices changed since the quote the customer saw.
- **Errors.** ``{"error": {"code", "message", "text": {"zh-CN", "en"}, "field"?}}``:
  show ``text`` to the cashier, log ``code``/``message``/``field``.

Usage (see examples/README.md)::

    export STOREGATE_TOKEN_FILE=/etc/pos/storegate.token
    python3 examples/pos_client.py --gateway http://192.168.10.2:8080 --lane 1 events
    python3 examples/pos_client.py --gateway http://192.168.10.2:8080 --lane 1 \\
        sell --item 6901234567892:4990:1:大米5kg --member
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import quote as urlquote
from urllib.parse import urlsplit

# Errors after which the same request may be sent again with the same key:
# the gateway did not record it (507 journal_unavailable says so) or was busy.
RETRYABLE_STATUS = {503}
RETRYABLE_CODES = {"journal_unavailable"}


class ApiError(Exception):
    """An error answer of the gateway."""

    def __init__(self, status: int, body: dict, retry_after: float | None = None) -> None:
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        self.status = status
        self.code = err.get("code", "unknown")
        self.field = err.get("field")
        self.text = err.get("text") or {"zh-CN": f"错误 {status}", "en": f"Error {status}"}
        self.retry_after = retry_after
        super().__init__(f"{status} {self.code}: {err.get('message', body)}")

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUS or self.code in RETRYABLE_CODES


class Unreachable(Exception):
    """No answer from the gateway: the request may or may not have been done."""


@dataclass
class Event:
    id: str | None
    type: str
    data: dict


@dataclass
class Gateway:
    """The POS API of one store gateway."""

    base_url: str
    token: str
    timeout: float = 10.0
    cafile: str | None = None  # the gateway's own certificate or CA, when api.tls is on
    _local: threading.local = field(default_factory=threading.local, repr=False)

    # -- plumbing ------------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        url = urlsplit(self.base_url)
        if url.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.cafile)
            return http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)

    def _headers(self, extra: dict | None = None) -> dict:
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}  # /health needs none
        return {**auth, "Accept": "application/json", **(extra or {})}

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """One call on a kept-alive connection (one per thread). Raises
        Unreachable when no complete answer came, ApiError for an error."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect(self.timeout)
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        headers = self._headers({"Content-Type": "application/json"} if data is not None else None)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._local.conn = None
            raise Unreachable(f"{method} {path}: {exc!r}") from exc
        if resp.getheader("Connection", "").lower() == "close":
            conn.close()
            self._local.conn = None
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            answer = {"error": {"code": "not_json", "message": payload[:200].decode(errors="replace")}}
        if resp.status >= 400:
            retry_after = resp.getheader("Retry-After")
            raise ApiError(resp.status, answer, float(retry_after) if retry_after else None)
        return resp.status, answer

    # -- calls ---------------------------------------------------------------------

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def member(self, lane: str) -> dict | None:
        return self.request("GET", f"/lanes/{urlquote(lane)}/member")[1]["member"]

    def quote(self, lane: str, lines: list[dict], *, member: bool | None = None,
              tender: dict | None = None) -> dict:
        return self.request("POST", f"/lanes/{urlquote(lane)}/quote", _basket(lines, member, tender))[1]

    def sell(self, lane: str, lines: list[dict], *, member: bool | None = None, tender: dict | None = None,
             expected_total: int | None = None, key: str | None = None, attempts: int = 6) -> dict:
        """Commit a sale exactly once, however often the answer is lost.
        Returns the sale (``seq``, ``tx_id``, ``total``, ``receipt``...);
        ``duplicate`` is true when an earlier attempt had done it."""
        body = _basket(lines, member, tender)
        body["idempotency_key"] = key or new_key("sale")
        if expected_total is not None:
            body["expected_total"] = expected_total
        return self.send_once("POST", f"/lanes/{urlquote(lane)}/sales", body, attempts)

    def top_up(self, lane: str, *, amount_fen: int | None = None, package_id: str | None = None,
               method: str = "cash", reference: str | None = None, key: str | None = None) -> dict:
        """Stored-value top-up for the lane's member, saying how it was paid."""
        body: dict = {"idempotency_key": key or new_key("topup"), "payment": {"method": method}}
        if reference:
            body["payment"]["reference"] = reference
        if package_id is not None:
            body["package_id"] = package_id
        else:
            body["amount_fen"] = amount_fen
        return self.send_once("POST", f"/lanes/{urlquote(lane)}/topups", body)

    def send_once(self, method: str, path: str, body: dict, attempts: int = 6) -> dict:
        """A journaled operation: the same body and key until an answer
        comes. Connection trouble and "not recorded, retry" errors are
        retried with backoff; any other error is the answer."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return self.request(method, path, body)[1]
            except Unreachable as exc:
                problem: Exception = exc  # outcome unknown: only the same key may be sent again
            except ApiError as exc:
                if not exc.retryable:
                    raise
                problem = exc
            if attempt == attempts:
                raise problem
            time.sleep(delay + random.uniform(0, delay / 2))
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    # -- events --------------------------------------------------------------------

    def events(self, lane: str, *, last_event_id: str | None = None, stop: threading.Event | None = None,
               idle_timeout: float = 45.0) -> Iterator[Event]:
        """The lane's events, forever (until ``stop``): reconnects by itself
        and resumes after the last event seen."""
        delay = 0.5
        while stop is None or not stop.is_set():
            conn = self._connect(idle_timeout)  # keep-alive comments come every 15 s
            try:
                headers = self._headers({"Accept": "text/event-stream", "Cache-Control": "no-cache"})
                if last_event_id:
                    headers["Last-Event-ID"] = last_event_id
                conn.request("GET", f"/lanes/{urlquote(lane)}/events", headers=headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    payload = resp.read()
                    raise ApiError(resp.status, json.loads(payload) if payload else {})
                delay = 0.5
                for event in _parse_sse(resp):
                    if stop is not None and stop.is_set():
                        return
                    if event is None:
                        continue  # a keep-alive
                    if event.id:
                        last_event_id = event.id
                    yield event
            except ApiError as exc:
                if exc.status in (401, 403, 404):
                    raise  # a wrong credential or lane does not fix itself
            except (OSError, http.client.HTTPException):
                pass  # dropped, timed out or the gateway restarted: reconnect
            finally:
                conn.close()
            if stop is not None and stop.wait(delay):
                return
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _parse_sse(resp) -> Iterator[Event | None]:
    """Server-sent events (text/event-stream) from a response, as they come;
    None for each keep-alive comment."""
    event_id, event_type, data = None, "message", []
    while True:
        raw = resp.readline()
        if not raw:
            return  # the stream ended
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:  # a blank line ends an event
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = {"text": text}
                yield Event(event_id, event_type, payload)
            event_type, data = "message", []
            continue
        if line.startswith(":"):
            yield None  # a comment: the keep-alive
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "event":
            event_type = value
        elif name == "data":
            data.append(value)


def _basket(lines: list[dict], member: bool | None, tender: dict | None) -> dict:
    body: dict = {"lines": lines}
    if member is not None:
        body["member"] = member
    if tender:
        body["tender"] = tender
    return body


def new_key(what: str) -> str:
    """An idempotency key: made once per operation, kept for its retries."""
    return f"{what}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- command line

def _token(args) -> str:
    path = args.token_file or os.environ.get("STOREGATE_TOKEN_FILE")
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    token = os.environ.get("STOREGATE_TOKEN")
    if not token:
        sys.exit("no credential: set STOREGATE_TOKEN_FILE (or STOREGATE_TOKEN), or pass --token-file")
    return token


def _item(text: str) -> dict:
    """sku:unit_price_fen[:qty[:name[:category]]]"""
    parts = text.split(":", 4)
    line = {"sku": parts[0], "unit_price": int(parts[1]), "qty": int(parts[2]) if len(parts) > 2 else 1}
    if len(parts) > 3:
        line["name"] = parts[3]
    if len(parts) > 4:
        line["category"] = parts[4]
    return line


def _show(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="storegate POS reference client")
    p.add_argument("--gateway", required=True, help="e.g. http://192.168.10.2:8080")
    p.add_argument("--lane", default="1")
    p.add_argument("--token-file", help="file holding <terminal-id>.<secret> (or STOREGATE_TOKEN_FILE)")
    p.add_argument("--cafile", help="CA or certificate of the gateway, for https")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("health")
    sub.add_parser("member")
    ev = sub.add_parser("events", help="follow the lane's events (Ctrl-C to stop)")
    ev.add_argument("--last-event-id")
    for name in ("quote", "sell"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--item", action="append", required=True, type=_item,
                         help="sku:unit_price_fen[:qty[:name[:category]]], repeatable")
        cmd.add_argument("--member", action=argparse.BooleanOptionalAction, default=None)
        cmd.add_argument("--points", type=int, default=0)
        cmd.add_argument("--stored-value-fen", type=int, default=0)
    top = sub.add_parser("topup")
    top.add_argument("--amount-fen", type=int)
    top.add_argument("--package-id")
    top.add_argument("--method", default="cash",
                     choices=["cash", "bank_card", "wechat", "alipay", "unionpay", "other"])
    top.add_argument("--reference")
    args = p.parse_args(argv)

    gw = Gateway(args.gateway, "" if args.command == "health" else _token(args), cafile=args.cafile)
    try:
        if args.command == "health":
            _show(gw.health())
        elif args.command == "member":
            _show(gw.member(args.lane))
        elif args.command == "events":
            for event in gw.events(args.lane, last_event_id=args.last_event_id):
                print(f"[{event.id}] {event.type}: {json.dumps(event.data, ensure_ascii=False)}", flush=True)
        elif args.command in ("quote", "sell"):
            tender = {k: v for k, v in (("points", args.points), ("stored_value_fen", args.stored_value_fen)) if v}
            q = gw.quote(args.lane, args.item, member=args.member, tender=tender or None)
            print("\n".join(q["receipt"]["zh-CN"]))
            if args.command == "sell":
                # The total the customer was shown: refused (409) if the prices changed since.
                sale = gw.sell(args.lane, args.item, member=args.member, tender=tender or None,
                               expected_total=q["total"])
                print(f"sale {sale['seq']} ({sale['tx_id']}) committed, total {sale['total']} fen"
                      + (" (answer of an earlier attempt)" if sale.get("duplicate") else ""))
        elif args.command == "topup":
            _show(gw.top_up(args.lane, amount_fen=args.amount_fen, package_id=args.package_id,
                            method=args.method, reference=args.reference))
    except ApiError as exc:
        print(f"{exc.text['zh-CN']} / {exc.text['en']}", file=sys.stderr)
        print(f"  ({exc}{f', field {exc.field}' if exc.field else ''})", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"gateway unreachable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
