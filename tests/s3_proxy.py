"""A tiny HTTP proxy in front of the moto server that drops ``If-None-Match``: an S3-compatible server that ignores
conditional writes (as s3rver 3.7.1 does), for the tests of the store's probe (``S3Backend.check_conditional_writes``).

Everything else passes through unchanged (moto does not check signatures by default, so the re-sent request is
accepted as is). It runs as threads of the test process and stops with its fixture.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def _handler(upstream: str, dropped: set[str]) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive as botocore expects, and Expect: 100-continue handling

        def log_message(self, *_: object) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in _HOP and k.lower() not in dropped and k.lower() != "expect"}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


def start_proxy(upstream: str, drop: tuple[str, ...] = ("if-none-match",)) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, set(drop)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="s3-proxy", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def proxy_dropping_if_none_match(upstream: str) -> Iterator[str]:
    """Endpoint URL of ``upstream`` as seen through a proxy that drops ``If-None-Match``; stopped on exit."""
    server, url = start_proxy(upstream)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
