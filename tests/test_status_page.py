"""The store manager's status page (gateway/shell/status_page/), in a real
headless Chromium (Debian's package) against a real `storegate run`: the
page reads the gateway with a manager's token and shows readers, the link to
HQ, the backlog and its chart, rules and deny versions, in zh-CN and in en.
A screenshot of each language is saved in the test's directory and its path
printed to the terminal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from demo.testbed import http_json
from gateway.shell.status_page import choose_language
from tests import support

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                    "(`make test` installs it: TEST_APT in the Makefile)")


# -- the language ---------------------------------------------------------------------

@pytest.mark.parametrize("header,lang", [
    (None, "zh-CN"), ("", "zh-CN"), ("zh-CN,zh;q=0.9,en;q=0.8", "zh-CN"), ("en-US,en;q=0.9", "en"),
    ("en-GB;q=0.5, zh-TW;q=0.8", "zh-CN"), ("fr-FR, en;q=0.3", "en"), ("fr-FR", "zh-CN"),
    ("zh;q=0, en;q=0.1", "en"), ("en;q=abc, zh", "zh-CN"), ("en;q=2", "zh-CN"),
    ("x" * 10000 + ",en", "zh-CN"),          # only the first 256 characters are read
    ("de," * 40 + "en", "zh-CN"),            # and only the first 16 ranges
])
def test_the_language_is_the_browsers(header, lang):
    assert choose_language(header) == lang


# -- a real gateway ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """`storegate run` with the demo rules, no broker (the link to HQ is down), a
    simulated reader on lane 1, a lane terminal on lane 2 with a scanner that is
    not plugged in; one member tap and one sale waiting for HQ."""
    lanes = """
[[lanes]]
id = "1"
reader = "simulated"
[[lanes]]
id = "2"
reader = "terminal"
[[lanes.hid]]
kind = "scanner"
device = "/dev/input/by-id/usb-not-plugged-in-event-kbd"
"""
    with support.offline_gateway(tmp_path_factory.mktemp("status-page"), lanes=lanes) as gw:
        tap = http_json(gw.port, "POST", "/lanes/1/taps", {"source": "nfc", "raw": support.GOLD_UID},
                        token=gw.tokens["lane_terminal"])
        assert tap[1]["verdict"] == "accept", (tap, gw.log()[-3000:])
        sale = http_json(gw.port, "POST", "/lanes/1/sales", support.sale_body("pos1-page-1", member=True),
                         token=gw.tokens["pos"])
        assert sale[0] == 201, (sale, gw.log()[-3000:])
        yield gw


class Texts(HTMLParser):
    """The text under each element with an id, and the attributes of every element."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.elements: list[tuple[str, dict]] = []
        self._open: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag in ("meta", "link", "input", "br", "img"):
            return
        self._open.append(attrs.get("id"))
        if attrs.get("id"):
            self.by_id[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag not in ("meta", "link", "input", "br", "img") and self._open:
            self._open.pop()

    def handle_data(self, data):
        for element_id in self._open:
            if element_id:
                self.by_id[element_id] += data

    def text(self, element_id: str) -> str:
        return " ".join(self.by_id.get(element_id, "").split())


def browse(gw, lang: str, *, token: bool = True, name: str = "") -> tuple[Texts, str, object]:
    """Load the page in headless Chromium with this Accept-Language: (DOM, HTML, screenshot path)."""
    name = name or lang
    profile = gw.tmp / f"chromium-{name}"
    shot = gw.tmp / f"status-page-{name}.png"
    accept = {"zh-CN": "zh-CN,zh", "en": "en-US,en"}[lang]
    url = f"http://127.0.0.1:{gw.port}/status/page" + (f"#token={gw.tokens['manager']}" if token else "")
    argv = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--accept-lang={accept}", "--window-size=1200,1250",
            # Virtual time runs only while nothing is loading: the page's fetch of its data finishes first.
            # Under the page's 10 s refresh, so the page is drawn once (the clock check compares the
            # gateway's clock with the browser's, which virtual time moves on).
            "--virtual-time-budget=5000", f"--screenshot={shot}", "--dump-dom", url]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")       # Chromium's sandbox refuses root (CI runs the suite as root)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return Texts(done.stdout), done.stdout, shot


