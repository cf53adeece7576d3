"""The bundled sample FastCGI backend: a flup WSGI app on a unix socket.

It stands in for a php-fpm pool in the README's first command (nothing beyond pip is needed)
and in the tests: every request it receives is printed as one line and, with ``--record``,
appended to a JSON-lines file with the CGI variables and the exact body, so a test can check
what a backend really got.  A JSON payload may steer the answer, as the PHP test script does:
``{"respond_status": 500}`` or ``{"sleep_ms": 100}``.

    python -m gateway.sample_backend --socket /tmp/busgate-sample.sock [--record FILE]

flup never sets TCP_NODELAY (40 ms per response over TCP), hence the unix socket.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flup.server.fcgi import WSGIServer

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_RECORDED_KEYS = (
    "SCRIPT_FILENAME",
    "SCRIPT_NAME",
    "REQUEST_URI",
    "DOCUMENT_ROOT",
    "REQUEST_METHOD",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_PROTOCOL",
    "GATEWAY_INTERFACE",
    "SERVER_SOFTWARE",
    "REMOTE_ADDR",
)


def make_app(record_path: str | None) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        server = {
            key: value
            for key, value in environ.items()
            if isinstance(value, str) and (key.startswith("HTTP_") or key in _RECORDED_KEYS)
        }
        status = 200
        try:
            job = json.loads(body)
        except ValueError:
            job = None
        if isinstance(job, dict):
            time.sleep(int(job.get("sleep_ms", 0)) / 1000)
            status = int(job.get("respond_status", 200))
        print(
            f"sample backend: job {server.get('HTTP_X_BUSGATE_JOB_ID', '-')}"
            f" queue={server.get('HTTP_X_BUSGATE_QUEUE', '-')}"
            f" topic={server.get('HTTP_X_BUSGATE_TOPIC', '-')}"
            f" attempt={server.get('HTTP_X_BUSGATE_ATTEMPT', '-')}"
            f" payload={body[:200]!r} -> {status}",
            flush=True,
        )
        if record_path:
            line = json.dumps({"server": server, "body_b64": base64.b64encode(body).decode()})
            with lock, open(record_path, "a", encoding="utf-8") as out:
                out.write(line + "\n")
        start_response(f"{status} X", [("Content-Type", "text/plain")])
        return [b"recorded\n"]

    return app


class _Server(WSGIServer):  # type: ignore[misc]
    def _sanitizeEnv(self, environ: dict[str, Any]) -> None:
        # A front controller gets SCRIPT_NAME=/index.php and REQUEST_URI=/jobs/...; flup
        # warns about that on every request unless PATH_INFO is already set.
        if not environ.get("PATH_INFO"):
            environ["PATH_INFO"] = environ.get("REQUEST_URI", "/").split("?", 1)[0]
        super()._sanitizeEnv(environ)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--record", help="append every request as a JSON line to this file")
    args = parser.parse_args(argv)
    # flup's thread pool stalls a connection once more than maxSpare are open at a time
    # (seen with 6 kept-alive connections at the default of 5); keep plenty of spares.
    server = _Server(
        make_app(args.record), bindAddress=args.socket, umask=0o077, minSpare=8, maxSpare=64
    )
    print(f"sample backend listening on {args.socket} (pid {os.getpid()})", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
