"""The store manager's status page, served by the gateway (zh-CN and en).

    GET /status/page        the page (HTML; open: it holds no data)
    GET /status/page.js     its script (open)
    GET /status/page.css    its style sheet (open)
    GET /status/page.json   what the page shows (a terminal with "read": a manager's token)

No build step and nothing from the internet: three static files in this
package, the chart drawn as inline SVG by page.js. The page asks for a
manager's terminal token once (kept in the browser's localStorage, or given
in the address's fragment ``#token=...``, which the browser never sends) and
sends it as ``Authorization: Bearer`` with every read of page.json, as
`storegate status` does for ``/status``: without it the LAN sees the page's
empty frame and nothing of the store.

The language is the browser's (``Accept-Language``: zh-CN unless English is
preferred) until the toggle on the page chooses the other. Nothing else of
the request is read; every answer has a strict Content-Security-Policy
(same origin only, no inline script, no frames).
"""

from __future__ import annotations

from importlib import resources

from gateway.shell.metrics import HISTORY_SAMPLES, RECENT_FAULTS, SAMPLE_EVERY_S, product_version

PAGE_PATH = "/status/page"
LANGUAGES = ("zh-CN", "en")
MAX_ACCEPT_LANGUAGE = 256     # characters of Accept-Language read; the rest is ignored
MAX_LANGUAGE_RANGES = 16

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


STATIC = {"page.js": _static("page.js"), "page.css": _static("page.css")}
PAGE = _static("index.html").decode()


def choose_language(accept_language: str | None) -> str:
    """"zh-CN" or "en" for an Accept-Language header: the preferred of the
    two by q-value (zh-CN when neither is named or they tie)."""
    best = {"zh-CN": -1.0, "en": -1.0}
    for n, item in enumerate((accept_language or "")[:MAX_ACCEPT_LANGUAGE].split(",")):
        if n >= MAX_LANGUAGE_RANGES:
            break
        tag, _, params = item.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:7])
            except ValueError:
                q = 0.0
        if not 0.0 < q <= 1.0:
            continue
        lang = "zh-CN" if tag == "zh" or tag.startswith("zh-") else "en" if tag == "en" or tag.startswith("en-") \
            else None
        if lang and q > best[lang]:
            best[lang] = q
    return "en" if best["en"] > best["zh-CN"] else "zh-CN"


def page_html(lang: str) -> bytes:
    return PAGE.replace('lang="zh-CN"', f'lang="{lang}"', 1).encode()


async def page_data(gw) -> dict:
    """What the page shows. ``gw``: a gateway.shell.service.Gateway."""
    m = gw.metrics
    s = await m.snapshot()
    up = s["uplink"]
    rules = s["rules"]
    backlog = s["backlog"]
    now = s["now"]
    clock = {"now": now, "started_at": s["started_at"], "rules_issued_at": rules["issued_at"] if rules else None,
             "last_hq_contact": up.last_hq_contact, "check": s["clock_check"]}
    # What the gateway can tell on its own: a clock before the rules HQ issued is wrong (the page adds the
    # browser's clock; the gateway's own clock check, where there is one, reports a fault).
    clock["behind_rules_s"] = (rules["issued_at"] - now) if rules and rules["issued_at"] > now + 60 else None
    return {
        "store": gw.store_id,
        "version": product_version(),
        "now": now,
        "readers": s["readers"],
        "uplink": {"connected": up.connected, "last_hq_contact": up.last_hq_contact, "reconnects": up.reconnects,
                   "acked_records": up.acked_records},
        "backlog": {"records": backlog["depth"], "oldest_age_s": backlog["oldest_age_s"],
                    "last_seq": backlog["last_seq"]},
        "history": {"every_s": SAMPLE_EVERY_S, "max_samples": HISTORY_SAMPLES,
                    "samples": [[t, depth, age] for t, depth, age in m.history]},
        "rules": rules,
        "rules_rejection": gw.rules.last_rejection,
        "deny": {"version": s["deny_version"], "issued_at": s["deny_issued_at"]},
        "clock": clock,
        "journal": {"bytes": backlog["bytes"], "max_bytes": s["journal_max_bytes"],
                    "records": s["appends"], "commit_groups": s["commit"].groups},
        "disk": s["disk"],
        "faults": [{"text": t, "since": since} for t, since in m.active_faults.items()],
        "cleared_faults": list(m.cleared_faults)[-RECENT_FAULTS:],
        "taps": dict(gw.stats),
    }


def routes(gw) -> list[tuple[str, object, str | None]]:
    """(path, handler, action the terminal needs or None: open) for gateway/shell/api.py."""

    async def page(request):
        lang = choose_language(request.headers.get("Accept-Language"))
        return page_html(lang), 200, {**SECURITY_HEADERS, "Content-Type": TYPES["html"],
                                      "Content-Language": lang, "Vary": "Accept-Language"}

    def static(name: str):
        body, kind = STATIC[name], name.rsplit(".", 1)[1]

        async def serve(request):
            return body, 200, {**SECURITY_HEADERS, "Content-Type": TYPES[kind]}
        serve.__name__ = f"status_page_{kind}"
        return serve

    async def data(request):
        return await page_data(gw), 200, {**SECURITY_HEADERS, "Cache-Control": "no-store"}

    return [(PAGE_PATH, page, None), (PAGE_PATH + ".js", static("page.js"), None),
            (PAGE_PATH + ".css", static("page.css"), None), (PAGE_PATH + ".json", data, "read")]
