# A minimal HTTP/1.0 POST client for MicroPython and CPython (no urequests
# needed): one request per connection, a timeout, status and body back.

try:
    import usocket as socket
except ImportError:
    import socket


def parse_base(url_base):
    """'http://host:port' -> (host, port). Only plain http on the store LAN."""
    if not url_base.startswith("http://"):
        raise ValueError("gateway URL must start with http:// (got %r)" % url_base)
    hostport = url_base[7:].split("/", 1)[0]
    if ":" in hostport:
        host, port = hostport.rsplit(":", 1)
        return host, int(port)
    return hostport, 80


def http_post(url_base, path, headers, body, timeout_s=2.0):
    """POST body to url_base + path; returns (status, body bytes).
    Raises OSError on connection errors and timeouts."""
    host, port = parse_base(url_base)
    addr = socket.getaddrinfo(host, port)[0][-1]
    s = socket.socket()
    try:
        s.settimeout(timeout_s)
        s.connect(addr)
        head = "POST %s HTTP/1.0\r\nHost: %s\r\nContent-Length: %d\r\n" % (path, host, len(body))
        for k in headers:
            head += "%s: %s\r\n" % (k, headers[k])
        s.send(head.encode() + b"\r\n" + body)
        chunks = []
        while True:
            data = s.recv(1024)
            if not data:
                break
            chunks.append(data)
    finally:
        s.close()
    response = b"".join(chunks)
    head, _, payload = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2:
        raise OSError("malformed HTTP response from the gateway")
    return int(status_line[1]), payload
