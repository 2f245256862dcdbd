# A minimal HTTP/1.0 POST client for MicroPython and CPython, so the board
# needs no urequests: one request per connection, a socket timeout, status
# and body back. Plain http only: the gateway is on the store LAN.

try:
    import usocket as socket
except ImportError:
    import socket

# The gateway's tap answer is well under 1 KB; a board without PSRAM has
# about 100 KB of heap, so a runaway answer must not be buffered whole.
MAX_RESPONSE_BYTES = 16 * 1024


def split_url(url_base):
    """'http://host[:port][/prefix]' -> (host, port, prefix without a trailing /)."""
    if not isinstance(url_base, str) or not url_base.startswith("http://"):
        raise ValueError("gateway URL must start with http:// (got %r)" % (url_base,))
    rest = url_base[len("http://"):]
    slash = rest.find("/")
    hostport, prefix = (rest, "") if slash < 0 else (rest[:slash], rest[slash:].rstrip("/"))
    host, port = hostport, 80
    if ":" in hostport:
        host, port_text = hostport.rsplit(":", 1)
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise ValueError("gateway URL %r: port %r must be a number from 1 to 65535" % (url_base, port_text))
    if not host:
        raise ValueError("gateway URL %r has no host" % url_base)
    return host, port, prefix


def _request_head(host, port, target, headers, body_len):
    lines = ["POST %s HTTP/1.0" % target, "Host: %s:%d" % (host, port),
             "Content-Length: %d" % body_len, "Connection: close"]
    for name in headers:
        line = "%s: %s" % (name, headers[name])
        if "\r" in line or "\n" in line:  # would split into a second header or the body
            raise ValueError("header %r contains a line break" % name)
        lines.append(line)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _content_length(head):
    for line in head.split(b"\r\n")[1:]:
        name_value = line.split(b":", 1)  # not partition(): optional on MicroPython
        if len(name_value) == 2 and name_value[0].strip().lower() == b"content-length":
            try:
                length = int(name_value[1])
            except ValueError:
                length = -1
            if length < 0:
                raise OSError("gateway sent a bad Content-Length: %r" % name_value[1][:20])
            return length
    return None


def _read_response(sock):
    """Read until the server closes or Content-Length is complete (a
    server that keeps the connection open must not cost us the timeout)."""
    data = b""
    expected = None  # total length, once the head is in and names a length
    while expected is None or len(data) < expected:
        chunk = sock.recv(1024)
        if not chunk:
            if expected is not None:
                raise OSError("gateway closed the connection after %d of %d bytes" % (len(data), expected))
            break
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            raise OSError("gateway response is over %d bytes" % MAX_RESPONSE_BYTES)
        if expected is None:
            end = data.find(b"\r\n\r\n")
            length = _content_length(data[:end]) if end >= 0 else None
            if length is not None:
                expected = end + 4 + length
    return data


def parse_response(data):
    """Raw HTTP response bytes -> (status, body bytes); OSError if malformed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise OSError("gateway response has no end of headers (%d bytes received)" % len(data))
    status_line = data[:end].split(b"\r\n", 1)[0]
    parts = status_line.split(None, 2)
    try:
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError
        status = int(parts[1])
    except ValueError:
        raise OSError("gateway sent a malformed status line: %r" % status_line[:60])
    length = _content_length(data[:end])
    body = data[end + 4:]
    return status, body if length is None else body[:length]


def http_post(url_base, path, headers, body, timeout_s=2.0):
    """POST body to url_base + path; returns (status, body bytes).

    Raises ValueError for a bad URL, path or header (a configuration
    mistake), OSError for everything the network or the server did wrong:
    unresolvable host, refused connection, timeout (applied to each socket
    operation), malformed or oversized response.
    """
    host, port, prefix = split_url(url_base)
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("path must start with '/', got %r" % (path,))
    request = _request_head(host, port, prefix + path, headers, len(body)) + body
    addresses = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not addresses:
        raise OSError("cannot resolve gateway host %r" % host)
    family, kind, proto = addresses[0][:3]
    sock = socket.socket(family, kind, proto)
    try:
        sock.settimeout(timeout_s)
        sock.connect(addresses[0][-1])
        sock.sendall(request)
        data = _read_response(sock)
    finally:
        sock.close()
    return parse_response(data)
