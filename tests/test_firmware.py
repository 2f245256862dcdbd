"""Lane-reader firmware: its logic under CPython and under the real
MicroPython interpreter, and a CPython run against a real gateway."""

import http.server
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import GOLD_UID, HQ, GatewayProc, wait_until

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
CHECKS = Path(__file__).parent / "firmware_checks.py"
RUNNER = Path(__file__).parent / "micropython_runner.mjs"


def _micropython(script: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    assert node, "node is not installed: run 'make test' (it installs nodejs) or 'apt-get install nodejs'"
    return subprocess.run([node, str(RUNNER), str(FIRMWARE), str(script)], capture_output=True, text=True,
                          timeout=60)


def test_checks_under_cpython():
    out = subprocess.run([sys.executable, str(CHECKS)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(FIRMWARE)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "impl cpython" in out.stdout and "firmware checks ok" in out.stdout


def test_checks_under_real_micropython():
    out = _micropython(CHECKS)
    assert out.returncode != 2, out.stderr  # 2: the interpreter is missing, run `make micropython`
    assert out.returncode == 0, out.stdout + out.stderr
    assert "impl micropython" in out.stdout and "firmware checks ok" in out.stdout


def test_every_firmware_file_compiles_under_micropython(tmp_path):
    script = tmp_path / "compile_all.py"
    names = sorted(p.name for p in FIRMWARE.glob("*.py") if p.name != "__init__.py")
    script.write_text(
        "for name in %r:\n"
        "    with open('/lib/' + name) as f:\n"
        "        compile(f.read(), name, 'exec')\n"
        "    print('compiled', name)\n" % names)
    out = _micropython(script)
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(f"compiled {n}" in out.stdout for n in names)


def test_a_failing_check_fails_under_micropython(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import lane_reader\nassert lane_reader.uid_to_hex(b'\\x01\\x02\\x03\\x04') == 'nope'\n")
    assert _micropython(script).returncode == 1


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            threading.Event().wait(2)
        status = 200 if self.path == "/ok" else 404
        try:
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b'{"echo": ' + body + b"}")
        except BrokenPipeError:
            pass  # the client gave up (the timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_client(http_server):
    sys.path.insert(0, str(FIRMWARE))
    try:
        from http_client import http_post
    finally:
        sys.path.remove(str(FIRMWARE))
    assert http_post(http_server, "/ok", {"X-A": "1"}, b'{"a":1}') == (200, b'{"echo": {"a":1}}')
    assert http_post(http_server, "/missing", {}, b"1")[0] == 404
    with pytest.raises(OSError):
        http_post(http_server, "/slow", {}, b"1", timeout_s=0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(OSError):
        http_post(f"http://127.0.0.1:{closed}", "/ok", {}, b"1")
    with pytest.raises(ValueError, match="http://"):
        http_post("https://x", "/", {}, b"")


def test_lane_reader_against_a_real_gateway(tmp_path, broker):
    """The firmware's loop (CPython) with a fake NFC front end, posting to a gateway process."""
    sys.path.insert(0, str(FIRMWARE))
    try:
        from http_client import http_post
        from lane_reader import LaneReader
    finally:
        sys.path.remove(str(FIRMWARE))
    hq = HQ(tmp_path, broker.port).start()
    assert hq.publish_rules().returncode == 0
    gw = GatewayProc(tmp_path, broker.port).start()
    try:
        wait_until(lambda: gw.status()["rules_version"] == 1, what="rules applied")
        base = f"http://127.0.0.1:{gw.api_port}"
        reads = [bytes.fromhex(GOLD_UID), None, None, None, None, bytes.fromhex("04FFFFFFFFFFFF")]

        class Nfc:
            def poll(self):
                return reads.pop(0) if reads else None

        class Leds:
            shown = []

            def show(self, p):
                self.shown.append(p)

        ticks = iter(range(0, 10_000, 100))
        reader = LaneReader("1", Nfc(), lambda p, h, b: http_post(base, p, h, b), Leds(), lambda: next(ticks))
        for _ in range(6):
            reader.step()
        assert Leds.shown == ["accept", "deny"]
        assert gw.status()["lanes"]["1"]["taps"] == 2        # held card: one tap; the second card: one
        assert gw.call("GET", "/lanes/1/member")[1]["member"] is None  # the refused card ended the member's visit
    finally:
        gw.stop()
        hq.stop()
