"""Virtual contactless cards for the vpcd driver (vsmartcard), for the tests.

vpcd is a PC/SC reader driver loaded by pcscd. Each of its slots listens on a
TCP port; a virtual card "enters the field" by connecting to that port and
"leaves the field" by closing the connection. Every message in both
directions is a 2-byte big-endian length followed by the payload. A payload
of one byte from the driver is a control command: 0x00 power off, 0x01 power
on, 0x02 reset (no answer to these), 0x04 get ATR (answered with the ATR).
Any longer payload is a command APDU, answered with the response APDU.

pcscd polls presence by asking for the ATR every few hundred milliseconds,
so a card that closes its socket is seen as removed on the next poll, or at
once by the APDU that was in flight.

The cards answer the PC/SC part 3 pseudo-APDUs of contactless readers such as
the ACR122U: FF CA 00 00 00 (get UID) and FF B0 00 <page> 10 (read 16 bytes
from an NTAG21x page), and, for the NTAG 424 DNA, the ISO 7816-4 commands of
the NFC Forum Type 4 tag (select NDEF application, select file, read binary).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

SW_OK = b"\x90\x00"
SW_WRONG_PAGE = b"\x6a\x82"        # file / page not found
SW_NOT_SUPPORTED = b"\x6a\x81"     # function not supported
SW_CLA_NOT_SUPPORTED = b"\x6e\x00"
SW_WRONG_LENGTH = b"\x67\x00"
SW_NOT_SELECTED = b"\x69\x86"      # command not allowed: no file selected

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0x00, 0x01, 0x02, 0x04

# ATRs a PC/SC part 3 reader (ACR122U) builds for these cards.
ATR_NTAG21X = bytes.fromhex("3B8F8001804F0CA0000003060300030000000068")
ATR_ISO14443_4 = bytes.fromhex("3B8180018080")


class VirtualCard:
    """A card on one vpcd slot, answered from its own thread.

    insert() connects (the tap), remove() closes (the card is taken away).
    `pull_away_on(apdu) -> bool`, when set, makes the card leave the field
    when that APDU arrives, before answering: a card pulled away mid-read.
    """

    atr = ATR_ISO14443_4

    def __init__(self, port: int, *, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        self.pull_away_on: Callable[[bytes], bool] | None = None
        self.apdus: list[bytes] = []  # every command APDU received, in order
        self.activations = 0           # power-ons: one per tap as pcscd connects
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- the field ---------------------------------------------------------
    def insert(self, timeout: float = 15.0) -> "VirtualCard":
        """Enter the field; retries while the slot is not listening (pcscd starting)."""
        if self.present:
            raise RuntimeError("card is already on the reader")
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=2)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"vpcd slot {self.address} not reachable: {exc}") from None
                time.sleep(0.1)
        sock.settimeout(None)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                        name=f"vcard-{self.address[1]}")
        self._thread.start()
        return self

    def remove(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            _close(sock)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None

    @property
    def present(self) -> bool:
        return self._sock is not None and self._thread is not None and self._thread.is_alive()

    # -- the wire ----------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                message = _recv_message(sock)
                if message is None:
                    break  # pcscd went away (killed, restarted) or remove() closed us
                if len(message) == 1:
                    if message[0] == CTRL_ATR:
                        _send_message(sock, self.atr)
                    elif message[0] in (CTRL_ON, CTRL_RESET):
                        self.activations += 1
                        self.power_on()
                    continue
                self.apdus.append(message)
                if self.pull_away_on is not None and self.pull_away_on(message):
                    break
                _send_message(sock, self.respond(message))
        except OSError:
            pass
        finally:
            _close(sock)
            if self._sock is sock:
                self._sock = None

    # -- the card ----------------------------------------------------------
    def power_on(self) -> None:
        """A new activation in the field: reset per-session state."""

    def respond(self, apdu: bytes) -> bytes:
        raise NotImplementedError


class Ntag215(VirtualCard):
    """NTAG215: 135 pages of 4 bytes; user memory is pages 4..129."""

    atr = ATR_NTAG21X
    PAGES = 135
    USER_FIRST_PAGE = 4

    def __init__(self, port: int, uid: str = "04A1B2C3D4E5F6", user_data: bytes = b"", **kw) -> None:
        super().__init__(port, **kw)
        self.uid = bytes.fromhex(uid)
        assert len(self.uid) == 7
        u = self.uid
        memory = bytearray(self.PAGES * 4)
        memory[0:4] = bytes([u[0], u[1], u[2], 0x88 ^ u[0] ^ u[1] ^ u[2]])  # UID0-2, BCC0
        memory[4:8] = u[3:7]
        memory[8] = u[3] ^ u[4] ^ u[5] ^ u[6]                                 # BCC1
        memory[9] = 0x48                                                      # internal
        memory[12:16] = bytes.fromhex("E1103E00")                             # capability container
        user = (self.PAGES - 5 - self.USER_FIRST_PAGE) * 4
        if len(user_data) > user:
            raise ValueError("user data larger than the NTAG215 user memory")
        start = self.USER_FIRST_PAGE * 4
        memory[start:start + len(user_data)] = user_data
        self.memory = memory

    def respond(self, apdu: bytes) -> bytes:
        if apdu == bytes.fromhex("FFCA000000"):
            return self.uid + SW_OK
        if apdu[:3] == b"\xff\xb0\x00" and len(apdu) == 5:
            page, length = apdu[3], apdu[4]
            if page >= self.PAGES:
                return SW_WRONG_PAGE
            if length != 16:
                return SW_WRONG_LENGTH
            # Like the chip's READ command: past the last page it rolls over to page 0.
            doubled = self.memory + self.memory
            return bytes(doubled[page * 4: page * 4 + 16]) + SW_OK
        return SW_NOT_SUPPORTED if apdu[0] == 0xFF else SW_CLA_NOT_SUPPORTED


NDEF_AID = bytes.fromhex("D2760000850101")
NDEF_FILE_ID = bytes.fromhex("E104")
URI_PREFIX_HTTPS = 0x04


class Ntag424Dna(VirtualCard):
    """NTAG 424 DNA with Secure Dynamic Messaging on its NDEF file.

    The NDEF file holds one URI record, https://<base>?picc_data=<e>&cmac=<c>,
    with e = AES-CBC(meta_read_key, C7 || UID || SDMReadCtr (LE) || random)
    and c = the odd bytes of CMAC(session MAC key, empty input), computed here
    independently of cards/ntag424.py. SDMReadCtr goes up once per
    activation, at the first read of the NDEF file, as on the chip.

    `replay_url`, when set, is served instead: a clone that recorded one SUN
    message and plays it back.
    """

    atr = ATR_ISO14443_4

    def __init__(self, port: int, uid: str = "04DE5F1EACC040", *, meta_read_key: bytes = bytes(16),
                 file_read_key: bytes = bytes(16), counter: int = 0,
                 base_url: str = "member.example.com/t", **kw) -> None:
        super().__init__(port, **kw)
        self.uid = bytes.fromhex(uid)
        self.meta_read_key = meta_read_key
        self.file_read_key = file_read_key
        self.counter = counter
        self.base_url = base_url
        self.replay_url: str | None = None
        self.last_url: str | None = None
        self._selected_app = False
        self._selected_file = False
        self._ndef_file: bytes | None = None

    def power_on(self) -> None:
        self._selected_app = self._selected_file = False
        self._ndef_file = None

    def sun_url(self, counter: int) -> str:
        picc = bytes([0xC7]) + self.uid + counter.to_bytes(3, "little") + os.urandom(5)
        enc = Cipher(algorithms.AES(self.meta_read_key), modes.CBC(bytes(16))).encryptor()
        picc_data = enc.update(picc) + enc.finalize()
        session_key = _cmac(self.file_read_key, bytes.fromhex("3CC300010080") + self.uid + counter.to_bytes(3, "little"))
        mac = _cmac(session_key, b"")[1::2]
        return f"https://{self.base_url}?picc_data={picc_data.hex().upper()}&cmac={mac.hex().upper()}"

    def _file(self) -> bytes:
        if self._ndef_file is None:
            if self.replay_url is not None:
                url = self.replay_url
            else:
                self.counter += 1
                url = self.sun_url(self.counter)
            self.last_url = url
            uri = url.removeprefix("https://").encode()
            payload = bytes([URI_PREFIX_HTTPS]) + uri
            record = bytes([0xD1, 0x01, len(payload)]) + b"U" + payload  # MB ME SR, TNF well-known
            self._ndef_file = len(record).to_bytes(2, "big") + record
        return self._ndef_file

    def respond(self, apdu: bytes) -> bytes:
        if apdu == bytes.fromhex("FFCA000000"):
            return self.uid + SW_OK
        cla, ins, p1, p2 = apdu[:4]
        if cla == 0x00 and ins == 0xA4 and p1 == 0x04:          # select by DF name
            self._selected_app = apdu[5:5 + apdu[4]] == NDEF_AID
            self._selected_file = False
            return SW_OK if self._selected_app else SW_WRONG_PAGE
        if cla == 0x00 and ins == 0xA4 and p1 == 0x00:          # select EF by id
            self._selected_file = self._selected_app and apdu[5:7] == NDEF_FILE_ID
            return SW_OK if self._selected_file else SW_WRONG_PAGE
        if cla == 0x00 and ins == 0xB0:                          # read binary
            if not self._selected_file:
                return SW_NOT_SELECTED
            offset, length = (p1 << 8) | p2, apdu[4] if len(apdu) > 4 else 0
            data = self._file()
            if offset > len(data):
                return b"\x6b\x00"
            return data[offset: offset + (length or 256)] + SW_OK
        return SW_NOT_SUPPORTED if cla == 0xFF else SW_CLA_NOT_SUPPORTED


def _cmac(key: bytes, message: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(message)
    return c.finalize()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv_message(sock: socket.socket) -> bytes | None:
    header = _recv_exact(sock, 2)
    if header is None:
        return None
    (length,) = struct.unpack(">H", header)
    return _recv_exact(sock, length) if length else b""


def _send_message(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