def show_screenshot(capsys, shot, what: str) -> None:
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    with capsys.disabled():
        print(f"\n[status page] screenshot, {what}: {shot}")


@needs_chromium
@pytest.mark.parametrize("lang,words", [
    ("zh-CN", {"readers-box": "读卡器", "uplink-state": "离线", "backlog-box": "待上传积压", "ready": "就绪",
               "absent": "未连接", "rules-box": "规则版本"}),
    ("en", {"readers-box": "Readers", "uplink-state": "offline", "backlog-box": "Backlog to HQ", "ready": "ready",
            "absent": "absent", "rules-box": "Rules version"}),
])
def test_the_page_shows_readers_backlog_and_rules_in_each_language(gateway, capsys, lang, words):
    dom, html, shot = browse(gateway, lang)
    assert re.search(rf'<html lang="{lang}"', html), html[:300]
    body = next(attrs for tag, attrs in dom.elements if tag == "body")
    assert body.get("data-loaded") == "1", "the page never rendered the gateway's data"
    assert dom.text("store") == "S001"
    # Readers and their state: lane 1's simulated reader is ready, lane 2's scanner is not plugged in.
    rows = [attrs for tag, attrs in dom.elements if tag == "tr" and "data-lane" in attrs]
    assert [(r["data-lane"], r["data-state"]) for r in rows] == [("1", "ready"), ("2", "terminal"), ("2", "absent")]
    readers = dom.text("readers")
    assert words["ready"] in readers and words["absent"] in readers
    assert words["readers-box"] in dom.text("readers-box")
    # The link to HQ is down; the sale waits in the backlog, charted.
    assert dom.text("uplink-state") == words["uplink-state"]
    assert dom.text("backlog-records") == "1" and words["backlog-box"] in dom.text("backlog-box")
    assert dom.text("backlog-seq") == "1"
    assert any(tag == "polyline" and attrs.get("id") == "chart-line" for tag, attrs in dom.elements)
    # Rules and deny list.
    assert dom.text("rules-version") == "v1" and words["rules-box"] in dom.text("rules-box")
    assert dom.text("deny-version") == "v0"
    # The token came in the address's fragment and is gone from it and from the page.
    assert gateway.tokens["manager"] not in html
    show_screenshot(capsys, shot, lang)


@needs_chromium
def test_without_a_token_the_page_asks_for_one_and_shows_nothing(gateway, capsys):
    dom, html, shot = browse(gateway, "en", token=False, name="no-token")
    hidden = {attrs.get("id"): "hidden" in attrs for tag, attrs in dom.elements if attrs.get("id")}
    assert hidden["login"] is False and hidden["content"] is True
    assert "Manager token needed" in dom.text("login")
    assert "S001" not in html and dom.text("backlog-records") == ""
    show_screenshot(capsys, shot, "no token")


def test_the_frame_is_open_and_the_data_needs_a_reading_terminal(gateway):
    import http.client

    def get(path: str, token: str | None = None, **headers) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            if token:
                headers["Authorization"] = f"Bearer {token}"
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    for path, kind in (("/status/page", "text/html"), ("/status/page.js", "text/javascript"),
                       ("/status/page.css", "text/css")):
        status, headers, body = get(path, **{"Accept-Language": "en"})
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
        assert b"S001" not in body                       # the frame holds nothing of the store
    assert get("/status/page.json")[0] == 401
    assert get("/status/page.json", gateway.tokens["lane_terminal"])[0] == 403
    status, headers, body = get("/status/page.json", gateway.tokens["manager"])
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert get("/metrics")[0] == 401
    assert get("/status/page", **{"Host": "evil.example"})[0] == 421   # DNS rebinding: refused like the API
