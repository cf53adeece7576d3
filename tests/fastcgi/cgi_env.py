"""Building the CGI environment of a test request."""

from __future__ import annotations


def cgi_env(script: str, body: bytes = b"", **headers: str) -> dict[bytes, bytes]:
    env = {
        b"SCRIPT_FILENAME": script.encode(),
        b"SCRIPT_NAME": b"/" + script.rsplit("/", 1)[-1].encode(),
        b"REQUEST_URI": b"/" + script.rsplit("/", 1)[-1].encode(),
        b"REQUEST_METHOD": b"POST",
        b"CONTENT_TYPE": b"application/octet-stream",
        b"CONTENT_LENGTH": str(len(body)).encode(),
        b"SERVER_PROTOCOL": b"HTTP/1.1",
        b"GATEWAY_INTERFACE": b"CGI/1.1",
    }
    for name, value in headers.items():
        env[b"HTTP_" + name.upper().encode()] = value.encode()
    return env
