"""The gateway under systemd, as systemd sees it: the notify socket, the journal
stream, and the exit code that stops a restart loop.

Each test starts the real `storegate run` process with what systemd would give
it (NOTIFY_SOCKET, WATCHDOG_USEC, JOURNAL_STREAM) and listens like systemd.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.support import GatewayProc, free_port

CONFIG_ERROR_EXIT = 2  # deploy/systemd/storegate-gateway.service: RestartPreventExitStatus=2


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_ready_only_once_the_pos_api_accepts_then_watchdog_pings(tmp_path):
    gw = GatewayProc(tmp_path, free_port())  # no broker: the store serves its lanes offline
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(0.05)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(notify),
               "WATCHDOG_USEC": "1000000"}  # WatchdogSec=1s: a ping every 0.5 s
        with open(gw.log_path, "ab") as log:
            proc = subprocess.Popen(gw.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        gw.proc = proc
        try:
            messages: list[tuple[float, str, bool]] = []  # (time, message, did the API accept just then)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum("WATCHDOG=1" in m for _, m, _ in messages) < 3:
                try:
                    data = listener.recv(4096).decode()
                except TimeoutError:
                    assert proc.poll() is None, f"gateway exited:\n{gw.log()[-3000:]}"
                    continue
                messages.append((time.monotonic(), data, _accepts(gw.api_port) if "READY=1" in data else False))
        finally:
            gw.stop()
        # The stop was announced.
        listener.settimeout(1)
        try:
            last = listener.recv(4096).decode()
        except TimeoutError:
            last = ""

    assert messages, f"nothing on NOTIFY_SOCKET:\n{gw.log()[-3000:]}"
    first_time, first, accepted = messages[0]
    assert first.startswith("READY=1"), messages
    assert "STATUS=POS API on port" in first
    assert accepted, "READY=1 came before the POS API accepted connections"
    pings = [t for t, m, _ in messages[1:] if m == "WATCHDOG=1"]
    assert len(pings) >= 2, messages
    gaps = [b - a for a, b in zip([first_time, *pings], pings)]
    assert all(gap < 1.0 for gap in gaps), gaps  # within WatchdogSec
    assert "STOPPING=1" in last


def test_log_lines_carry_journald_priorities_when_stderr_is_the_journal(tmp_path):
    gw = GatewayProc(tmp_path, free_port())
    with open(gw.log_path, "ab") as log:
        st = os.fstat(log.fileno())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        env.pop("NOTIFY_SOCKET", None)
        gw.proc = subprocess.Popen(gw.argv, stdout=log, stderr=log, env=env)
    try:
        from demo.testbed import wait_for_port
        wait_for_port(gw.api_port, 20)
    finally:
        gw.stop()
    lines = gw.log().splitlines()
    assert any(line.startswith("<6>storegate: POS API on") for line in lines), lines
    # No HQ key in this config: an error, filed as one.
    assert any(line.startswith("<3>storegate.rules:") for line in lines), lines
    logged = [line for line in lines if ": " in line and not line.startswith("<")]
    assert not logged, f"lines without a priority: {logged}"


def test_a_missing_mqtt_tls_file_stops_start_up_naming_the_key(tmp_path):
    gw = GatewayProc(tmp_path, free_port())
    missing = tmp_path / "no-such-ca.pem"
    gw.config.write_text(gw.config.read_text().replace(
        "keepalive = 5\n", f'keepalive = 5\n[mqtt.tls]\nca_file = "{missing}"\n'))
    result = subprocess.run(gw.argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == CONFIG_ERROR_EXIT, result.stderr
    assert f"mqtt.tls.ca_file: cannot read {missing}: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_api_port_stops_start_up_naming_the_key(tmp_path):
    gw = GatewayProc(tmp_path, free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", gw.api_port))
        taken.listen()
        result = subprocess.run(gw.argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == CONFIG_ERROR_EXIT, result.stderr
    assert "api.host/api.port" in result.stderr and "Traceback" not in result.stderr
